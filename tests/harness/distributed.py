"""The one way tests run code on several ranks (CPU, gloo): `run_ranks` starts the processes, `tests.harness.worker`
is what each of them runs.

Usage (the test is marked `@pytest.mark.distributed`; `pytest -m "not distributed"` leaves it out):

    from tests.harness.distributed import run_ranks

    per_rank = run_ranks("tests.model.moe_worker:case", nproc=2, argv=[...])       # [rank 0's return, rank 1's]
    per_rank = run_ranks("tests.model.moe_worker:case", nproc=2, cases={"tp2": {"argv": [...]}, "ep2": {...},
                         "logits": ("tests.model.moe_worker:inference_logits", {"load": ...})})
    per_rank[0]["tp2"]                                                             # {case name: return value}

The function runs in every rank with the keyword arguments (JSON values) and returns something JSON-able. The harness
owns the rest: the gloo process group (started before the function, destroyed at the end), megatron's parallel state
(destroyed after every case, so one launch - one ~4 s megatron import - covers many layouts), the results, a timeout
that kills every process it started, and the error: the failing rank's output tail. Cases must leave the process
group alone (no `rt.destroy()`): re-creating it under gloo can hang.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from tinyllm_mcore.runtime.files import free_port

REPO = Path(__file__).resolve().parents[2]
WORKER_MODULE = "tests.harness.worker"
# A test process may itself run under a launcher: its rendezvous must not leak into the ranks it starts.
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
                    "TORCHELASTIC_RUN_ID", "TORCHELASTIC_USE_AGENT_STORE", "SLURM_PROCID", "SLURM_NTASKS",
                    "SLURM_LOCALID")
LOG_TAIL = 6000

# Set by tests/conftest.py for the test being set up or run: a multi-process run from a test without the marker
# fails, so `-m "not distributed"` really runs only in-process tests.
current_test_is_marked = None


class RanksFailed(AssertionError):
    """A rank exited with an error or the run timed out; the message carries the output tail."""


def run_ranks(target: str | None, nproc: int = 1, *, cases: dict[str, dict | tuple[str, dict]] | None = None,
              launcher: str = "spawn", timeout: float = 600, python: str = sys.executable,
              env: dict[str, str] | None = None, **kwargs) -> list:
    """Run `package.module:function` on `nproc` ranks; return each rank's result, indexed by rank.

    Without `cases`: each rank's result is `function(**kwargs)`. With `cases` ({name: keyword arguments}): each
    rank's result is {name: function(**{**kwargs, **case})}, the cases run in order in one launch; a case given as
    ("package.module:function", keyword arguments) calls that function instead of `target`.
    `launcher`: "spawn" starts the ranks directly (RANK/WORLD_SIZE/MASTER_* set here; the cheaper default),
    "torchrun" runs them under `python -m torch.distributed.run` as a user's job does.
    `python` picks the interpreter (another environment, for the cross-version checkpoint test); `env` adds variables.
    """
    if current_test_is_marked is False:
        raise RuntimeError(f"{os.environ.get('PYTEST_CURRENT_TEST', 'this test')} starts ranks: mark it "
                           "@pytest.mark.distributed")
    if launcher not in ("spawn", "torchrun"):
        raise ValueError(f"launcher must be 'spawn' or 'torchrun', not {launcher!r}")
    with tempfile.TemporaryDirectory(prefix="ranks_") as tmp:
        tmp = Path(tmp)
        spec = tmp / "spec.json"
        spec.write_text(json.dumps({"target": target, "kwargs": kwargs, "cases": cases, "out_dir": str(tmp)}))
        base_env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
        # one thread per rank, as torchrun gives its workers: 1- and 2-process runs reduce in the same order
        base_env.update(OMP_NUM_THREADS="1", **(env or {}))
        port = free_port()
        if launcher == "torchrun":
            cmd = [python, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={port}",
                   "-m", WORKER_MODULE, str(spec)]
            processes = [_start(cmd, base_env, tmp / "torchrun.log")]
        else:
            processes = [_start([python, "-m", WORKER_MODULE, str(spec)],
                                {**base_env, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
                                 "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)},
                                tmp / f"rank{rank}.log")
                         for rank in range(nproc)]
        _wait(processes, timeout, f"{target} on {nproc} rank(s) ({launcher})")
        return [json.loads((tmp / f"rank{rank}.json").read_text()) for rank in range(nproc)]


def _start(cmd: list[str], env: dict[str, str], log: Path) -> tuple[subprocess.Popen, Path]:
    with open(log, "w") as out:  # the child keeps its own descriptor; files, not pipes, so nothing blocks on a full pipe
        return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True), log


def _wait(processes: list[tuple[subprocess.Popen, Path]], timeout: float, what: str) -> None:
    """Until all exit 0. On the first failure or at the timeout every process started (and its children: torchrun
    puts its workers in sessions of their own) is killed, and the failing rank's output is raised."""
    deadline = time.monotonic() + timeout
    try:
        while True:
            codes = [p.poll() for p, _ in processes]
            failed = [(p, log) for (p, log), code in zip(processes, codes) if code not in (None, 0)]
            if failed:
                p, log = failed[0]
                raise RanksFailed(f"{what}: {log.stem} exited with {p.returncode}\n{_tail(log)}")
            if all(code == 0 for code in codes):
                return
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {log.stem}\n{_tail(log, LOG_TAIL // len(processes))}" for _, log in processes)
                raise RanksFailed(f"{what}: timed out after {timeout:.0f} s\n{logs}")
            time.sleep(0.1)
    finally:
        _kill_all([p for p, _ in processes])


def _kill_all(processes: list[subprocess.Popen]) -> None:
    victims = []
    for p in processes:
        if p.poll() is None:
            try:
                victims += [psutil.Process(p.pid), *psutil.Process(p.pid).children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
    for v in victims:
        try:
            v.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(victims, timeout=10)
    for p in processes:
        p.wait()  # reaped: no zombies either


def _tail(log: Path, chars: int = LOG_TAIL) -> str:
    return log.read_text(errors="replace")[-chars:]

