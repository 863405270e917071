"""The loop's optimizer runs torch's fused AdamW kernel where megatron falls back to torch (no TE / Apex), also
after its state is loaded from a checkpoint saved without the flag; a resumed run repeats the uninterrupted one."""
import pytest
import torch

from tests.harness.progression_data import progression_datasets
from tinyllm_mcore.runtime import distributed as rt
from tinyllm_mcore.training.batches import lm_forward_step
from tinyllm_mcore.training.loop import Stage, parse_args, setup, torch_adam_optimizers, train, use_fused_adam

ARGS = ["--model-size", "tiny", "--seq-length", "32", "--micro-batch-size", "2", "--lr", "1e-3",
        "--lr-warmup-iters", "1", "--log-interval", "1", "--mock-data"]
STAGE = Stage("pretrain", progression_datasets, lm_forward_step)


def groups(optimizer):
    found = [g for o in torch_adam_optimizers(optimizer) for g in o.param_groups]
    assert found, "no torch Adam inside the megatron optimizer"
    return found


@pytest.mark.parametrize("precision", [[], ["--bf16"]], ids=["fp32", "bf16"])
def test_setup_uses_the_fused_kernel(precision):
    try:
        run = setup(STAGE, parse_args(STAGE, ARGS + ["--train-iters", "2"] + precision))
        assert all(g["fused"] is True and g["foreach"] is False for g in groups(run.optimizer))
    finally:
        rt.destroy()


def test_resume_from_unfused_state_is_fused_again_and_trains(tmp_path):
    try:
        out = train(STAGE, parse_args(STAGE, ARGS + ["--train-iters", "4", "--exit-interval", "2",
                                                 "--save", str(tmp_path / "ck")]))
        first = [r["lm loss"] for r in out["history"] if r["split"] == "train"]
    finally:
        rt.destroy()
    try:
        run = setup(STAGE, parse_args(STAGE, ARGS + ["--train-iters", "4", "--load", str(tmp_path / "ck")]))
        for group in groups(run.optimizer):  # as a checkpoint from before the switch would load
            group["fused"], group["foreach"] = None, None
        use_fused_adam(run.optimizer)
        assert all(g["fused"] is True for g in groups(run.optimizer))
        state = run.optimizer.state_dict()
        saved_groups = state["optimizer"]["param_groups"] if "optimizer" in state else state["param_groups"]
        assert all(g["fused"] is True for g in saved_groups)  # what the next save writes
    finally:
        rt.destroy()
    try:
        out = train(STAGE, parse_args(STAGE, ARGS + ["--train-iters", "4", "--load", str(tmp_path / "ck")]))
        resumed = [r["lm loss"] for r in out["history"] if r["split"] == "train"]
    finally:
        rt.destroy()
    try:
        out = train(STAGE, parse_args(STAGE, ARGS + ["--train-iters", "4"]))
        whole = [r["lm loss"] for r in out["history"] if r["split"] == "train"]
    finally:
        rt.destroy()
    assert first == whole[:2] and len(resumed) == 2
    assert torch.allclose(torch.tensor(resumed), torch.tensor(whole[2:]), rtol=0, atol=1e-6)
