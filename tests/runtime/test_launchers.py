"""Multi-node launchers for real, each running `python -m tinyllm_mcore.stages.pretrain` on mock data: `torchrun --nnodes 2`
with two agents on this host (c10d rendezvous, as on two machines), and `srun` under the local Slurm cluster of
examples/local_slurm.sh with one task per rank (SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID; MASTER_ADDR/MASTER_PORT
exported), as 1 node x 1 task, 1 x 2 and 2 x 1. Every data-parallel world of 2 trains the same losses."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness.distributed import free_port
from tests.harness.slurm_cluster import local_slurm_fixture

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

local_slurm = pytest.fixture(scope="session")(local_slurm_fixture)

TRAIN = ["-m", "tinyllm_mcore.stages.pretrain", "--model-size", "tiny", "--mock-data", "--seq-length", "64",
         "--micro-batch-size", "1", "--global-batch-size", "2", "--train-iters", "3", "--log-interval", "1",
         "--lr", "1e-3"]


def losses(metrics: Path) -> list[float]:
    return [r["lm loss"] for r in map(json.loads, metrics.read_text().splitlines()) if r.get("split") == "train"]


def clean_env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "TORCHELASTIC_")) and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                                         "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", **{k: str(v) for k, v in extra.items()})  # the installed package: no PYTHONPATH
    return env


@pytest.fixture(scope="module")
def torchrun_two_agents(tmp_path_factory) -> list[float]:
    """Two torchrun agents on this host, each one process, meeting through c10d: the 2-node launch without Slurm."""
    out = tmp_path_factory.mktemp("torchrun_nnodes2")
    port = free_port()
    agents = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                                "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "two",
                                *TRAIN, "--metrics-jsonl", str(out / "metrics.jsonl")],
                               env=clean_env(), cwd=out, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
              for _ in range(2)]
    logs = []
    try:
        for agent in agents:
            logs.append(agent.communicate(timeout=300)[0])
    finally:
        for agent in agents:
            agent.kill()
    assert [a.returncode for a in agents] == [0, 0], "\n".join(logs)[-4000:]
    assert sum("DP=2" in log for log in logs) == 1  # printed by global rank 0, in one of the two agents
    result = losses(out / "metrics.jsonl")
    assert len(result) == 3
    return result


def test_torchrun_two_agents_c10d(torchrun_two_agents):
    assert all(loss > 0 for loss in torchrun_two_agents)


def test_srun_one_task_per_rank(local_slurm, torchrun_two_agents, tmp_path):
    curves = {}
    for nodes, tasks_per_node in ((1, 1), (1, 2), (2, 1)):
        metrics = tmp_path / f"{nodes}x{tasks_per_node}.jsonl"
        proc = subprocess.run(
            ["srun", f"--nodes={nodes}", f"--ntasks-per-node={tasks_per_node}", "--cpus-per-task=1",
             "--kill-on-bad-exit=1", sys.executable, *TRAIN, "--metrics-jsonl", str(metrics)],
            env=clean_env(SLURM_CONF=local_slurm.conf, MASTER_ADDR="127.0.0.1", MASTER_PORT=free_port()),
            cwd=tmp_path, capture_output=True, text=True, timeout=300)
        world = nodes * tasks_per_node
        assert proc.returncode == 0, f"srun {nodes}x{tasks_per_node}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        assert f"DP={world}," in proc.stdout
        curves[nodes, tasks_per_node] = losses(metrics)
    # the same data-parallel world, however it is launched, trains the same numbers
    assert curves[1, 2] == curves[2, 1] == torchrun_two_agents
    # one rank accumulating 2 micro-batches makes the same update, up to the order of the sums
    assert curves[1, 1] == pytest.approx(torchrun_two_agents, rel=1e-5)


def _single_node(launcher: list[str], out: Path) -> list[float]:
    proc = subprocess.run([sys.executable, *launcher, *TRAIN, "--metrics-jsonl", str(out / "metrics.jsonl")],
                          env=clean_env(), cwd=out, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return losses(out / "metrics.jsonl")


def test_single_node_launchers(torchrun_two_agents, tmp_path):
    """Plain `python -m` (a world of one on a private port), `torchrun --nproc-per-node 1` (its agent's store: this
    used to hang in init_process_group on a port nobody served) and `--nproc-per-node 2` (DP=2, the same losses as
    the two-agent launch)."""
    runs = {}
    for name, launcher in [("python", []),
                           ("torchrun1", ["-m", "torch.distributed.run", "--nproc-per-node", "1",
                                          "--master-port", str(free_port())]),
                           ("torchrun2", ["-m", "torch.distributed.run", "--nproc-per-node", "2",
                                          "--master-port", str(free_port())])]:
        (tmp_path / name).mkdir()
        runs[name] = _single_node(launcher, tmp_path / name)
    assert runs["python"] == runs["torchrun1"] and len(runs["python"]) == 3
    assert runs["torchrun2"] == torchrun_two_agents
