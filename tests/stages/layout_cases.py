"""Stage runs for `tests.harness.distributed.run_ranks`: the same weights and data at several parallel layouts.

`make_checkpoints` (one rank) writes two differently seeded initial LM checkpoints, "policy" and "reference"; DPO
then starts from them (the rewards are non-zero) and the reward model takes "policy"'s trunk (--init-from).
"""
from pathlib import Path

from tests.harness import post_training_data as data

RUN_FLAGS = ("--micro-batch-size", "1", "--global-batch-size", "8")


def make_checkpoints(out: str) -> None:
    from tinyllm_mcore.stages import sft
    from tinyllm_mcore.training.loop import parse_args, train

    init = sft.make_stage(data.sft_provider(data.corpus().sft[:4]))
    for name, seed in (("policy", "11"), ("reference", "22")):
        args = parse_args(init, data.common_flags(out, "--train-iters", "0", "--save", str(Path(out) / name),
                                                  "--micro-batch-size", "1", "--seed", seed))
        train(init, args, data.tokenizer())


def dpo_first_step(out: str, flags: list[str]) -> dict:
    """The first iteration's reports (before any update) and grad norm."""
    from tinyllm_mcore.stages import dpo
    from tinyllm_mcore.training.loop import parse_args, train

    stage = dpo.make_stage(data.preference_provider(data.corpus().preference[:8]))
    args = parse_args(stage, data.common_flags(
        out, "--train-iters", "1", "--load", str(Path(out) / "policy"), "--finetune", "--ref-load",
        str(Path(out) / "reference"), *RUN_FLAGS, "--beta", "0.5", "--label-smoothing", "0.1", *flags))
    return train(stage, args, data.tokenizer())["history"][0]


def reward_steps(out: str, flags: list[str], iterations: int) -> list[dict]:
    """Every iteration's reports and grad norm of a reward model initialised from the policy's trunk."""
    from tinyllm_mcore.stages import reward
    from tinyllm_mcore.training.loop import parse_args, train

    stage = reward.make_stage(data.preference_provider(data.corpus().preference[:16]))
    args = parse_args(stage, data.common_flags(
        out, "--train-iters", str(iterations), "--init-from", str(Path(out) / "policy"), *RUN_FLAGS,
        "--lr", "1e-3", "--lr-warmup-iters", "0", *flags))
    return [r for r in train(stage, args, data.tokenizer())["history"] if r["split"] == "train"]
