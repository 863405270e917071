"""The local two-node Slurm cluster of examples/local_slurm.sh, for the tests that submit real jobs.

`local_slurm` (a session fixture) uses a cluster that is already up (CI's .ci/run starts one and exports SLURM_CONF),
else starts one itself when it can (root, slurm-wlm and munge installed) and stops it at the end of the session.
Where neither works the tests skip with the reason; with TINYLLM_REQUIRE_SLURM=1 (set by CI) they fail instead.

Jobs are submitted with `sbatch --parsable` and followed with `scontrol show job` every half second: `sbatch --wait`
polls at 2, 8 and then 32-second steps, which would add up to half a minute to every job of the chain.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
LOCAL_SLURM = EXAMPLES / "local_slurm.sh"
DEFAULT_CONF = Path(os.environ.get("LOCAL_SLURM_DIR", "/tmp/tinyllm-slurm")) / "slurm.conf"
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
            "DEADLINE"}
# The CPU shape of a job on the local cluster: no GPUs, one CPU per process (the scripts ask for 8 GPUs x 8 CPUs).
CPU_JOB = ("--gpus-per-node=0", "--cpus-per-task=1")


def _unavailable(reason: str):
    if os.environ.get("TINYLLM_REQUIRE_SLURM") == "1":
        pytest.fail(f"TINYLLM_REQUIRE_SLURM=1 but no local Slurm cluster: {reason}")
    pytest.skip(f"no local Slurm cluster: {reason} (start one with `bash examples/local_slurm.sh start` as root)")


def _nodes_idle(conf: Path, wait_s: float = 0) -> bool:
    deadline = time.monotonic() + wait_s
    while True:
        proc = subprocess.run(["sinfo", "-h", "-N", "-o", "%N=%t"], env={**os.environ, "SLURM_CONF": str(conf)},
                              capture_output=True, text=True, timeout=30)
        if proc.returncode == 0 and sorted(set(proc.stdout.split())) == ["n1=idle", "n2=idle"]:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)


@dataclass
class Cluster:
    conf: Path

    def env(self, **overrides) -> dict[str, str]:
        """The submission environment: ours without Slurm job variables, the cluster's config, this Python."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
        env.pop("REPO", None)
        env.update(SLURM_CONF=str(self.conf), PYTHON=sys.executable, OMP_NUM_THREADS="1")
        env.update({k: str(v) for k, v in overrides.items()})
        return env

    def submit(self, script: str, *sbatch_args: str, env: dict, log_dir: Path) -> str:
        """sbatch from the repository root (the scripts find it from the submit directory); the job id."""
        proc = subprocess.run(["sbatch", "--parsable", f"--output={log_dir}/%x-%j.out", *sbatch_args,
                               str(EXAMPLES / script)], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, f"sbatch {script}: {proc.stderr}"
        return proc.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        proc = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=self.env(), capture_output=True,
                              text=True, timeout=30)
        assert proc.returncode == 0, proc.stderr
        return dict(re.findall(r"(\w+)=(\S*)", proc.stdout))

    def wait(self, job_id: str, timeout_s: float = 300, states=FINISHED) -> dict[str, str]:
        deadline = time.monotonic() + timeout_s
        while True:
            job = self.job(job_id)
            if job["JobState"] in states:
                return job
            if time.monotonic() > deadline:
                self.scontrol("cancel", job_id)
                pytest.fail(f"job {job_id} still {job['JobState']} after {timeout_s} s (cancelled)")
            time.sleep(0.5)

    def scontrol(self, *args: str) -> None:
        cmd = ["scancel", *args[1:]] if args[0] == "cancel" else ["scontrol", *args]
        proc = subprocess.run(cmd, env=self.env(), capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, f"{' '.join(cmd)}: {proc.stderr}"

    def run(self, script: str, *sbatch_args: str, env: dict, log_dir: Path, timeout_s: float = 300):
        """Submit, wait, and require JobState=COMPLETED ExitCode=0:0; (job fields, the job's log)."""
        job_id = self.submit(script, *sbatch_args, env=env, log_dir=log_dir)
        job = self.wait(job_id, timeout_s)
        log = job_log(job)
        assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), f"{script} job {job_id}: {job}\n{log}"
        return job, log


def job_log(job: dict[str, str]) -> str:
    path = Path(job["StdOut"])
    return path.read_text(errors="replace") if path.is_file() else f"(no log at {path})"


def local_slurm_fixture():
    """Body of the `local_slurm` session fixture (a generator): yields a Cluster."""
    for tool in ("sbatch", "scontrol", "sinfo"):
        if shutil.which(tool) is None:
            _unavailable(f"{tool} not installed")
    conf = Path(os.environ.get("SLURM_CONF", DEFAULT_CONF))
    if conf.is_file() and _nodes_idle(conf, wait_s=60):
        yield Cluster(conf)  # started by .ci/run or by hand: left running
        return
    if os.geteuid() != 0:
        _unavailable("not root, so the tests cannot start one")
    for daemon in ("slurmctld", "slurmd", "munged"):
        if shutil.which(daemon) is None:
            _unavailable(f"{daemon} not installed")
    env = {k: v for k, v in os.environ.items() if k != "SLURM_CONF"}
    proc = subprocess.run(["bash", str(LOCAL_SLURM), "start"], env=env, capture_output=True, text=True, timeout=180)
    if proc.returncode != 0:
        _unavailable(f"examples/local_slurm.sh start failed: {proc.stderr.strip()}")
    try:
        yield Cluster(Path(proc.stdout.strip().splitlines()[-1].removeprefix("export SLURM_CONF=")))
    finally:
        subprocess.run(["bash", str(LOCAL_SLURM), "stop"], env=env, capture_output=True, timeout=180)
