"""What the checkpoint manifest costs: save and load of a real checkpoint with and without the CRC-32 pass.

    python benchmarks/bench_checkpoint.py --model-size 92m [--repeats 3] [--distributed-optimizer]

The peer is the same save/load without checksums, measured in the same run. One process (CPU or one GPU); the 92m
checkpoint holds weights, Adam state and fp32 copies (about 1.1 GB).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from tinyllm_mcore.stages.pretrain import STAGE
from tinyllm_mcore.runtime import distributed as rt
from tinyllm_mcore.checkpoint import io as ckpt
from tinyllm_mcore.checkpoint import safety as safety
from tinyllm_mcore.training.loop import parse_args, train


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-size", default="92m")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--distributed-optimizer", action="store_true")
    cli = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        argv = ["--model-size", cli.model_size, "--mock-data", "--seq-length", "32", "--micro-batch-size", "1",
                "--train-iters", "1", "--lr-warmup-iters", "0"]
        args = parse_args(STAGE, argv + (["--use-distributed-optimizer"] if cli.distributed_optimizer else []))
        state = train(STAGE, args)  # one step, so the optimizer holds its Adam state
        chunks, optimizer, scheduler = state["chunks"], state["optimizer"], state["scheduler"]
        save_s, manifest_s, load_s, verify_s = [], [], [], []
        for i in range(cli.repeats):
            path = ckpt.iteration_dir(tmp, i)
            total = timed(lambda: ckpt.save_checkpoint(tmp, i, chunks, optimizer, scheduler, consumed_samples=0))
            manifest_s.append(timed(lambda: safety.write_manifest(path)))  # the same pass the save just made
            save_s.append(total - manifest_s[-1])
            verify_s.append(timed(lambda: safety.verify(path)))
            load_s.append(timed(lambda: ckpt.load_checkpoint(ckpt.read_checkpoint(path, verify=False), chunks,
                                                             optimizer, scheduler)))
        size = sum(f.stat().st_size for f in Path(tmp, "iter_0000000").rglob("*") if f.is_file())
        rt.destroy()
    med = statistics.median
    print(f"{cli.model_size} checkpoint {size / 2**20:.0f} MiB, median of {cli.repeats}")
    print(f"save: {med(save_s):.2f} s without checksums, {med(save_s) + med(manifest_s):.2f} s with "
          f"(+{med(manifest_s):.2f} s, {100 * med(manifest_s) / med(save_s):.0f}%)")
    print(f"load: {med(load_s):.2f} s without verification, {med(load_s) + med(verify_s):.2f} s with "
          f"(+{med(verify_s):.2f} s, {100 * med(verify_s) / med(load_s):.0f}%)")
    print(f"CRC-32 rate: {size / 2**20 / med(verify_s):.0f} MiB/s")


if __name__ == "__main__":
    main()
