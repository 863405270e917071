"""The worker harness itself: results per rank and per case, a rank's failure raised with its output, and a hung run
killed whole at the timeout (no process left behind)."""
import time

import psutil
import pytest
import torch

from tests.harness.distributed import RanksFailed, run_ranks


def sum_of_ranks(scale: int = 1) -> dict:
    """Runs in every rank: an all-reduce over the harness's gloo group."""
    import torch.distributed as dist

    total = torch.tensor([float(dist.get_rank() * scale)])
    dist.all_reduce(total)
    return {"rank": dist.get_rank(), "world": dist.get_world_size(), "sum": total.item()}


def scaled_rank(scale: int) -> int:
    import torch.distributed as dist

    return dist.get_rank() * scale


def fail_on_rank_one() -> None:
    import torch.distributed as dist

    if dist.get_rank() == 1:
        raise ValueError("rank one refuses")
    dist.barrier()  # rank 0 waits for a partner that is gone: the harness must stop it


def hang(pid_file: str) -> None:
    import os

    with open(f"{pid_file}.{os.getpid()}", "w"):
        pass
    time.sleep(600)


@pytest.mark.distributed
@pytest.mark.parametrize("launcher", ["spawn", "torchrun"])
def test_results_per_rank_and_per_case(launcher):
    per_rank = run_ranks(f"{__name__}:sum_of_ranks", nproc=2, launcher=launcher, scale=3,
                         cases={"three": {}, "ten": {"scale": 10}, "scaled": (f"{__name__}:scaled_rank", {})})
    assert per_rank == [
        {"three": {"rank": 0, "world": 2, "sum": 3.0}, "ten": {"rank": 0, "world": 2, "sum": 10.0}, "scaled": 0},
        {"three": {"rank": 1, "world": 2, "sum": 3.0}, "ten": {"rank": 1, "world": 2, "sum": 10.0}, "scaled": 3}]


@pytest.mark.distributed
def test_a_failing_rank_is_raised_with_its_traceback_and_the_others_stopped():
    start = time.monotonic()
    with pytest.raises(RanksFailed, match=r"(?s)rank1 exited with 1.*ValueError: rank one refuses"):
        run_ranks(f"{__name__}:fail_on_rank_one", nproc=2, timeout=120)
    assert time.monotonic() - start < 60


@pytest.mark.distributed
def test_timeout_kills_every_process(tmp_path):
    """Under torchrun: its workers run in sessions of their own, so killing torchrun alone would leave them."""
    with pytest.raises(RanksFailed, match="timed out after 20 s"):
        run_ranks(f"{__name__}:hang", nproc=1, launcher="torchrun", timeout=20, pid_file=str(tmp_path / "pid"))
    pids = [int(p.suffix[1:]) for p in tmp_path.glob("pid.*")]
    assert len(pids) == 1  # the rank was running when the time was up
    assert not [pid for pid in pids if psutil.pid_exists(pid)]


def test_an_unmarked_test_may_not_start_ranks():
    with pytest.raises(RuntimeError, match="mark it @pytest.mark.distributed"):
        run_ranks(f"{__name__}:sum_of_ranks", nproc=1)
