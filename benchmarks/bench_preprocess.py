"""Preprocessing throughput and memory: tools/preprocess_data.py vs Megatron-LM's tools/preprocess_data.py.

    python benchmarks/bench_preprocess.py [--input corpus.jsonl.gz] [--workers 2] [--megatron-lm /path/Megatron-LM]

Runs ours on the first half of the corpus and on all of it (peak memory of the whole process tree should not grow with
corpus size), then, with --megatron-lm, Megatron-LM's script on the same full corpus, tokenizer and workers, and
checks both wrote byte-identical .bin/.idx. Both read the same decompressed jsonl (Megatron-LM does not read .gz).

docs/s are reported two ways: end to end (wall clock of the whole command, imports included) and as each tool reports
its own processing rate. Megatron-LM's checkout must match the installed megatron-core (e.g. tag core_v0.16.1); on a
machine without triton, pass --megatron-lm-pythonpath DIR with a sitecustomize.py that stubs the triton kernel module
megatron.training imports at start-up (preprocessing never runs it).
"""
from __future__ import annotations

import argparse
import gzip
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TINYLLM_SHARED", REPO.parent / "shared")) / "data"


def tree_memory(root: psutil.Process) -> int:
    """Memory of a process and its children: summed PSS (shared pages such as forked workers' copy of torch counted
    once), falling back to RSS where PSS is not readable."""
    total = 0
    for proc in [root] + root.children(recursive=True):
        try:
            total += proc.memory_full_info().pss
        except (psutil.AccessDenied, AttributeError):
            total += proc.memory_info().rss
    return total


def run_measured(cmd: list[str], env: dict | None = None) -> tuple[float, int, str]:
    """Run ``cmd``; return (wall seconds, peak memory of the process tree in bytes, combined output)."""
    out = tempfile.TemporaryFile()
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    root, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            peak = max(peak, tree_memory(root))
        except psutil.Error:
            pass
        time.sleep(0.05)
    wall = time.perf_counter() - start
    out.seek(0)
    text = out.read().decode(errors="replace")
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{text[-3000:]}")
    return wall, peak, text


def ours(input_path: Path, prefix: Path, tokenizer: str, workers: int, partitions: int = 1) -> dict:
    # Megatron-LM's command line (the same flags the Megatron-LM run below gets), plus --no-progress.
    wall, peak, text = run_measured([sys.executable, str(REPO / "tools" / "preprocess_data.py"), "--input",
                                     str(input_path), "--output-prefix", str(prefix), "--tokenizer-type",
                                     "SentencePieceTokenizer", "--tokenizer-model", tokenizer, "--workers",
                                     str(workers), "--partitions", str(partitions), "--append-eod", "--no-progress"])
    docs = int(re.search(r"documents: (\d+)", text).group(1))
    tokens = int(re.search(r"tokens: (\d+)", text).group(1))
    processing = float(re.search(r"time: ([\d.]+) s", text).group(1))
    return {"docs": docs, "tokens": tokens, "wall": wall, "processing": processing, "peak_rss": peak}


def megatron_lm(checkout: Path, extra_path: str | None, input_path: Path, prefix: Path, tokenizer: str,
                workers: int, docs: int, partitions: int = 1) -> dict:
    log_interval = max(1, min(10000, docs // (4 * partitions)))  # a few progress lines per part
    env = dict(os.environ)
    # the peer's environment: Megatron-LM is a checkout, not an installed package (this project's own run above
    # imports the installed tinyllm_mcore)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(checkout), extra_path, env.get("PYTHONPATH")) if p)
    wall, peak, text = run_measured([sys.executable, str(checkout / "tools" / "preprocess_data.py"), "--input",
                                     str(input_path), "--output-prefix", str(prefix), "--tokenizer-type",
                                     "SentencePieceTokenizer", "--tokenizer-model", tokenizer, "--workers",
                                     str(workers), "--partitions", str(partitions), "--append-eod", "--log-interval",
                                     str(log_interval)], env=env)
    # Its last progress line; with partitions, each part reports its own rate and the parts run side by side.
    rate = float(re.findall(r"Processed \d+ documents \(([\d.]+) docs/s", text)[-1]) * partitions
    return {"docs": docs, "wall": wall, "processing": docs / rate, "peak_rss": peak}


def line(name: str, r: dict) -> str:
    tokens = f", {r['tokens'] / r['wall']:>10,.0f} tokens/s" if "tokens" in r else ""
    return (f"{name:<28} {r['docs']:>8} docs  end to end {r['wall']:6.1f} s = {r['docs'] / r['wall']:>8,.0f} docs/s"
            f"{tokens}  | processing {r['docs'] / r['processing']:>8,.0f} docs/s | peak PSS "
            f"{r['peak_rss'] / 2**20:6.0f} MiB")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", default=str(SHARED / "zh_classics.jsonl.gz"))
    p.add_argument("--tokenizer-model", default=str(SHARED / "tokenizers" / "chatglm3" / "tokenizer.model"))
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--partitions", type=int, default=1, help="--partitions for both tools (divides --workers)")
    p.add_argument("--megatron-lm", type=Path, default=None, help="a Megatron-LM checkout")
    p.add_argument("--megatron-lm-pythonpath", default=None, help="extra PYTHONPATH entry for the Megatron-LM run")
    args = p.parse_args(argv)
    if not Path(args.input).is_file():
        print(f"error: input {args.input} not found", file=sys.stderr)
        return 1

    with tempfile.TemporaryDirectory(prefix="bench_preprocess_") as tmp:
        tmp = Path(tmp)
        full, half = tmp / "full.jsonl", tmp / "half.jsonl"
        opener = gzip.open if args.input.endswith(".gz") else open
        with opener(args.input, "rb") as src, open(full, "wb") as dst:
            shutil.copyfileobj(src, dst)
        with open(full, "rb") as src:
            lines = sum(1 for _ in src)
        with open(full, "rb") as src, open(half, "wb") as dst:
            for i, raw in enumerate(src):
                if i >= lines // 2:
                    break
                dst.write(raw)

        print(f"input {args.input}: {lines} lines; tokenizer {args.tokenizer_model}; {args.workers} workers; "
              f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
        ours_half = ours(half, tmp / "ours_half", args.tokenizer_model, args.workers, args.partitions)
        print(line("ours, half corpus", ours_half))
        ours_full = ours(full, tmp / "ours_full", args.tokenizer_model, args.workers, args.partitions)
        print(line("ours, full corpus", ours_full))
        print(f"peak memory (PSS, process tree) full / half corpus: {ours_full['peak_rss'] / ours_half['peak_rss']:.2f}")
        if args.megatron_lm:
            theirs = megatron_lm(args.megatron_lm, args.megatron_lm_pythonpath, full, tmp / "mlm_full",
                                 args.tokenizer_model, args.workers, ours_full["docs"], args.partitions)
            print(line("Megatron-LM, full corpus", theirs))
            identical = all((tmp / f"ours_full_text_document{s}").read_bytes() ==
                            (tmp / f"mlm_full_text_document{s}").read_bytes() for s in (".bin", ".idx"))
            print(f"outputs byte-identical: {identical}")
            print(f"ratio ours / Megatron-LM docs/s: end to end {theirs['wall'] / ours_full['wall']:.2f}x, "
                  f"processing {theirs['processing'] / ours_full['processing']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
