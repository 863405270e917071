"""The supported megatron-core range: declared once, and checkpoints that cross it.

The cross-version test needs a second environment with the other end of the range (CI's Python 3.12 leg has
megatron-core 0.19.x, the 3.11 one 0.16.1): TINYLLM_OTHER_PYTHON names its interpreter; without it the test skips.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.version import Version

from tests.harness.distributed import run_ranks
from tests.harness.progression_data import progression_datasets
from tinyllm_mcore.training.batches import lm_forward_step
from tinyllm_mcore.runtime import compat
from tinyllm_mcore.runtime import distributed as rt
from tinyllm_mcore.checkpoint import io as ckpt
from tinyllm_mcore.training.loop import Stage, parse_args, train

REPO = Path(__file__).resolve().parents[2]
STAGE = Stage("pretrain", progression_datasets, lm_forward_step)
OTHER_PYTHON = os.environ.get("TINYLLM_OTHER_PYTHON")


def test_setup_py_declares_the_tested_range_and_it_holds_the_installed_version():
    requirement = re.search(r'"megatron-core>=([\w.]+),<([\w.]+)"', (REPO / "setup.py").read_text())
    assert requirement, "setup.py must pin megatron-core to a closed range"
    oldest, first_untested = requirement.groups()
    assert oldest == compat.OLDEST_TESTED
    major, minor = compat.NEWEST_TESTED_SERIES.split(".")
    assert first_untested == f"{major}.{int(minor) + 1}"
    assert compat.is_supported(compat.megatron_core_version())
    assert not compat.is_supported(first_untested + ".0") and not compat.is_supported("0.16.0")


def test_checkpoint_layout_is_readable_by_every_supported_version(tmp_path):
    """A real save: common.pt present (what 0.16 reads), the writing version recorded (megatron's deprecation
    notice for GPTModel stays off the terminal like every library warning: tests/runtime/test_quiet.py). Without common.pt (0.19's own layout) 0.19 still reads it and older versions say
    why they cannot in one line; without metadata.json (a save that died) it is not taken for a checkpoint."""
    root = tmp_path / "ckpt"
    args = parse_args(STAGE, ["--model-size", "tiny", "--seq-length", "32", "--micro-batch-size", "2",
                              "--train-iters", "1", "--lr-warmup-iters", "0", "--mock-data", "--save", str(root)])
    try:
        train(STAGE, args)
    finally:
        rt.destroy()
    path = ckpt.resolve_load_dir(root)
    assert (path / compat.COMMON_STATE_FILE).is_file()
    assert ckpt.read_common(path)[compat.VERSION_KEY] == compat.megatron_core_version()
    (path / compat.COMMON_STATE_FILE).unlink()
    if Version(compat.megatron_core_version()).release >= compat.COMMON_STATE_IN_TORCH_DIST_SINCE:
        assert ckpt.read_common(ckpt.resolve_load_dir(root))["iteration"] == 1
    else:
        with pytest.raises(ckpt.CheckpointError, match=r"written by megatron-core >= 0\.19 without common\.pt"):
            ckpt.resolve_load_dir(root)
    (path / compat.CONFIG_FILE).unlink()
    assert not compat.is_complete_dist_checkpoint(path)


def _other_megatron_version() -> str:
    code = "import importlib.metadata as m; print(m.version('megatron-core'))"
    return subprocess.run([OTHER_PYTHON, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.skipif(not OTHER_PYTHON, reason="TINYLLM_OTHER_PYTHON (an environment with another megatron-core) unset")
def test_checkpoints_cross_megatron_core_versions(tmp_path):
    """Save under one megatron-core and resume under the other, and back, at DP=2 with the distributed optimizer in
    both checkpoint formats: the resumed losses equal those of resuming the same checkpoint under the version that
    wrote it, exactly (and training itself is identical under both versions)."""
    here, there = compat.megatron_core_version(), _other_megatron_version()
    assert compat.is_supported(there), f"{OTHER_PYTHON} has megatron-core {there}, outside the supported range"
    common = ["--model-size", "tiny", "--seq-length", "32", "--global-batch-size", "4", "--micro-batch-size", "2",
              "--lr", "2e-3", "--min-lr", "2e-4", "--log-interval", "1", "--lr-warmup-iters", "1",
              "--use-distributed-optimizer"]
    half, full = common + ["--train-iters", "3"], common + ["--train-iters", "6"]
    dp_here, full_here, dp_there = tmp_path / "dp_here", tmp_path / "full_here", tmp_path / "dp_there"

    def launch(runs, python):
        out = run_ranks("tests.training.loop_worker:train_run", nproc=2, python=python,
                        cases={run["name"]: {"argv": run["argv"]} for run in runs})[0]
        return {run: result["train"] for run, result in out.items()}

    saved_here = launch([
        {"name": "dp", "argv": half + ["--save", str(dp_here)]},
        {"name": "full", "argv": half + ["--save", str(full_here), "--dist-ckpt-optim-fully-reshardable"]},
    ], python=sys.executable)
    there_runs = launch([
        {"name": "dp", "argv": half + ["--save", str(dp_there)]},
        {"name": "resume_own", "argv": full + ["--load", str(dp_there)]},
        {"name": "resume_dp", "argv": full + ["--load", str(dp_here)]},
        {"name": "resume_full", "argv": full + ["--load", str(full_here)]},
    ], python=OTHER_PYTHON)
    back = launch([
        {"name": "resume_own", "argv": full + ["--load", str(dp_here)]},
        {"name": "resume_dp", "argv": full + ["--load", str(dp_there)]},
    ], python=sys.executable)

    assert saved_here["dp"] == there_runs["dp"] and len(saved_here["dp"]) == 3, (here, there)
    assert len(back["resume_own"]) == 3
    assert there_runs["resume_dp"] == back["resume_own"], f"saved with megatron-core {here}, resumed with {there}"
    assert there_runs["resume_full"] == back["resume_own"], f"saved with megatron-core {here}, resumed with {there}"
    assert back["resume_dp"] == there_runs["resume_own"], f"saved with megatron-core {there}, resumed with {here}"
