"""GRPO stage: `torchrun ... -m tinyllm_mcore.stages.grpo --load SFT_CKPT --finetune --task chain_sum ...`.

Group Relative Policy Optimization (Shao et al. 2024) with verifiable rewards, on the generic loop. Each step:

1. rollouts (`prepare_step`): this data-parallel rank takes its prompts of the step, samples `--group-size` G
   responses to each with the project's KV-cache decoder on the policy's current weights, in the run's own process
   groups (TP ranks sample alike, pipeline stages decode together: inference/rollout.py) — no second engine, no
   weight copy;
2. rewards from the verifiable source (data/verifiable_prompts.py: a reasoning-gym `--task` with its own scorer, or
   a `--prompts` jsonl scored by exact match or math-verify; one documented reward table) and group-relative
   advantages (model/losses.GroupAdvantages): a group whose rewards all tie has no signal and is left out of the
   loss (counted as `zero-variance groups`);
3. one update on the rows prompt + response (the loop's forward/backward, megatron's schedules, any layout): the
   clipped policy-gradient loss with a k3 KL to a frozen reference (`--kl-beta`; model/losses.grpo_loss), a token
   mean over the global batch.

Batch arithmetic: `--global-batch-size` counts sequences (prompts × G) and must split into whole groups on every
data-parallel rank, so advantages need no communication. A row is `prompt + response` right-padded to
`--seq-length`; its loss mask covers the response tokens (eos included) of rows whose group trains.

Which prompts and which random numbers: step k's global prompts are `k·P … (k+1)·P − 1` of the source (P prompts per
step, as the loop's consumed-samples counter says), data-parallel rank r takes the r-th slice, and sample g of
prompt i draws from its own generator seeded by (--seed, i, g). So rollouts depend on neither the layout nor the
batch split, and a resumed run continues exactly (the weights and the counter are in the checkpoint).

One update per rollout batch (on-policy): the PPO ratio is then 1 by construction, `--clip-eps` bounds nothing
and the clip fraction is 0 — the clipped form is the one that stays right when updates per rollout grow beyond one.

Validation (`--eval-interval`): greedy answers to the source's held-out prompts (never trained on), spread over the
data-parallel ranks; logged as `heldout accuracy` and `heldout reward`.

A run in which no response is correct for `--max-zero-accuracy-intervals` log intervals in a row stops with an error:
a model that never samples a right answer gets no learning signal (a flat curve otherwise says nothing).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import torch
import torch.distributed as dist

from tinyllm_mcore.model.losses import GroupAdvantages, grpo_loss
from tinyllm_mcore.training.batches import batch_to_device
from tinyllm_mcore.training.loop import Stage, StepData, run_stage
from tinyllm_mcore.training.references import build_references, pipeline_message, run_policy_and_reference

REPORT_NAMES = ("grpo loss", "policy loss", "clip fraction", "ratio")


def report_names(args) -> tuple[str, ...]:
    return REPORT_NAMES + (("kl",) if args.kl_beta else ())


def add_grpo_args(parser) -> None:
    g = parser.add_argument_group("GRPO")
    g.add_argument("--task", default=None, help="a reasoning-gym task (chain_sum, basic_arithmetic, countdown, ...)")
    g.add_argument("--task-config", default=None,
                   help='the task\'s own config as JSON, e.g. \'{"min_terms": 2, "max_terms": 3}\'')
    g.add_argument("--prompts", default=None, help='a jsonl of {"prompt", "answer"} lines (in place of --task)')
    g.add_argument("--answer-scorer", choices=["exact", "math-verify"], default="exact",
                   help="how --prompts answers are checked")
    g.add_argument("--heldout-size", type=int, default=None,
                   help="held-out prompts, never trained on (default: 200 of a task, 0 of a prompts file)")
    g.add_argument("--format-reward", type=float, default=0.0,
                   help="weight of the format term (the response ends with one <answer>...</answer>); 0: off")
    g.add_argument("--system-prompt", default=None, help="system text of the prompts (default: the chat format's)")
    g.add_argument("--group-size", type=int, default=8, help="responses sampled per prompt (G)")
    g.add_argument("--max-new-tokens", type=int, default=128, help="response length limit")
    g.add_argument("--temperature", type=float, default=1.0, help="rollout sampling temperature")
    g.add_argument("--top-p", type=float, default=1.0, help="rollout nucleus sampling")
    g.add_argument("--top-k", type=int, default=0, help="rollout top-k (0: off)")
    g.add_argument("--clip-eps", type=float, default=0.2, help="PPO ratio clip (low side, and high side by default)")
    g.add_argument("--clip-eps-high", type=float, default=None, help="PPO ratio clip's high side (DAPO's clip-higher)")
    g.add_argument("--kl-beta", type=float, default=0.0,
                   help="weight of the k3 KL to the frozen reference (0: no reference is held)")
    g.add_argument("--ref-load", default=None, help="reference checkpoint (default: --load, the starting weights)")
    g.add_argument("--rollout-batch-rows", type=int, default=None,
                   help="decode at most this many rows at once (default: all of a rank's rows)")
    g.add_argument("--eval-prompts", type=int, default=None,
                   help="held-out prompts answered at each --eval-interval (default: all of them)")
    g.add_argument("--max-zero-accuracy-intervals", type=int, default=5,
                   help="stop when no sampled response is correct for this many log intervals in a row (0: never)")


def check_grpo_args(args) -> None:
    """What needs no process group: the source flags, the group arithmetic, the sampling values."""
    if (args.task is None) == (args.prompts is None):
        raise ValueError("GRPO needs exactly one prompt source: --task NAME (reasoning-gym) or --prompts FILE.jsonl")
    if args.task is None and args.task_config is not None:
        raise ValueError("--task-config configures a --task; --prompts files have no config")
    if args.group_size < 2:
        raise ValueError(f"--group-size {args.group_size}: group-relative advantages need at least 2 responses "
                         "per prompt")
    if not args.load and not args.load_hf:
        raise ValueError("GRPO starts from a model that already answers in the task's format: --load SFT_CKPT "
                         "--finetune (or --load-hf HF_DIR)")
    rows = args.global_batch_size or args.micro_batch_size
    if rows % args.group_size:
        raise ValueError(f"--global-batch-size {rows} counts sequences (prompts x --group-size) and must be a "
                         f"multiple of --group-size {args.group_size}")
    if args.max_new_tokens < 1 or args.max_new_tokens >= args.seq_length:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens} must be in [1, --seq-length {args.seq_length})")
    if args.temperature <= 0:
        raise ValueError("--temperature must be > 0 for sampling rollouts (a group of greedy answers always ties)")
    if not 0 < args.top_p <= 1 or args.top_k < 0:
        raise ValueError("--top-p must be in (0, 1] and --top-k >= 0")
    if args.clip_eps <= 0 or (args.clip_eps_high is not None and args.clip_eps_high <= 0):
        raise ValueError("--clip-eps and --clip-eps-high must be > 0")
    if args.kl_beta < 0:
        raise ValueError("--kl-beta must be >= 0")
    if args.ref_load and not args.kl_beta:
        raise ValueError("--ref-load is the KL term's reference: give --kl-beta > 0 as well")
    if args.num_layers_per_virtual_pipeline_stage:
        raise ValueError("GRPO's rollouts decode one model chunk per pipeline rank: drop "
                         "--num-layers-per-virtual-pipeline-stage")
    if args.max_zero_accuracy_intervals < 0:
        raise ValueError("--max-zero-accuracy-intervals must be >= 0")
    if args.rollout_batch_rows is not None and args.rollout_batch_rows < 1:
        raise ValueError("--rollout-batch-rows must be >= 1")
    if args.task is not None:
        from tinyllm_mcore.data.verifiable_prompts import check_task_name

        check_task_name(args.task)
        task_config(args)
    if args.prompts is not None:  # a bad file is one line now, before any model is built
        from tinyllm_mcore.data.verifiable_prompts import read_prompt_file

        read_prompt_file(args.prompts)


def task_config(args) -> dict:
    try:
        config = json.loads(args.task_config) if args.task_config else {}
    except ValueError as e:
        raise ValueError(f"--task-config {args.task_config!r}: not JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"--task-config {args.task_config!r}: give a JSON object of the task's config fields")
    return config


# ---------------------------------------------------------------------------------------------------------------
# The run's GRPO state: the prompt source, the reward table, the zero-accuracy watch


# (ctx, prompts, first_prompt_index, group_size, greedy) -> each row's response ids (rows prompt-major)
Sampler = Callable[..., list[list[int]]]


@dataclass
class GRPORun:
    source: object  # data.verifiable_prompts.VerifiableSource
    rewards: object  # data.verifiable_prompts.RewardTable
    stop_ids: tuple[int, ...]
    sampler: Sampler
    zero_accuracy_steps: list[bool] = field(default_factory=list)  # per step since the last log: none correct


def grpo_run(ctx) -> GRPORun:
    return ctx.stage_state


def setup_grpo(ctx, sampler: Sampler) -> None:
    """After the policy is loaded: the prompt source, the reward table, the reference (when the KL is on)."""
    from tinyllm_mcore.data.verifiable_prompts import PromptFile, TaskSource, reward_table

    args = ctx.args
    if ctx.tokenizer is None:
        raise ValueError("GRPO needs the tokenizer that encodes prompts and decodes responses: --tokenizer-model")
    ctx.tokenizer.require_chat_tokens()
    if args.task is not None:
        source = TaskSource(args.task, seed=args.seed, config=task_config(args),
                            heldout_size=200 if args.heldout_size is None else args.heldout_size)
    else:
        source = PromptFile(args.prompts, scorer=args.answer_scorer, seed=args.seed,
                            heldout_size=args.heldout_size or 0)
    table = reward_table(source, args.format_reward)
    for line in table.describe():
        _print_rank0(f"[grpo] reward: {line}")
    ctx.stage_state = GRPORun(source=source, rewards=table, stop_ids=(ctx.tokenizer.eos,), sampler=sampler)
    if args.kl_beta:
        build_references(ctx, args.ref_load)


# ---------------------------------------------------------------------------------------------------------------
# Rollouts -> the step's rows


def row_seed(seed: int, prompt_index: int, sample: int, group_size: int) -> int:
    """The generator seed of sample `sample` of global prompt `prompt_index`: distinct per row and run seed."""
    return (seed * 1_000_003 + prompt_index * group_size + sample) % (2 ** 63)


def encode_prompt(ctx, item) -> list[int]:
    from tinyllm_mcore.data.verifiable_prompts import prompt_ids

    ids = prompt_ids(ctx.tokenizer, item, ctx.args.system_prompt)
    room = ctx.batch.seq_length - ctx.args.max_new_tokens
    if len(ids) > room:
        raise ValueError(f"{item.origin}: its prompt is {len(ids)} tokens, more than --seq-length "
                         f"{ctx.batch.seq_length} minus --max-new-tokens {ctx.args.max_new_tokens} leaves; raise "
                         "--seq-length or lower --max-new-tokens")
    return ids


def sample(ctx, prompts: list[list[int]], first_prompt: int, group_size: int, greedy: bool) -> list[list[int]]:
    """The policy's responses on its live weights (inference/rollout.py): row p·G + g is sample g of prompt p, drawn
    from the generator of (--seed, first_prompt + p, g)."""
    from tinyllm_mcore.inference.generate import SamplingParams
    from tinyllm_mcore.inference.rollout import sample_rollouts

    args = ctx.args
    params = SamplingParams(max_new_tokens=args.max_new_tokens, greedy=greedy, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p, stop_ids=grpo_run(ctx).stop_ids, seed=args.seed)
    seeds = [row_seed(args.seed, first_prompt + p, g, group_size) for p in range(len(prompts))
             for g in range(group_size)]
    kwargs = {"max_batch_rows": args.rollout_batch_rows} if args.rollout_batch_rows else {}
    return sample_rollouts(ctx.chunks[0], prompts, group_size=group_size, params=params, row_seeds=seeds,
                           max_new_tokens=args.max_new_tokens, vocab_size=ctx.preset.vocab_size, **kwargs)


def response_text(ctx, response: list[int]) -> str:
    ids = response[:-1] if response and response[-1] in grpo_run(ctx).stop_ids else response
    return ctx.tokenizer.detokenize(ids, skip_special_tokens=True)


def step_rows(prompts: list[list[int]], responses: list[list[int]], group_size: int, keep: torch.Tensor,
              advantages: torch.Tensor, seq_length: int, pad: int) -> dict[str, torch.Tensor]:
    """Rows prompt + response, right-padded to seq_length: tokens, labels (next token), the loss mask (response
    tokens of rows that train), positions and each row's advantage."""
    n = len(responses)
    tokens = torch.full((n, seq_length), pad, dtype=torch.long)
    labels = torch.full((n, seq_length), pad, dtype=torch.long)
    loss_mask = torch.zeros((n, seq_length), dtype=torch.float32)
    for row, response in enumerate(responses):
        prompt = prompts[row // group_size]
        ids = prompt + response
        tokens[row, :len(ids)] = torch.tensor(ids)
        labels[row, :len(ids) - 1] = torch.tensor(ids[1:])
        if keep[row]:  # label position t predicts token t + 1: the response's tokens sit at len(prompt) - 1 ...
            loss_mask[row, len(prompt) - 1:len(ids) - 1] = 1.0
    positions = torch.arange(seq_length).expand(n, seq_length).clone()
    return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask, "position_ids": positions,
            "advantages": advantages.float()}


