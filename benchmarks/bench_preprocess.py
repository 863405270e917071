"""Preprocessing speed against two peers measured in the same run: Megatron-LM's tools/preprocess_data.py and the raw
SentencePiece encoder; start-up; byte identity; memory.

    python benchmarks/bench_preprocess.py [--input corpus.jsonl.gz] [--workers 2] [--repeats 5] \\
        [--megatron-lm /path/Megatron-LM] [--reference-checkout /path/to/another/checkout]

Each round runs, as fresh processes with the same flags (Megatron-LM's command line, 2 workers), ours and Megatron-LM
on the first half of the corpus and on all of it, and times the raw encoder on the second half; the order is
reversed every other round so that a load that drifts weighs on both tools alike. Figures:

* marginal time: wall(full) - wall(half), the cost of the second half's documents without the fixed start-up
  (imports, tokenizer load, pool start): what a larger corpus costs per document;
* raw encode: one process encoding the second half's texts (already parsed from JSON) with SentencePiece in batches of
  512 (``--chunk-size``), 1 thread (the issue's "raw single-process encode") and, for reference, all threads;
* start-up: wall of ours on a 20-line input; and whether it imported megatron or torch (``python -X importtime``);
* with ``--reference-checkout`` (another checkout of this project, e.g. the code before a change) its half and full
  runs too, in the same rounds.

Ratios are taken per round and reported as the median with the range over rounds, since only runs close in time
share the machine's load; and once more from each run's fastest wall over the rounds (load only adds time). CPU
seconds (the process tree's user + system time) are printed beside the walls: on a shared machine they move much
less than the walls. Outputs must be byte-identical: ours vs Megatron-LM (.bin/.idx),
and with ``--reference-checkout`` ours vs another checkout of this project (.bin/.idx/.json), e.g. the code before a
change.

Both tools read the same decompressed jsonl (Megatron-LM does not read .gz). Megatron-LM's checkout must match the
installed megatron-core (e.g. tag core_v0.16.1); megatron.training imports a triton kernel module at start-up that
preprocessing never runs: without triton, a stub for it is put on the peer's PYTHONPATH (``--megatron-lm-pythonpath``
replaces it).
"""
from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TINYLLM_SHARED", REPO.parent / "shared")) / "data"
TRITON_STUB = '''"""Megatron-LM's megatron.training imports this triton kernel module at start-up; preprocessing
never runs it."""
import sys
import types

_name = "megatron.core.transformer.custom_layers.batch_invariant_kernels"
_module = types.ModuleType(_name)


def enable_batch_invariant_mode(*args, **kwargs):
    raise RuntimeError("triton is not installed (benchmark stub)")


_module.enable_batch_invariant_mode = enable_batch_invariant_mode
sys.modules[_name] = _module
'''


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


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_measured(cmd: list[str], env: dict | None = None, poll_s: float = 0.2) -> dict:
    """Run ``cmd``; wall seconds, CPU seconds of its process tree (every descendant it reaped), peak memory (PSS of
    the tree, sampled every ``poll_s``) and its output."""
    out = tempfile.TemporaryFile()
    cpu_before = children_cpu()
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    root, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            peak = max(peak, tree_memory(root))
        except psutil.Error:
            pass
        time.sleep(poll_s)
    wall = time.perf_counter() - start
    cpu = children_cpu() - cpu_before
    out.seek(0)
    text = out.read().decode(errors="replace")
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{text[-3000:]}")
    return {"wall": wall, "cpu": cpu, "peak": peak, "text": text}


def ours_command(checkout: Path, input_path: Path, prefix: Path, tokenizer: str, workers: int, partitions: int,
                 chunk_size: int) -> list[str]:
    # Megatron-LM's command line (the same flags the Megatron-LM run gets), plus --no-progress.
    return [sys.executable, str(checkout / "tools" / "preprocess_data.py"), "--input", str(input_path),
            "--output-prefix", str(prefix), "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model",
            tokenizer, "--workers", str(workers), "--partitions", str(partitions), "--append-eod", "--no-progress",
            "--chunk-size", str(chunk_size)]


