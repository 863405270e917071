"""Run by the harness (tests.harness.distributed.run_ranks) in every rank: one real pretrain run per case, as the CLI
runs it (its parser, its tokenizer loading, the loop) but leaving the harness's process group alone."""
from tinyllm_mcore.stages.pretrain import STAGE
from tinyllm_mcore.training.batches import load_tokenizer
from tinyllm_mcore.training.loop import parse_args, train


def pretrain_run(argv: list[str]) -> dict:
    """{"train": the lm loss of every iteration}."""
    args = parse_args(STAGE, argv)
    out = train(STAGE, args, load_tokenizer(args))
    return {"train": [r["lm loss"] for r in out["history"] if r["split"] == "train"]}
