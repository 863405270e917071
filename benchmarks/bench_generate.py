"""Generation tokens/s on CPU: our KV-cached megatron-core generation vs transformers' `generate` on the HF export
of the same weights (greedy, fixed length: no early stop), batch 1 and 8.

    python benchmarks/bench_generate.py [--model-size 16m] [--prompt-len 32] [--new-tokens 64] [--threads 2]

Builds a randomly initialised checkpoint of the preset (weights do not matter for speed), exports it with
checkpoint_convert/mcore_to_hf.py and times both. Prints ours, HF, and the ratio (target ≥ 1×).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch


def make_checkpoint(model_size: str, vocab: int, out: Path) -> Path:
    from tinyllm_mcore.pretrain import lm_forward_step
    from tinyllm_mcore.runtime import distributed as rt
    from tinyllm_mcore.training.loop import Stage, parse_args, train

    # --train-iters 0: the loop only initialises and saves; the dataset is never read
    STAGE = Stage("init", lambda args, tokenizer, preset: ([{}], None, None), lm_forward_step)
    args = parse_args(STAGE, ["--model-size", model_size, "--vocab-size", str(vocab), "--mock-data",
                              "--train-iters", "0", "--micro-batch-size", "1", "--seq-length", "128",
                              "--save", str(out)])
    train(STAGE, args)
    rt.destroy()
    return out


def timed_pair(ours, theirs, repeats: int) -> tuple[float, float]:
    """Best-of-`repeats` seconds for each, alternating the two so load changes on a shared CPU hit both alike."""
    ours(), theirs()  # warm-up
    best = [float("inf"), float("inf")]
    for _ in range(repeats):
        for i, fn in enumerate((ours, theirs)):
            t0 = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best[0], best[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-size", default="16m")
    p.add_argument("--vocab-size", type=int, default=64798)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers

    from checkpoint_convert.mcore_to_hf import convert_mcore_to_hf
    from tinyllm_mcore import inference

    tmp = Path(tempfile.mkdtemp(prefix="bench_generate_"))
    ckpt = make_checkpoint(args.model_size, args.vocab_size, tmp / "mcore")
    hf_dir = convert_mcore_to_hf(ckpt, tmp / "hf", log=lambda msg: None)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    generator, preset = inference.load_generator(str(ckpt))
    params = inference.SamplingParams(max_new_tokens=args.new_tokens, greedy=True)  # no stop ids: fixed length

    print(f"{args.model_size} ({preset.num_parameters():,} params), prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens, greedy, {torch.get_num_threads()} threads, CPU")
    print(f"{'batch':>5} {'ours tok/s':>11} {'HF tok/s':>10} {'ratio':>6}")
    for batch in args.batch_sizes:
        prompts = torch.randint(3, preset.vocab_size, (batch, args.prompt_len), generator=torch.Generator().manual_seed(0))

        def hf_generate():
            with torch.no_grad():
                hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=args.new_tokens,
                            min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)

        ours, theirs = timed_pair(lambda: generator.generate(prompts.tolist(), params), hf_generate, args.repeats)
        tokens = batch * args.new_tokens
        print(f"{batch:>5} {tokens / ours:>11.1f} {tokens / theirs:>10.1f} {theirs / ours:>5.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
