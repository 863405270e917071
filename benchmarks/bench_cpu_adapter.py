"""Cost of the CPU adapter vs the naive alternative: a global TorchFunctionMode that rewrites device="cuda".

Both make megatron-core run on CPU; ours patches the dozen megatron call sites that need it (runtime/cpu.py), the
mode intercepts every torch call of every step. Times training steps of one model with our adapter alone and with
the mode added on top (whose work is the per-op interception: our patches already make the rewrites unnecessary),
and prints the ratio.

    python benchmarks/bench_cpu_adapter.py --model-size 16m --seq-length 256 --micro-batch-size 4 --threads 2
"""
from __future__ import annotations

import argparse
import time

import torch
from torch.overrides import TorchFunctionMode


class RedirectCudaDevice(TorchFunctionMode):
    """The naive shim: every torch call passes through here, device="cuda" keyword arguments become "cpu"."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if device is not None and "cuda" in str(device):
            kwargs = {**kwargs, "device": "cpu"}
        return func(*args, **kwargs)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-size", default="16m")
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from megatron.core.pipeline_parallel import get_forward_backward_func

    from tinyllm_mcore.training.batches import lm_forward_step
    from tinyllm_mcore.runtime import distributed as rt
    from tinyllm_mcore.training.loop import Stage, micro_batches, parse_args, setup, train_step

    seq, mbs = args.seq_length, args.micro_batch_size

    class RandomTokens(torch.utils.data.Dataset):
        def __len__(self):
            return 1 << 20

        def __getitem__(self, i):
            t = torch.randint(0, 1000, (seq + 1,))
            return {"tokens": t[:-1], "labels": t[1:], "loss_mask": torch.ones(seq), "position_ids": torch.arange(seq)}

    stage = Stage("bench", lambda ctx: (RandomTokens(), None, None), lm_forward_step)
    train_args = parse_args(stage, ["--model-size", args.model_size, "--seq-length", str(seq), "--micro-batch-size",
                                    str(mbs), "--mock-data", "--train-iters", "1000", "--lr-warmup-iters", "1"])
    run = setup(stage, train_args)
    data = [micro_batches(RandomTokens(), consumed_samples=0, micro_batch_size=mbs, dp_rank=0, dp_size=1)]
    fb = get_forward_backward_func()

    def seconds_per_step():
        train_step(stage, run.ctx, fb, data, run.optimizer, run.scheduler)  # warm-up
        t = time.perf_counter()
        for _ in range(args.steps):
            train_step(stage, run.ctx, fb, data, run.optimizer, run.scheduler)
        return (time.perf_counter() - t) / args.steps

    ours = seconds_per_step()
    with RedirectCudaDevice():
        naive = seconds_per_step()
    ours_again = seconds_per_step()  # order effects
    ours = min(ours, ours_again)
    print(f"{args.model_size}, seq {seq}, micro-batch {mbs}, {args.threads} threads, fp32, one process")
    print(f"our adapter: {1000 * ours:.1f} ms/step; with a global TorchFunctionMode: {1000 * naive:.1f} ms/step; "
          f"the mode costs {naive / ours:.2f}x")
    rt.destroy()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
