"""A non-finite loss skips the update (weights, optimizer and LR untouched), is reported, and aborts at the limit."""
import math

import pytest
import torch

from tests.harness.progression_data import progression_datasets
from tinyllm_mcore.training.batches import lm_forward_step
from tinyllm_mcore.runtime import distributed as rt
from tinyllm_mcore.checkpoint.io import unwrap
from tinyllm_mcore.training.loop import Stage, parse_args, train


def poisoned_stage(poisoned_calls):
    calls = {"n": 0}

    def forward_step(ctx, data_iterator, model):
        output, loss_fn = lm_forward_step(ctx, data_iterator, model)
        calls["n"] += 1
        poison = calls["n"] in poisoned_calls

        def loss(output_tensor):
            total, count, report = loss_fn(output_tensor)
            if poison:
                total = total * float("nan")
                report = {k: v * float("nan") for k, v in report.items()}
            return total, count, report

        return output, loss

    return Stage("pretrain", progression_datasets, forward_step)


ARGS = ["--model-size", "tiny", "--seq-length", "32", "--micro-batch-size", "2", "--lr", "1e-3",
        "--lr-warmup-iters", "1", "--log-interval", "1", "--mock-data"]


def test_non_finite_iterations_are_skipped(capsys):
    stage = poisoned_stage({3})
    try:
        out = train(stage, parse_args(stage, ARGS + ["--train-iters", "4", "--max-skipped-iters", "3"]))
        history = [r for r in out["history"] if r["split"] == "train"]
        assert out["skipped"] == 1
        assert math.isnan(history[2]["lm loss"]) and math.isnan(history[2]["grad_norm"])
        assert all(math.isfinite(r["lm loss"]) for i, r in enumerate(history) if i != 2)
        assert history[2]["lr"] == history[1]["lr"]  # the LR schedule did not advance on the skipped update
        assert "non-finite loss" in capsys.readouterr().out
    finally:
        rt.destroy()


def test_too_many_non_finite_iterations_abort():
    stage = poisoned_stage({2, 3})
    with pytest.raises(FloatingPointError, match="2 iterations had a non-finite loss"):
        try:
            train(stage, parse_args(stage, ARGS + ["--train-iters", "5", "--max-skipped-iters", "2"]))
        finally:
            rt.destroy()


def test_skipped_update_leaves_weights_unchanged():
    """Run 2 clean iterations, then a poisoned one: the weights after iteration 3 equal those after iteration 2."""
    stage = poisoned_stage({3})
    try:
        out = train(stage, parse_args(stage, ARGS + ["--train-iters", "3", "--exit-interval", "2"]))
        after_two = {n: p.detach().clone() for n, p in unwrap(out["chunks"][0]).named_parameters()}
    finally:
        rt.destroy()
    stage = poisoned_stage({3})
    try:
        out = train(stage, parse_args(stage, ARGS + ["--train-iters", "3"]))
        after_three = {n: p.detach() for n, p in unwrap(out["chunks"][0]).named_parameters()}
    finally:
        rt.destroy()
    for name in after_two:
        assert torch.equal(after_two[name], after_three[name]), name
