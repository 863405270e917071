"""Benchmark: the 92m preset (random weights) HF -> mcore TP2 -> HF, each direction as its own CLI process.

    python benchmarks/bench_convert.py [--preset 92m] [--workdir DIR]

Prints wall seconds and peak RSS of each conversion process next to the targets (< 5 s each way, peak RSS < 2x the
checkpoint size), and the same for a process that only imports what the converters import, since Python + torch +
megatron-core start-up is a fixed part of every run on this machine.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in MiB) of a child process, via wait4's rusage."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr.read().decode()[-2000:]}")
    return wall, usage.ru_maxrss / 1024


def make_random_hf(preset_name: str, out: Path) -> int:
    import torch
    from safetensors.torch import save_file

    from tinyllm_mcore.convert.hf_config import hf_config
    from tinyllm_mcore.convert.hf_folder import write_json
    from tinyllm_mcore.convert.mapping import hf_shapes
    from tinyllm_mcore.model.presets import get_preset

    preset = get_preset(preset_name)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    tensors = {k: torch.randn(s, generator=g) * 0.02 for k, s in hf_shapes(preset).items()}
    save_file(tensors, str(out / "model.safetensors"))
    write_json(out / "config.json", hf_config(preset, "qwen2"))  # the seed's architecture as the source
    return (out / "model.safetensors").stat().st_size


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="92m")
    p.add_argument("--workdir", default=None)
    args = p.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_convert_"))
    size = make_random_hf(args.preset, work / "hf")
    size_mib = size / 2**20
    print(f"{args.preset}: HF checkpoint {size_mib:.0f} MiB (fp32) in {work}")

    imports = [sys.executable, "-c", "import torch, safetensors, tinyllm_mcore.convert, "
               "tinyllm_mcore.model.build, tinyllm_mcore.model.gpt, megatron.core.dist_checkpointing"]
    base_s, base_rss = run(imports)
    to_mc = [sys.executable, str(REPO / "checkpoint_convert" / "hf_to_mcore.py"), "--load", str(work / "hf"),
             "--save", str(work / "mc"), "--tensor-model-parallel-size", "2", "--quiet"]
    to_hf = [sys.executable, str(REPO / "checkpoint_convert" / "mcore_to_hf.py"), "--load", str(work / "mc"),
             "--save", str(work / "back"), "--quiet"]
    rows = [("imports only", base_s, base_rss), ("HF -> mcore TP2", *run(to_mc)), ("mcore TP2 -> HF", *run(to_hf))]

    from safetensors import safe_open

    with safe_open(str(work / "hf" / "model.safetensors"), "pt") as a, \
            safe_open(str(work / "back" / "model.safetensors"), "pt") as b:
        # the llama export adds a zero o_proj bias per layer to the Qwen2 source's tensors
        added = {k for k in b.keys() if k.endswith("o_proj.bias")}
        identical = (set(a.keys()) == set(b.keys()) - added and not any(b.get_tensor(k).any() for k in added)
                     and all(a.get_tensor(k).equal(b.get_tensor(k)) for k in a.keys()))

    print(f"{'step':<18}{'seconds':>9}{'  (minus imports)':>18}{'peak RSS MiB':>14}{'  RSS/ckpt':>11}")
    for name, secs, rss in rows:
        extra = f"{secs - base_s:>18.2f}" if name != "imports only" else f"{'':>18}"
        print(f"{name:<18}{secs:>9.2f}{extra}{rss:>14.0f}{rss / size_mib:>11.2f}")
    print(f"targets: < 5 s each way, peak RSS < 2x checkpoint = {2 * size_mib:.0f} MiB; round trip bit-identical: "
          f"{identical}")
    print(json.dumps({"checkpoint_mib": round(size_mib, 1), **{n: {"s": round(s, 2), "rss_mib": round(r)}
                                                              for n, s, r in rows}}))
    return 0 if identical else 1


if __name__ == "__main__":
    raise SystemExit(main())
