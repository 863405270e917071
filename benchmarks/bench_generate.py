"""Generation tokens/s on CPU: our KV-cached generation (inference.Generator) vs transformers' `generate` on the HF
export of the same weights, greedy, fixed length (no early stop), every model size × prompt length × batch size.

    python benchmarks/bench_generate.py [--model-sizes 16m 92m] [--prompt-lens 32 512] [--batch-sizes 1 8]
                                        [--new-tokens 64] [--repeats 5] [--threads 2]

Builds a randomly initialised checkpoint per size (weights do not matter for speed), exports it with
tinyllm_mcore.convert (what `tinyllm-mcore-to-hf` runs) and times both in this one process, alternating ours and
theirs repeat by repeat so that load from other work on a shared CPU hits both alike; prints the medians, their
ratio and the machine's 1-minute load average around each case. A prompt longer than the model's context allows with
--new-tokens (16m: 512 positions) is shortened to fit, and printed as run. Run it from a checkout with the package
installed (`pip install -e .`).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch


def machine_line() -> str:
    """What the figures depend on: CPU model, torch's kernels (capability, BLAS) and the thread count."""
    import platform
    import re

    cpu = platform.processor() or platform.machine()
    try:
        found = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), flags=re.M)
        cpu = found.group(1).strip() if found else cpu
    except OSError:
        pass
    config = torch.__config__.show()
    blas = re.search(r"BLAS_INFO=(\w+)", config)
    mkl = re.search(r"Math Kernel Library Version ([\w.]+)", config)
    return (f"machine: {cpu}, {os.cpu_count()} cores; torch {torch.__version__}, "
            f"{torch.backends.cpu.get_cpu_capability()}, BLAS {blas.group(1) if blas else '?'}"
            f"{' ' + mkl.group(1) if mkl else ''}, {torch.get_num_threads()} threads "
            f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})")


def head_products() -> str:
    """The few-row output-layer products our decoder measured and chose on this machine (inference/decoding.py)."""
    from tinyllm_mcore.inference import decoding

    chosen = sorted({(key[3], name) for key, name in decoding._HEAD_PRODUCT_CHOICE.items()})
    return "head: " + ", ".join(f"{rows} rows {name}" for rows, name in chosen) if chosen else ""


def make_checkpoint(model_size: str, vocab: int, out: Path) -> Path:
    from tinyllm_mcore.training.batches import lm_forward_step
    from tinyllm_mcore.runtime import distributed as rt
    from tinyllm_mcore.training.loop import Stage, parse_args, train

    # --train-iters 0: the loop only initialises and saves; the dataset is never read
    STAGE = Stage("init", lambda ctx: ([{}], None, None), lm_forward_step)
    args = parse_args(STAGE, ["--model-size", model_size, "--vocab-size", str(vocab), "--mock-data",
                              "--train-iters", "0", "--micro-batch-size", "1", "--seq-length", "128",
                              "--save", str(out)])
    train(STAGE, args)
    rt.destroy()
    return out


def timed_pair(ours, theirs, repeats: int) -> tuple[float, float]:
    """Median seconds of each over `repeats` runs, alternating the two (after one warm-up run of each)."""
    ours(), theirs()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for fn, record in ((ours, times[0]), (theirs, times[1])):
            t0 = time.perf_counter()
            fn()
            record.append(time.perf_counter() - t0)
    return statistics.median(times[0]), statistics.median(times[1])


def bench_size(model_size: str, args, work: Path) -> None:
    import transformers

    from tinyllm_mcore.convert import convert_mcore_to_hf
    from tinyllm_mcore.inference import generate as inference
    from tinyllm_mcore.runtime import distributed as rt

    ckpt = make_checkpoint(model_size, args.vocab_size, work / model_size / "mcore")
    hf_dir = convert_mcore_to_hf(ckpt, work / model_size / "hf", log=lambda msg: None)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    generator, preset = inference.load_generator(str(ckpt))
    params = inference.SamplingParams(max_new_tokens=args.new_tokens, greedy=True)  # no stop ids: fixed length
    print(f"\n{model_size} ({preset.num_parameters():,} params, context {preset.max_position_embeddings})", flush=True)
    print(f"{'prompt':>6} {'batch':>5} {'ours tok/s':>11} {'HF tok/s':>10} {'ratio':>6}  load  (our output-layer product per row count)", flush=True)
    for requested in args.prompt_lens:
        prompt_len = min(requested, preset.max_position_embeddings - args.new_tokens)
        for batch in args.batch_sizes:
            prompts = torch.randint(3, preset.vocab_size, (batch, prompt_len),
                                    generator=torch.Generator().manual_seed(0))

            def hf_generate():
                with torch.no_grad():
                    # repetition_penalty=1.0 overrides the export's generation_config (1.1), as greedy ours runs
                    hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=args.new_tokens,
                                min_new_tokens=args.new_tokens, do_sample=False, repetition_penalty=1.0,
                                pad_token_id=0)

            load_before = os.getloadavg()[0]
            ours, theirs = timed_pair(lambda: generator.generate(prompts.tolist(), params), hf_generate,
                                      args.repeats)
            tokens = batch * args.new_tokens
            print(f"{prompt_len:>6} {batch:>5} {tokens / ours:>11.1f} {tokens / theirs:>10.1f} "
                  f"{theirs / ours:>5.2f}x  {load_before:.1f}-{os.getloadavg()[0]:.1f}  {head_products()}", flush=True)
    rt.destroy()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-sizes", nargs="+", default=["16m", "92m"])
    p.add_argument("--vocab-size", type=int, default=64798)
    p.add_argument("--prompt-lens", type=int, nargs="+", default=[32, 512])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{args.new_tokens} new tokens, greedy, {torch.get_num_threads()} threads, CPU, "
          f"median of {args.repeats} alternating repeats")
    print(machine_line())
    work = Path(tempfile.mkdtemp(prefix="bench_generate_"))
    try:
        for model_size in args.model_sizes:
            bench_size(model_size, args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
