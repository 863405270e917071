"""DPO stage: `torchrun ... -m tinyllm_mcore.stages.dpo --load SFT_CKPT --finetune --preference-data PREFIX ...`.

Direct Preference Optimization (Rafailov et al. 2023): the policy starts from the SFT checkpoint and is trained
against a frozen reference model (by default the same checkpoint) with

    loss = -logsigmoid(β·((log πθ(c) − log πref(c)) − (log πθ(r) − log πref(r))))     (β 0.1, the seed's)

(with label smoothing ε: (1−ε)·that − ε·logsigmoid(−…), the conservative-DPO form). Sequence log-probs sum the
response tokens only (loss_mask), computed by megatron's vocab-parallel cross-entropy, so under TP no rank ever
gathers full-vocabulary logits.

Batch shape: a preference sample is a pair (leading dim 2: chosen, rejected), so chosen and rejected of a pair are
always in the same micro-batch; the micro-batch [mbs, 2, s] runs as [2·mbs, s].

The reference model lives in the same parallel layout as the policy (one frozen chunk per policy chunk, no grads,
no optimizer state). Under pipeline parallelism it rides the policy's pipeline: each stage runs the policy and the
reference on their halves of the received activations and sends both on ([s, 2·mbs policy ‖ 2·mbs reference, h]),
so the loss on the last stage sees both log-probs of the same micro-batch. Why not precompute the reference
log-probs once? For a single epoch both cost the same reference forward per pair (the in-pipeline reference adds
one forward-only pass per step, ~1/4 of a step's compute — see docs / the report measurement); precomputing only
pays off for several epochs, and costs a separate pass whose outputs must follow samples through DP sharding and
shuffling. Holding the reference costs its weights only (no grads or Adam state: ~1/4 of the policy's training
memory in fp32).
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

from tinyllm_mcore.training.loop import Stage, run_stage
from tinyllm_mcore.data.preference import preference_datasets
from tinyllm_mcore.model.losses import pair_loss_report
from tinyllm_mcore.training.batches import attention_mask, batch_to_device, flatten_pairs
from tinyllm_mcore.training.references import build_references, pipeline_message, run_policy_and_reference

REPORT_NAMES = ("dpo loss", "rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin",
                "logps/chosen", "logps/rejected")


def add_dpo_args(parser) -> None:
    g = parser.add_argument_group("DPO")
    g.add_argument("--preference-data", nargs="*", default=None,
                   help="preference jsonl ({prompt, chosen, rejected}) or preprocessed indexed prefix(es)")
    g.add_argument("--beta", type=float, default=0.1, help="DPO temperature β (the seed's 0.1)")
    g.add_argument("--label-smoothing", type=float, default=0.0, help="conservative DPO ε in [0, 0.5)")
    g.add_argument("--ref-load", default=None,
                   help="reference checkpoint (default: the policy's starting weights, from --load or --load-hf)")


def check_dpo_args(args) -> None:
    if not 0 <= args.label_smoothing < 0.5:
        raise ValueError(f"--label-smoothing must be in [0, 0.5), got {args.label_smoothing}")
    if not args.load and not args.load_hf and not args.ref_load:
        raise ValueError("DPO needs a starting checkpoint: --load SFT_CKPT --finetune or --load-hf HF_DIR (and/or "
                         "--ref-load)")


# ---------------------------------------------------------------------------------------------------------------
# Loss


def sequence_logps(per_token_nll: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Sum of response-token log-probs per sequence: [n, s] −log p(label) (vocab-parallel CE) -> [n]."""
    return -(per_token_nll.float() * loss_mask.float()).sum(dim=-1)


def dpo_loss(reference_nll: torch.Tensor, loss_mask: torch.Tensor, beta: float, label_smoothing: float,
             policy_nll: torch.Tensor):
    """Loop convention (loss_sum, count, reports); rows of the [2·mbs, s] tensors alternate chosen, rejected."""
    policy = sequence_logps(policy_nll, loss_mask).view(-1, 2)
    reference = sequence_logps(reference_nll, loss_mask).view(-1, 2)
    rewards = beta * (policy - reference.detach())  # [pairs, 2]: implicit rewards of chosen, rejected
    margin = rewards[:, 0] - rewards[:, 1]
    losses = -F.logsigmoid(margin) * (1 - label_smoothing) - F.logsigmoid(-margin) * label_smoothing
    return pair_loss_report(losses, {
        "dpo loss": losses.sum(),
        "rewards/chosen": rewards[:, 0].sum(),
        "rewards/rejected": rewards[:, 1].sum(),
        # a tie (margin 0: every pair at the first step, when policy = reference) counts as not accurate
        "rewards/accuracy": (margin > 0).float().sum(),
        "rewards/margin": margin.sum(),
        "logps/chosen": policy[:, 0].sum(),
        "logps/rejected": policy[:, 1].sum(),
    })


# ---------------------------------------------------------------------------------------------------------------
# Forward step: policy and frozen reference on the same micro-batch (training/references.py)


def dpo_forward_step(ctx, data_iterator, model):
    from tinyllm_mcore.checkpoint.io import unwrap

    batch = flatten_pairs(batch_to_device(next(data_iterator)))
    policy_out, reference_out = run_policy_and_reference(
        model, ctx.reference_for(model), batch["tokens"], batch["position_ids"], attention_mask(batch),
        batch["labels"])
    if not unwrap(model).post_process:
        # both go to the next stage in one tensor (the stage declares models_per_pipeline_message=2)
        return pipeline_message(policy_out, reference_out), None
    return policy_out, partial(dpo_loss, reference_out, batch["loss_mask"], ctx.args.beta, ctx.args.label_smoothing)


def make_stage(datasets_provider=preference_datasets) -> Stage:
    return Stage(name="dpo", datasets_provider=datasets_provider, forward_step=dpo_forward_step,
                 extra_args=add_dpo_args, default_warmup_fraction=0.1, needs_data_path=False,
                 shuffle_each_epoch=True, sequences_per_sample=2, models_per_pipeline_message=2,
                 check_args=check_dpo_args,
                 after_load=lambda ctx: build_references(ctx, ctx.args.ref_load), report_names=REPORT_NAMES)


STAGE = make_stage()


def main(argv=None) -> int:
    return run_stage(STAGE, argv)


if __name__ == "__main__":
    raise SystemExit(main())
