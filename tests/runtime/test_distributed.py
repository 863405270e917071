"""Launch detection, layout validation, a single-process world that leaves the environment alone, and rank 0's
result or error reaching every rank."""
import os

import pytest

from tinyllm_mcore.runtime import distributed as rt


def test_layout_checks_give_one_clear_line():
    assert rt.check_parallel_layout(8, 2, 2, num_attention_heads=8, num_layers=8) == 2
    cases = [((6, 2, 2, 8, 8), "world size 6 is not divisible by tensor-parallel 2 x pipeline-parallel 2"),
             ((4, 4, 1, 6, 6), "6 attention heads are not divisible by tensor-parallel size 4"),
             ((2, 1, 2, 8, 7), "7 layers are not divisible by pipeline-parallel size 2")]
    for args, message in cases:
        with pytest.raises(rt.ParallelConfigError, match=message):
            rt.check_parallel_layout(*args)
    with pytest.raises(rt.ParallelConfigError, match="virtual pipeline|virtual stage"):
        rt.check_parallel_layout(4, 1, 2, num_attention_heads=8, num_layers=8, vpp_layers=3)


def test_launch_from_torchrun_and_slurm_env(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"):
        monkeypatch.delenv(k, raising=False)
    assert rt.launch_from_env() == rt.Launch(0, 1, 0)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "16")
    monkeypatch.setenv("SLURM_LOCALID", "5")
    assert rt.launch_from_env() == rt.Launch(5, 16, 5)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert rt.launch_from_env() == rt.Launch(3, 4, 1)  # torchrun under srun: torchrun's view wins


def test_single_process_world_does_not_leak_rendezvous_env(monkeypatch):
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    rt.initialize()
    try:
        import torch.distributed as dist

        assert dist.get_world_size() == 1
        assert "MASTER_PORT" not in os.environ and "MASTER_ADDR" not in os.environ
    finally:
        rt.destroy()


class Refused(ValueError):
    """An error type of this module: a rank that did not raise it can still name it."""


def share_from_rank0() -> dict:
    """Run on each rank: what on_rank0_then_share gives this rank for a value, an error, a rank-0-only value."""
    import torch.distributed as dist

    rank, calls = dist.get_rank(), []

    def value():
        calls.append("value")
        return {"from": rank, "ids": [1, 2, 3]}

    def refuse():
        calls.append("refuse")
        raise Refused(f"{rank}: refused, one line")

    def local_error():
        class Local(ValueError):  # not importable on another rank: arrives as RuntimeError with its line
            pass
        raise Local("made inside a function")

    out = {"value": rt.on_rank0_then_share(value)}
    for name, fn in (("error", refuse), ("local_error", local_error)):
        try:
            rt.on_rank0_then_share(fn)
        except Exception as e:
            out[name] = [type(e).__name__, isinstance(e, Refused), str(e)]
    out["kept"] = rt.on_rank0_then_share(lambda: "lock", share_value=False)
    out["calls"] = calls
    return out


@pytest.mark.distributed
def test_rank0_result_or_error_reaches_every_rank():
    from tests.harness.distributed import run_ranks

    rank0, rank1 = run_ranks("tests.runtime.test_distributed:share_from_rank0", nproc=2, timeout=120)
    for out in (rank0, rank1):
        assert out["value"] == {"from": 0, "ids": [1, 2, 3]}
        assert out["error"] == ["Refused", True, "0: refused, one line"]
    assert rank0["local_error"] == ["Local", False, "made inside a function"]  # rank 0 raises the original
    assert rank1["local_error"] == ["RuntimeError", False, "made inside a function"]
    assert (rank0["kept"], rank1["kept"]) == ("lock", None)
    assert (rank0["calls"], rank1["calls"]) == (["value", "refuse"], [])  # fn runs on rank 0 only


def test_rank0_helper_without_a_process_group_just_calls():
    def refuse():
        raise Refused("alone")

    assert rt.on_rank0_then_share(lambda: 7) == 7
    with pytest.raises(Refused, match="alone"):
        rt.on_rank0_then_share(refuse)
