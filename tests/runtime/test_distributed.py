"""Launch detection, layout validation, and a single-process world that leaves the environment alone."""
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