def checkout_env(checkout: Path) -> dict:
    """A checkout's own code first (the installed package may be another copy); another checkout is only read (no
    __pycache__ written into it)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(checkout), env.get("PYTHONPATH")) if p)
    if checkout.resolve() != REPO:
        env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def ours(input_path: Path, prefix: Path, args, checkout: Path = REPO) -> dict:
    r = run_measured(ours_command(checkout, input_path, prefix, args.tokenizer_model, args.workers, args.partitions,
                                  args.chunk_size), env=checkout_env(checkout))
    r["docs"] = int(re.search(r"documents: (\d+)", r["text"]).group(1))
    r["tokens"] = int(re.search(r"tokens: (\d+)", r["text"]).group(1))
    return r


def megatron_lm(input_path: Path, prefix: Path, args, docs: int, pythonpath: str | None) -> dict:
    log_interval = max(1, min(10000, docs // (4 * args.partitions)))  # a few progress lines per part
    env = dict(os.environ)
    # the peer's environment: Megatron-LM is a checkout, not an installed package
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(args.megatron_lm), pythonpath, env.get("PYTHONPATH")) if p)
    # Its --partitions writes part files beside the input (and reuses them on a later run): a folder per run.
    run_dir = Path(tempfile.mkdtemp(dir=prefix.parent, prefix="mlm_input_"))
    own_input = run_dir / input_path.name
    os.link(input_path, own_input)
    try:
        r = run_measured([sys.executable, str(args.megatron_lm / "tools" / "preprocess_data.py"), "--input",
                          str(own_input), "--output-prefix", str(prefix), "--tokenizer-type",
                          "SentencePieceTokenizer", "--tokenizer-model", args.tokenizer_model, "--workers",
                          str(args.workers), "--partitions", str(args.partitions), "--append-eod", "--log-interval",
                          str(log_interval)], env=env)
    finally:
        shutil.rmtree(run_dir)
    r["docs"] = docs
    return r


def raw_encode(texts: list[str], tokenizer: str, chunk_size: int, threads: int) -> tuple[float, float, int]:
    """Wall and CPU seconds for one process to encode ``texts`` with SentencePiece, ``chunk_size`` texts per call;
    and the tokens it gives, plus one per non-empty text (the eod ours appends), to check both encoded the same
    texts."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=tokenizer)
    start, cpu_start = time.perf_counter(), time.process_time()
    batches = [sp.encode(texts[i:i + chunk_size], num_threads=threads) for i in range(0, len(texts), chunk_size)]
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return seconds, cpu, sum(len(ids) + (1 if ids else 0) for batch in batches for ids in batch)


def imported_modules(args, tiny: Path, prefix: Path) -> set[str]:
    """Top-level packages ours imports for a SentencePiece run (``python -X importtime``)."""
    cmd = ours_command(REPO, tiny, prefix, args.tokenizer_model, args.workers, 1, args.chunk_size)
    proc = subprocess.run([cmd[0], "-X", "importtime", *cmd[1:]], capture_output=True, text=True,
                          env=checkout_env(REPO))
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return {m.group(1).split(".")[0] for m in re.finditer(r"^import time:.*\|\s*(\S+)\s*$", proc.stderr, re.M)}


def same_files(a: Path, b: Path, suffixes: tuple[str, ...]) -> bool:
    return all(Path(f"{a}{s}").read_bytes() == Path(f"{b}{s}").read_bytes() for s in suffixes)


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = re.findall(r"^model name\s*:\s*(.+)$", f.read(), re.M)
        model = names[0] if names else model
    except OSError:
        pass
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    import sentencepiece

    return (f"{model}; {os.cpu_count()} CPUs, {threads} usable by this process; Python {platform.python_version()}, "
            f"sentencepiece {sentencepiece.__version__}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")


