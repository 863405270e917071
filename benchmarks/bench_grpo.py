"""GRPO rollout tokens/s on CPU: our rollouts (inference.rollout.sample_rollouts on decoding.CachedDecoder) vs
transformers' `generate` on the HF export of the same weights and the same batch (P prompts x G samples each,
temperature 1, no top-k / top-p, fixed length: no stop ids on either side).

    python benchmarks/bench_grpo.py [--model-size 16m] [--prompts 16] [--group-size 8] [--prompt-len 32]
                                    [--new-tokens 64] [--max-batch-rows N] [--repeats 3] [--threads 1]

Builds a randomly initialised checkpoint (weights do not matter for speed), exports it with tinyllm_mcore.convert
(what `tinyllm-mcore-to-hf` runs) and times both in this one process with the same torch threads, alternating ours
and theirs repeat by repeat so that load from other work on a shared CPU hits both alike; prints the medians, their
ratio and the machine's 1-minute load average around the runs. Run it from a checkout with the package installed.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch


# the checkpoint maker and the alternating timer are bench_generate's (this folder is on sys.path when run)
from bench_generate import make_checkpoint, timed_pair  # noqa: E402


def blas() -> str:
    """torch's BLAS as its build reports it (BLAS_INFO, and the MKL version line when MKL)."""
    config = torch.__config__.show()
    info = re.search(r"BLAS_INFO=(\w+)", config)
    mkl = re.search(r"Math Kernel Library Version ([\w.-]+)", config)
    return (info.group(1) if info else "unknown") + (f" {mkl.group(1)}" if mkl else "")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-size", default="16m")
    p.add_argument("--vocab-size", type=int, default=64798)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--max-batch-rows", type=int, default=None, help="ours: decode at most this many rows at once")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers

    from tinyllm_mcore.convert import convert_mcore_to_hf
    from tinyllm_mcore.inference.generate import SamplingParams
    from tinyllm_mcore.inference.open import open_checkpoint
    from tinyllm_mcore.inference.rollout import sample_rollouts
    from tinyllm_mcore.runtime import distributed as rt

    rows = args.prompts * args.group_size
    print(f"{args.model_size}: {args.prompts} prompts x G={args.group_size} = {rows} rows, prompt {args.prompt_len} "
          f"tokens, {args.new_tokens} new tokens (fixed), temperature 1; CPU, torch {torch.__version__} "
          f"{torch.get_num_threads()} thread(s) (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}), "
          f"BLAS {blas()}, transformers {transformers.__version__}; median of {args.repeats} alternating repeats",
          flush=True)
    work = Path(tempfile.mkdtemp(prefix="bench_grpo_"))
    try:
        ckpt = make_checkpoint(args.model_size, args.vocab_size, work / "mcore")
        hf_dir = convert_mcore_to_hf(ckpt, work / "hf", log=lambda msg: None)
        hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        opened = open_checkpoint(str(ckpt))
        preset = opened.preset
        prompts = torch.randint(3, preset.vocab_size, (args.prompts, args.prompt_len),
                                generator=torch.Generator().manual_seed(0))
        params = SamplingParams(temperature=1.0)  # no stop ids: every row runs the full length
        seeds = list(range(rows))

        def ours():
            out = sample_rollouts(opened.model, prompts.tolist(), group_size=args.group_size, params=params,
                                  row_seeds=seeds, max_new_tokens=args.new_tokens,
                                  max_batch_rows=args.max_batch_rows, vocab_size=preset.vocab_size)
            assert sum(map(len, out)) == rows * args.new_tokens

        # every setting stated (the export's generation_config carries the seed's sampling defaults); no eos id, so
        # rows run the full length without a min_new_tokens processor masking it at every step
        hf_config = transformers.GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                                  repetition_penalty=1.0, num_return_sequences=args.group_size,
                                                  max_new_tokens=args.new_tokens, pad_token_id=0, eos_token_id=None)

        def theirs():
            with torch.no_grad():
                out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), generation_config=hf_config)
            assert out.shape == (rows, args.prompt_len + args.new_tokens)

        load_before = os.getloadavg()[0]
        mine, hf_time = timed_pair(ours, theirs, args.repeats)
        tokens = rows * args.new_tokens
        print(f"{'':>22} {'tokens/s':>9} {'s/rollout':>10}")
        print(f"{'ours (sample_rollouts)':>22} {tokens / mine:>9.1f} {mine:>10.2f}")
        print(f"{'transformers generate':>22} {tokens / hf_time:>9.1f} {hf_time:>10.2f}")
        print(f"ratio ours / transformers: {hf_time / mine:.2f}x   (load average {load_before:.1f} -> "
              f"{os.getloadavg()[0]:.1f})", flush=True)
        rt.destroy()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
