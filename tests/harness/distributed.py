"""Launching multi-process test workers: a worker script runs several configurations under one torchrun launch."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_worker(worker, tmp_path, name: str, runs: list, nproc: int, timeout: int = 600,
               python: str = sys.executable) -> dict:
    """Write `runs` as JSON, run `worker RUNS OUT` (under torchrun when nproc > 1), return the JSON it wrote.

    `python` picks the interpreter (another environment, for the cross-version checkpoint test)."""
    runs_file, out_file = tmp_path / f"{name}_runs.json", tmp_path / f"{name}_out.json"
    runs_file.write_text(json.dumps(runs))
    launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
                                      f"--master-port={free_port()}"]
    # run as a module from the repository root, so the worker imports `tests.*` without editing sys.path
    module = ".".join(Path(worker).resolve().relative_to(REPO).with_suffix("").parts)
    cmd = [python, *launcher, "-m", module, str(runs_file), str(out_file)]
    # one thread per process, as torchrun gives its workers: single- and multi-process runs reduce in the same order
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(out_file.read_text())
