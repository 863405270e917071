"""LoRA vs full fine-tuning: peak RSS and step time of the same run (pretrain stage, mock data) from one base checkpoint.

    python benchmarks/bench_lora.py --model-size 92m [--lora-rank 16] [--iters 4] [--seq-length 256]

The peer is full fine-tuning of the same model, measured in the same invocation. Each run is its own process (its
peak RSS is that process's ru_maxrss); the step time is the median over the iterations after the first, from the
loop's own tokens/s (--metrics-jsonl, logged every iteration). One process, CPU or one GPU; GPU memory is reported
as torch's peak allocation when CUDA is present.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def child(argv: list[str], result: str) -> None:
    import torch

    from tinyllm_mcore.runtime import distributed as rt
    from tinyllm_mcore.stages.pretrain import STAGE
    from tinyllm_mcore.training.loop import parse_args, train

    out = train(STAGE, parse_args(STAGE, argv))
    optimizer = out.get("optimizer")
    trained = sum(p.numel() for g in optimizer.param_groups for p in g["params"]) if optimizer else 0
    peak_gpu = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    rt.destroy()
    Path(result).write_text(json.dumps({"optimized_params": trained, "peak_gpu_bytes": peak_gpu}))


def run(argv: list[str], tmp: Path, name: str) -> dict:
    result = tmp / f"{name}.json"
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
    from tinyllm_mcore.runtime.files import free_port

    env["MASTER_PORT"] = str(free_port())
    proc = subprocess.Popen([sys.executable, __file__, "--child", json.dumps(argv), str(result)], env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"error: the {name} run failed (exit status {status})")
    record = json.loads(result.read_text())
    record["peak_rss_mib"] = usage.ru_maxrss / 1024  # Linux: KiB
    return record


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-size", default="92m")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--iters", type=int, default=4)
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    cli = p.parse_args()
    if cli.child:
        return child(json.loads(cli.child[0]), cli.child[1])
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        common = ["--model-size", cli.model_size, "--mock-data", "--seq-length", str(cli.seq_length),
                  "--micro-batch-size", str(cli.micro_batch_size), "--global-batch-size", str(cli.micro_batch_size),
                  "--lr-warmup-iters", "0", "--log-interval", "1"]
        run([*common, "--train-iters", "0", "--save", str(tmp / "base")], tmp, "base")
        results = {}
        for name, extra in (("full", []), ("lora", ["--lora-rank", str(cli.lora_rank)])):
            metrics = tmp / f"{name}.jsonl"
            results[name] = run([*common, "--train-iters", str(cli.iters), "--load", str(tmp / "base"),
                                 "--finetune", "--metrics-jsonl", str(metrics), *extra], tmp, name)
            rates = [json.loads(line)["tokens_per_s"] for line in metrics.read_text().splitlines()
                     if "tokens_per_s" in json.loads(line)][1:]
            tokens = cli.seq_length * cli.micro_batch_size
            results[name]["step_s"] = statistics.median(tokens / r for r in rates) if rates else float("nan")
    full, lora = results["full"], results["lora"]
    print(f"{cli.model_size}, seq {cli.seq_length} x micro-batch {cli.micro_batch_size}, {cli.iters} iterations "
          f"(step time: median after the first)")
    print(f"{'':24}{'full fine-tuning':>18}{f'LoRA r={cli.lora_rank}':>18}")
    print(f"{'optimized parameters':24}{full['optimized_params']:>18,}{lora['optimized_params']:>18,}")
    print(f"{'peak RSS (MiB)':24}{full['peak_rss_mib']:>18.0f}{lora['peak_rss_mib']:>18.0f}")
    if full["peak_gpu_bytes"] is not None:
        print(f"{'peak GPU alloc (MiB)':24}{full['peak_gpu_bytes'] / 2**20:>18.0f}"
              f"{lora['peak_gpu_bytes'] / 2**20:>18.0f}")
    print(f"{'step time (s)':24}{full['step_s']:>18.3f}{lora['step_s']:>18.3f}")


if __name__ == "__main__":
    main()