def _data_parallel_sum(values: list[float]) -> list[float]:
    from megatron.core import parallel_state as ps

    t = torch.tensor(values, dtype=torch.float64, device="cuda" if torch.cuda.is_available() else "cpu")
    dist.all_reduce(t, group=ps.get_data_parallel_group())
    return t.cpu().tolist()


def prepare_step(ctx, iteration: int, consumed_samples: int) -> StepData:
    args, batch, layout, run = ctx.args, ctx.batch, ctx.layout, grpo_run(ctx)
    group = args.group_size
    rows_per_rank = batch.global_batch_size // layout.data
    prompts_per_rank = rows_per_rank // group
    first = consumed_samples // group + layout.data_rank * prompts_per_rank
    items = [run.source.train_item(first + j) for j in range(prompts_per_rank)]
    prompts = [encode_prompt(ctx, item) for item in items]

    t0 = time.perf_counter()
    responses = run.sampler(ctx, prompts, first, group, greedy=False)
    rollout_s = time.perf_counter() - t0
    scores = [run.rewards.score(response_text(ctx, r), items[i // group]) for i, r in enumerate(responses)]
    rewards = torch.tensor([s.total for s in scores])
    advantages = GroupAdvantages(rewards, group)
    keep = advantages.sequence_keep
    rows = step_rows(prompts, responses, group, keep, advantages.advantages, batch.seq_length, ctx.tokenizer.pad)

    generated = sum(len(r) for r in responses)
    reward_sum, reward_sq, correct, n, length_sum, tied, groups, kept = _data_parallel_sum([
        float(rewards.sum()), float((rewards ** 2).sum()), float(sum(s.accurate for s in scores)),
        float(len(scores)), float(generated), float(advantages.tied_groups), float(len(items)), float(keep.sum())])
    mean = reward_sum / n
    metrics = {
        "reward mean": mean,
        "reward std": max(reward_sq / n - mean ** 2, 0.0) ** 0.5,
        "accuracy": correct / n,
        "response length": length_sum / n,
        "zero-variance groups": tied / groups,
        "rollout s": rollout_s,
        "rollout tokens/s": generated / max(rollout_s, 1e-9),  # this replica's (data-parallel rank 0's on the log)
    }
    _watch_accuracy(ctx, iteration + 1, correct)
    micro = batch.micro_batch_size
    micro_batches = [{k: v[i:i + micro] for k, v in rows.items()} for i in range(0, rows_per_rank, micro)]
    return StepData(micro_batches=micro_batches, metrics=metrics, train=kept > 0)


def _watch_accuracy(ctx, iteration: int, correct: float) -> None:
    """Stop when no sampled response was correct for --max-zero-accuracy-intervals log intervals in a row."""
    args, run = ctx.args, grpo_run(ctx)
    if not args.max_zero_accuracy_intervals:
        return
    run.zero_accuracy_steps.append(correct == 0)
    window = args.max_zero_accuracy_intervals * args.log_interval
    recent = run.zero_accuracy_steps[-window:]
    if len(recent) == window and all(recent):
        raise ValueError(
            f"no sampled response was correct in the last {window} steps ({args.max_zero_accuracy_intervals} log "
            f"intervals of {args.log_interval}, up to iteration {iteration}): every reward is 0, so GRPO has "
            "nothing to learn from. Start from a model that already solves some prompts (more SFT), make the task "
            "easier, raise --group-size or --temperature (--max-zero-accuracy-intervals 0 disables this check)")
    del run.zero_accuracy_steps[:-window]


# ---------------------------------------------------------------------------------------------------------------
# Forward step and loss


def grpo_loss_from_nll(batch: dict, args, reference_nll, policy_nll):
    """The loop's loss convention from per-token −log p (the model's fused LM-head loss)."""
    return grpo_loss(-policy_nll, batch["loss_mask"], batch["advantages"], args.clip_eps, args.kl_beta,
                     reference_logps=None if reference_nll is None else -reference_nll,
                     clip_eps_high=args.clip_eps_high)


def grpo_forward_step(ctx, data_iterator, model):
    from tinyllm_mcore.checkpoint.io import unwrap

    batch = batch_to_device(next(data_iterator))
    args = ctx.args
    if args.kl_beta:
        policy_out, reference_out = run_policy_and_reference(
            model, ctx.reference_for(model), batch["tokens"], batch["position_ids"], None, batch["labels"])
        if not unwrap(model).post_process:
            return pipeline_message(policy_out, reference_out), None
    else:
        policy_out = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        reference_out = None
        if not unwrap(model).post_process:
            return policy_out, None
    return policy_out, partial(grpo_loss_from_nll, batch, args, reference_out)


# ---------------------------------------------------------------------------------------------------------------
# Held-out evaluation


def evaluate_heldout(ctx, iteration: int) -> dict[str, float]:
    """Greedy answers to the held-out prompts (rank r of DP answers prompts r, r + DP, ...)."""
    args, layout, run = ctx.args, ctx.layout, grpo_run(ctx)
    heldout = run.source.heldout[:args.eval_prompts] if args.eval_prompts else run.source.heldout
    if not heldout:
        raise ValueError("--eval-interval evaluates held-out prompts, but there are none: give --heldout-size > 0")
    mine = list(range(layout.data_rank, len(heldout), layout.data))
    correct = reward = 0.0
    if mine:
        prompts = [encode_prompt(ctx, heldout[j]) for j in mine]
        responses = run.sampler(ctx, prompts, -len(heldout), 1, greedy=True)
        for j, response in zip(mine, responses):
            score = run.rewards.score(response_text(ctx, response), heldout[j])
            correct += float(score.accurate)
            reward += score.total
    correct, reward = _data_parallel_sum([correct, reward])
    return {"heldout accuracy": correct / len(heldout), "heldout reward": reward / len(heldout)}


def _print_rank0(text: str) -> None:
    from tinyllm_mcore.runtime import distributed as rt

    rt.print_rank0(text)


def make_stage(sampler: Sampler = sample) -> Stage:
    """The GRPO stage; `sampler` makes the responses (tests give fixed ones to compare layouts on equal rollouts)."""
    return Stage(name="grpo", datasets_provider=None, forward_step=grpo_forward_step, extra_args=add_grpo_args,
                 default_warmup_fraction=0.0, needs_data_path=False, check_args=check_grpo_args,
                 after_load=partial(setup_grpo, sampler=sampler), report_names=report_names,
                 models_per_pipeline_message=lambda args: 2 if args.kl_beta else 1,
                 prepare_step=prepare_step, evaluate=evaluate_heldout)


STAGE = make_stage()


def main(argv=None) -> int:
    return run_stage(STAGE, argv)


if __name__ == "__main__":
    raise SystemExit(main())
