"""Runs in every rank for the training-loop tests, through tests.harness.distributed.run_ranks: one training run on
the progression data (--mock-data) per case. The harness resets megatron's parallel state between cases, so one
launch (one ~4 s megatron import) covers many layouts.
"""
from tests.harness.progression_data import progression_datasets
from tinyllm_mcore.training.loop import Stage, parse_args, train
from tinyllm_mcore.training.batches import lm_forward_step

STAGE = Stage("pretrain", progression_datasets, lm_forward_step)


def train_run(argv: list[str], expect_error: bool = False) -> dict:
    """{"train": [lm loss per logged iteration], "valid": [...]}; a run expected to be refused returns
    {"error": its one-line message}."""
    from tinyllm_mcore.checkpoint.io import CheckpointError

    try:
        out = train(STAGE, parse_args(STAGE, argv + ["--mock-data"]))
    except CheckpointError as e:
        if not expect_error:
            raise
        return {"error": str(e)}
    return {"train": [r["lm loss"] for r in out["history"] if r["split"] == "train"],
            "valid": [r["lm loss"] for r in out["history"] if r["split"] == "valid"]}
