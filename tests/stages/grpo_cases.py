"""GRPO runs for `tests.harness.distributed.run_ranks`: the same checkpoint and the same rollouts at several layouts.

`fixed_responses` stands in for the decoder: row g of global prompt i gets one of a few answers (right, off by one,
off by ten, no number), picked from (i, g) alone — so every layout trains on identical rollouts with rewards that
differ within groups, and a layout comparison measures the training step, not sampling noise."""
from __future__ import annotations

from pathlib import Path

from tests.harness import arithmetic as data

# --make-vocab-size-divisible-by 64: the padded vocabulary is then 384 rows at TP1 and TP2 alike (128 would pad to
# 384 and 512; padding rows take part in the softmax, as in Megatron-LM, so the grad norms would differ)
RUN_FLAGS = ("--make-vocab-size-divisible-by", "64", "--micro-batch-size", "4", "--global-batch-size", "32", "--group-size", "8", "--max-new-tokens", "6",
             "--lr", "1e-3", "--log-interval", "1", "--max-zero-accuracy-intervals", "0", "--eval-interval", "1000")


def fixed_responses(ctx, prompts, first_prompt, group_size, greedy):
    run, tokenizer = ctx.stage_state, ctx.tokenizer
    rows = []
    for p in range(len(prompts)):
        answer = int(run.source.train_item(first_prompt + p).answer)
        for g in range(group_size):
            choice = (first_prompt * 7 + p * 3 + g * 5) % 4
            text = [str(answer), str(answer + 1), str(answer - 10), "no"][choice]
            rows.append(tokenizer.tokenize_content(text) + [tokenizer.eos])
    return rows


def grpo_steps(load: str, flags: list[str], iterations: int, save: str | None = None, resume: bool = False,
               ref_load: str | None = None, real_rollouts: bool = False) -> list[dict]:
    """Every trained iteration's record (reports, metrics, grad norm); `real_rollouts`: the stage's own sampler."""
    from tinyllm_mcore.stages import grpo
    from tinyllm_mcore.training.loop import parse_args, train

    stage = grpo.STAGE if real_rollouts else grpo.make_stage(sampler=fixed_responses)
    start = ["--load", load] if resume else ["--load", load, "--finetune"]
    extra = (["--save", save] if save else []) + (["--kl-beta", "0.1", "--ref-load", ref_load] if ref_load else [])
    args = parse_args(stage, data.common_flags(*data.TASK_FLAGS, *RUN_FLAGS, "--train-iters", str(iterations),
                                               *start, *extra, *flags))
    return [r for r in train(stage, args, data.tokenizer())["history"] if r["split"] == "train"]


def save_path(out: str, name: str) -> str:
    return str(Path(out) / name)