def spread(values: list[float], fmt: str = "{:.2f}") -> str:
    return (f"{fmt.format(statistics.median(values))} (range {fmt.format(min(values))}-{fmt.format(max(values))}, "
            f"{len(values)} rounds)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", default=str(SHARED / "zh_classics.jsonl.gz"))
    p.add_argument("--tokenizer-model", default=str(SHARED / "tokenizers" / "chatglm3" / "tokenizer.model"))
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--partitions", type=int, default=1, help="--partitions for both tools (divides --workers)")
    p.add_argument("--chunk-size", type=int, default=512, help="ours' --chunk-size, and the raw encoder's batch")
    p.add_argument("--repeats", type=int, default=5, help="rounds")
    p.add_argument("--megatron-lm", type=Path, default=None, help="a Megatron-LM checkout (tag core_v0.16.1)")
    p.add_argument("--megatron-lm-pythonpath", default=None,
                   help="extra PYTHONPATH entry for the Megatron-LM run (default: a triton stub when triton is absent)")
    p.add_argument("--reference-checkout", type=Path, default=None,
                   help="another checkout of this project: its output for the full corpus must equal ours")
    args = p.parse_args(argv)
    if not Path(args.input).is_file():
        print(f"error: --input {args.input} not found", file=sys.stderr)
        return 1
    for flag, path in (("--megatron-lm", args.megatron_lm), ("--reference-checkout", args.reference_checkout)):
        if path is not None and not (path / "tools" / "preprocess_data.py").is_file():
            print(f"error: {flag} {path}: no tools/preprocess_data.py there", file=sys.stderr)
            return 1

    with tempfile.TemporaryDirectory(prefix="bench_preprocess_") as tmp:
        tmp = Path(tmp)
        full, half, tiny = tmp / "full.jsonl", tmp / "half.jsonl", tmp / "tiny.jsonl"
        opener = gzip.open if args.input.endswith(".gz") else open
        with opener(args.input, "rb") as src, open(full, "wb") as dst:
            shutil.copyfileobj(src, dst)
        with open(full, "rb") as src:
            lines = src.readlines()
        total_lines, half_lines = len(lines), len(lines) // 2
        half.write_bytes(b"".join(lines[:len(lines) // 2]))
        tiny.write_bytes(b"".join(lines[:20]))
        second_half = [json.loads(line)["text"] for line in lines[len(lines) // 2:]]
        del lines
        pythonpath = args.megatron_lm_pythonpath
        if args.megatron_lm and pythonpath is None and importlib.util.find_spec("triton") is None:
            (tmp / "stub").mkdir()
            (tmp / "stub" / "sitecustomize.py").write_text(TRITON_STUB)
            pythonpath = str(tmp / "stub")

        print(f"machine: {machine()}")
        print(f"input {args.input}: {total_lines} lines (half: the first {half_lines}); tokenizer "
              f"{args.tokenizer_model}; --workers {args.workers} "
              f"--partitions {args.partitions} --chunk-size {args.chunk_size}; {args.repeats} rounds")
        modules = imported_modules(args, tiny, tmp / "imports")
        print(f"ours' start-up imports megatron: {'megatron' in modules}, torch: {'torch' in modules}")

        rounds = []
        for r in range(args.repeats):
            steps = ["ours_tiny", "ours_half", "ours_full", "raw1", "rawN"]
            if args.megatron_lm:
                steps += ["mlm_half", "mlm_full"]
            if args.reference_checkout:
                steps += ["ref_half", "ref_full"]
            if r % 2:
                steps.reverse()
            load = os.getloadavg()[0]
            res = {}
            for step in steps:
                if step == "ours_tiny":
                    res[step] = ours(tiny, tmp / "ours_tiny", args)
                elif step.startswith("ours_"):
                    res[step] = ours(full if step == "ours_full" else half, tmp / step, args)
                elif step.startswith("ref_"):
                    res[step] = ours(full if step == "ref_full" else half, tmp / step, args,
                                     checkout=args.reference_checkout)
                elif step.startswith("raw"):
                    seconds, cpu, tokens = raw_encode(second_half, args.tokenizer_model, args.chunk_size,
                                                      1 if step == "raw1" else -1)
                    res[step] = {"wall": seconds, "cpu": cpu, "tokens": tokens}
                else:
                    docs = total_lines if step == "mlm_full" else half_lines  # one document per line
                    res[step] = megatron_lm(full if step == "mlm_full" else half, tmp / step, args, docs, pythonpath)
            res["load"] = (load, os.getloadavg()[0])
            res["ours_marginal"] = res["ours_full"]["wall"] - res["ours_half"]["wall"]
            res["ours_marginal_cpu"] = res["ours_full"]["cpu"] - res["ours_half"]["cpu"]
            if args.megatron_lm:
                res["mlm_marginal"] = res["mlm_full"]["wall"] - res["mlm_half"]["wall"]
                res["mlm_marginal_cpu"] = res["mlm_full"]["cpu"] - res["mlm_half"]["cpu"]
                res["identical_mlm"] = same_files(tmp / "ours_full_text_document", tmp / "mlm_full_text_document",
                                                  (".bin", ".idx"))
            if args.reference_checkout:
                res["ref_marginal"] = res["ref_full"]["wall"] - res["ref_half"]["wall"]
                res["identical_ref"] = same_files(tmp / "ours_full_text_document", tmp / "ref_full_text_document",
                                                  (".bin", ".idx", ".json"))
            rounds.append(res)
            print(f"round {r + 1}: load {res['load'][0]:.1f}->{res['load'][1]:.1f} | wall s (CPU s): ours tiny "
                  f"{res['ours_tiny']['wall']:.2f}, half {res['ours_half']['wall']:.2f} "
                  f"({res['ours_half']['cpu']:.1f}), full {res['ours_full']['wall']:.2f} "
                  f"({res['ours_full']['cpu']:.1f}), marginal {res['ours_marginal']:.2f} "
                  f"({res['ours_marginal_cpu']:.2f})"
                  + (f" | Megatron-LM half {res['mlm_half']['wall']:.2f} ({res['mlm_half']['cpu']:.1f}), full "
                     f"{res['mlm_full']['wall']:.2f} ({res['mlm_full']['cpu']:.1f}), marginal "
                     f"{res['mlm_marginal']:.2f} ({res['mlm_marginal_cpu']:.2f})" if args.megatron_lm else "")
                  + (f" | reference half {res['ref_half']['wall']:.2f}, full {res['ref_full']['wall']:.2f}, "
                     f"marginal {res['ref_marginal']:.2f}" if args.reference_checkout else "")
                  + f" | raw encode 1 thread {res['raw1']['wall']:.2f} ({res['raw1']['cpu']:.2f}), all threads "
                    f"{res['rawN']['wall']:.2f} ({res['rawN']['cpu']:.2f})",
                  flush=True)

        marginal_docs = rounds[0]["ours_full"]["docs"] - rounds[0]["ours_half"]["docs"]
        marginal_tokens = rounds[0]["ours_full"]["tokens"] - rounds[0]["ours_half"]["tokens"]
        if rounds[0]["raw1"]["tokens"] != marginal_tokens:
            print(f"error: the raw encoder gave {rounds[0]['raw1']['tokens']} tokens (with eod), ours' second half "
                  f"{marginal_tokens}: they did not encode the same texts", file=sys.stderr)
            return 1
        print(f"\nsummary (medians over rounds; the second half = {marginal_docs} documents, {marginal_tokens:,} "
              f"tokens with eod):")
        print(f"ours marginal: {spread([r['ours_marginal'] for r in rounds])} s wall, "
              f"{spread([r['ours_marginal_cpu'] for r in rounds])} CPU s")
        print(f"raw SentencePiece encode, 1 process: 1 thread {spread([r['raw1']['wall'] for r in rounds])} s, all "
              f"threads {spread([r['rawN']['wall'] for r in rounds])} s")
        if args.megatron_lm:
            print(f"Megatron-LM marginal: {spread([r['mlm_marginal'] for r in rounds])} s wall, "
                  f"{spread([r['mlm_marginal_cpu'] for r in rounds])} CPU s")
            print(f"RATIO Megatron-LM marginal / ours marginal: "
                  f"{spread([r['mlm_marginal'] / r['ours_marginal'] for r in rounds])}x (goal >= 2); CPU "
                  f"{spread([r['mlm_marginal_cpu'] / r['ours_marginal_cpu'] for r in rounds])}x")
        print(f"RATIO ours marginal / raw encode (1 thread): "
              f"{spread([r['ours_marginal'] / r['raw1']['wall'] for r in rounds])} (goal <= 1.1); / raw encode "
              f"(all threads): {spread([r['ours_marginal'] / r['rawN']['wall'] for r in rounds])}; CPU seconds, "
              f"ours marginal / raw encode (1 thread): "
              f"{spread([r['ours_marginal_cpu'] / r['raw1']['cpu'] for r in rounds])} (the work beyond the encoder)")
        # The fastest run of each: a load from elsewhere only adds time, so the minimum is the estimate it spoils least.
        best = {k: min(r[k]["wall"] for r in rounds) for k in rounds[0] if isinstance(rounds[0][k], dict)}
        best_ours = best["ours_full"] - best["ours_half"]
        print(f"best of rounds (each run's fastest wall): ours marginal {best_ours:.2f} s, raw encode 1 thread "
              f"{best['raw1']:.2f} s, all threads {best['rawN']:.2f} s -> ours / raw {best_ours / best['raw1']:.2f} "
              f"(1 thread), {best_ours / best['rawN']:.2f} (all threads)"
              + (f"; Megatron-LM marginal {best['mlm_full'] - best['mlm_half']:.2f} s -> Megatron-LM / ours "
                 f"{(best['mlm_full'] - best['mlm_half']) / best_ours:.2f}x" if args.megatron_lm else ""))
        print(f"START-UP ours (20-line input, whole command): {spread([r['ours_tiny']['wall'] for r in rounds])} s "
              f"(goal <= 3); imports megatron: {'megatron' in modules}, torch: {'torch' in modules}")
        full_runs = [r["ours_full"] for r in rounds]
        print(f"ours full corpus: {statistics.median(r['docs'] / r['wall'] for r in full_runs):,.0f} docs/s end to "
              f"end; peak PSS full / half corpus: "
              f"{statistics.median(r['ours_full']['peak'] / r['ours_half']['peak'] for r in rounds):.2f} "
              f"({statistics.median(r['peak'] for r in full_runs) / 2**20:.0f} MiB at the full corpus)")
        if args.megatron_lm:
            print(f"outputs byte-identical, ours vs Megatron-LM (.bin/.idx): "
                  f"{all(r['identical_mlm'] for r in rounds)}")
        if args.reference_checkout:
            print(f"reference checkout {args.reference_checkout}: marginal "
                  f"{spread([r['ref_marginal'] for r in rounds])} s; / raw encode (1 thread) "
                  f"{spread([r['ref_marginal'] / r['raw1']['wall'] for r in rounds])}; start-up + half corpus "
                  f"{spread([r['ref_half']['wall'] for r in rounds])} s (ours "
                  f"{spread([r['ours_half']['wall'] for r in rounds])} s); "
                  f"best of rounds: marginal {best['ref_full'] - best['ref_half']:.2f} s")
            print(f"outputs byte-identical, ours vs {args.reference_checkout} (.bin/.idx/.json): "
                  f"{all(r['identical_ref'] for r in rounds)}")
        print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
