"""The worker harness itself: results per rank and per case, a rank's failure raised with its output, and a hung run
killed whole at the timeout (no process left behind)."""
import threading
import time
import uuid

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


def hang() -> None:
    time.sleep(600)


def processes_tagged(tag: str) -> list[psutil.Process]:
    """Processes whose environment carries `tag` (only this test's: other runs on the machine have other tags)."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("HARNESS_TEST_TAG") == tag:
                found.append(p)
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            pass
    return found


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
def test_timeout_kills_every_process():
    """Under torchrun: its workers run in sessions of their own, so killing torchrun alone would leave them."""
    tag, seen, done = uuid.uuid4().hex, set(), threading.Event()

    def watch():
        while not done.is_set():
            seen.update(p.pid for p in processes_tagged(tag))
            time.sleep(0.2)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with pytest.raises(RanksFailed, match="timed out after 10 s"):
            run_ranks(f"{__name__}:hang", nproc=1, launcher="torchrun", timeout=10, env={"HARNESS_TEST_TAG": tag})
    finally:
        done.set()
        watcher.join()
    assert len(seen) >= 2  # torchrun's agent and its worker were running when the time was up
    assert not processes_tagged(tag)


def test_an_unmarked_test_may_not_start_ranks():
    with pytest.raises(RuntimeError, match="mark it @pytest.mark.distributed"):
        run_ranks(f"{__name__}:sum_of_ranks", nproc=1)
