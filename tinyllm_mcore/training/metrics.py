"""Throughput, MFU and the metric sinks (stdout, TensorBoard, a JSONL file for reports and plots).

MFU = achieved model FLOP/s / (peak FLOP/s per device × devices). Model FLOPs per token are
`model.flops_per_token` (matmuls only: 6 × matmul params + 12 × layers × seq × hidden for attention, counted as in
Megatron-LM/PaLM without discounting the causal mask). The peak is a known datasheet figure for common GPUs (dense
bf16), `--peak-tflops` when given, or on CPU a measured matmul peak for the training dtype.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

# Dense (no sparsity) bf16/fp16 tensor-core peaks, TFLOP/s.
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0,
                   "A10": 125.0, "V100": 125.0, "4090": 165.0}


def measured_matmul_tflops(dtype: torch.dtype = torch.float32, n: int = 1024, repeats: int = 8) -> float:
    """Best-of-N square matmul throughput on this device: the practical peak for MFU on CPUs."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # A private generator: drawing from the global one would shift dropout masks after the first log, and a resumed
    # run (which measures at a different iteration) would no longer repeat the uninterrupted one.
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, dtype=dtype, device=device, generator=generator)
    b = torch.randn(n, n, dtype=dtype, device=device, generator=generator)
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e12


def peak_tflops(dtype: torch.dtype, override: float | None = None) -> float:
    if override:
        return override
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, value in GPU_PEAK_TFLOPS.items():
            if key in name:
                return value if dtype != torch.float32 else value / 2  # TF32 is half the bf16 rate
        return measured_matmul_tflops(dtype if dtype != torch.float32 else torch.float32, n=4096)
    return measured_matmul_tflops(dtype)


class MetricsWriter:
    """Writes scalars to TensorBoard and a JSONL file (one record per log event); used on the logging rank."""

    def __init__(self, tensorboard_dir: str | None, jsonl_path: str | None):
        self.tb = None
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(tensorboard_dir)
        if jsonl_path:
            Path(jsonl_path).parent.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(jsonl_path, "a", encoding="utf-8") if jsonl_path else None

    def write(self, iteration: int, scalars: dict, prefix: str = "train") -> None:
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(f"{prefix}/{k}", v, iteration)
        if self.jsonl is not None:
            self.jsonl.write(json.dumps({"split": prefix, "iteration": iteration, **scalars}) + "\n")
            self.jsonl.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.jsonl is not None:
            self.jsonl.close()
