"""The CPU adapter: RNG tracker semantics and megatron pieces that assume CUDA."""
import pytest
import torch

from tinyllm_mcore.runtime import cpu


def test_rng_tracker_fork_is_isolated_and_reproducible():
    tracker = cpu.CpuRNGStatesTracker()
    tracker.add("model-parallel-rng", 123)
    torch.manual_seed(0)
    outside_before = torch.rand(3)
    torch.manual_seed(0)
    with tracker.fork():
        a = torch.rand(3)
    outside_after = torch.rand(3)
    assert torch.equal(outside_before, outside_after)  # the fork does not disturb the default stream
    with tracker.fork():
        b = torch.rand(3)
    assert not torch.equal(a, b)  # the tracked stream advances
    fresh = cpu.CpuRNGStatesTracker()
    fresh.add("model-parallel-rng", 123)
    with fresh.fork():
        assert torch.equal(torch.rand(3), a)
    with pytest.raises(Exception, match="already exists"):
        fresh.add("other", 123)


def test_activate_makes_megatron_cuda_points_cpu():
    assert not torch.cuda.is_available()
    assert cpu.activate() and cpu.activate()  # idempotent
    from megatron.core.optimizer import clip_grads
    from megatron.core.pipeline_parallel import schedules

    assert schedules.torch.zeros([], device="cuda").device.type == "cpu"
    assert torch.cuda.current_device() == torch.device("cpu")
    # clip-grad asserted torch.cuda.FloatTensor; now it scales CPU fp32 grads in place
    p = torch.nn.Parameter(torch.ones(4))
    p.grad = torch.full((4,), 2.0)
    clip_grads.clip_grad_by_total_norm_fp32([p], max_norm=1.0, total_norm=4.0)
    assert torch.allclose(p.grad, torch.full((4,), 0.5), atol=1e-5)
    assert cpu.config_overrides() == {"batch_p2p_comm": False, "moe_token_dispatcher_type": "allgather"}
    assert p.type() == "torch.FloatTensor"  # the type-name shim is scoped to the optimizer calls
