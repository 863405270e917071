"""Reward-model stage: `torchrun ... -m tinyllm_mcore.stages.reward --init-from SFT_CKPT --preference-data PREFIX ...`.

The GPT trunk with a scalar head (`model.build` with head="reward", model.RewardModel): the last pipeline stage,
instead of the vocab-parallel output layer, applies a [hidden -> 1] linear head to the final-norm hidden states. The reward of a
sequence is the head's value at its last non-pad token (the eos closing the answer). Loss (Bradley-Terry):
−logsigmoid(r_chosen − r_rejected); accuracy = share of pairs with r_chosen > r_rejected. Pairs share a micro-batch
exactly as in DPO (samples with a leading dim 2), so it runs at any TP/PP/DP with the generic loop.

`--init-from` loads the trunk of an LM checkpoint (SFT) at any layout, leaving the new head at its initialisation
(the LM head is not loaded); `--load` resumes a reward-model checkpoint as usual.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

from tinyllm_mcore.training.loop import Stage, run_stage
from tinyllm_mcore.data.preference import preference_datasets
from tinyllm_mcore.model.losses import pair_loss_report
from tinyllm_mcore.training.batches import attention_mask, batch_to_device, flatten_pairs

REPORT_NAMES = ("reward loss", "reward accuracy", "rewards/chosen", "rewards/rejected", "rewards/margin")


def add_reward_args(parser) -> None:
    g = parser.add_argument_group("reward model")
    g.add_argument("--preference-data", nargs="*", default=None,
                   help="preference jsonl ({prompt, chosen, rejected}) or preprocessed indexed prefix(es)")
    g.add_argument("--init-from", default=None, help="LM checkpoint (SFT) whose trunk initialises the reward model")


def load_trunk(ctx, model) -> None:
    """--init-from: every parameter but the reward head from an LM checkpoint (any saved layout), through the same
    checks as --load: manifest, model shape and tokenizer identity.

    Skipped with --load: that checkpoint replaces all weights anyway."""
    args = ctx.args
    if not args.init_from or args.load:
        return
    from tinyllm_mcore.checkpoint import io as ckpt

    trunk = ckpt.read_checkpoint(ckpt.resolve_load_dir(args.init_from), verify=not args.no_verify_checkpoint,
                                 require_manifest=args.require_manifest)
    ckpt.check_matches_run(trunk, ctx.preset, ctx.tokenizer_identity, args.allow_tokenizer_change)
    ckpt.load_checkpoint(trunk, [model], finetune=True, skip_prefixes=("reward_head.",))


def last_token_index(loss_mask: torch.Tensor) -> torch.Tensor:
    """Position of each sequence's last answer token (eos): one after the last position with loss_mask 1."""
    positions = torch.arange(loss_mask.size(1), device=loss_mask.device).expand_as(loss_mask)
    last = torch.where(loss_mask > 0, positions, torch.full_like(positions, -1)).max(dim=1).values
    if (last < 0).any():
        raise ValueError("a preference sequence has no answer tokens (empty loss mask)")
    return (last + 1).clamp(max=loss_mask.size(1) - 1)


def reward_loss(loss_mask: torch.Tensor, rewards_per_position: torch.Tensor):
    """Bradley-Terry loss over pairs; rows of the [2·mbs, s] rewards alternate chosen, rejected."""
    rewards = rewards_per_position.gather(1, last_token_index(loss_mask)[:, None]).squeeze(1).view(-1, 2)
    margin = rewards[:, 0] - rewards[:, 1]
    losses = -F.logsigmoid(margin)
    return pair_loss_report(losses, {"reward loss": losses.sum(), "reward accuracy": (margin > 0).float().sum(),
                                     "rewards/chosen": rewards[:, 0].sum(), "rewards/rejected": rewards[:, 1].sum(),
                                     "rewards/margin": margin.sum()})


def reward_forward_step(ctx, data_iterator, model):
    batch = flatten_pairs(batch_to_device(next(data_iterator)))
    output = model(batch["tokens"], batch["position_ids"], attention_mask(batch))
    return output, partial(reward_loss, batch["loss_mask"])


def make_stage(datasets_provider=preference_datasets) -> Stage:
    return Stage(name="reward", datasets_provider=datasets_provider, forward_step=reward_forward_step,
                 model_head="reward", extra_args=add_reward_args, default_warmup_fraction=0.03,
                 needs_data_path=False, shuffle_each_epoch=True, sequences_per_sample=2, init_weights=load_trunk,
                 report_names=REPORT_NAMES)


STAGE = make_stage()


def main(argv=None) -> int:
    return run_stage(STAGE, argv)


if __name__ == "__main__":
    raise SystemExit(main())
