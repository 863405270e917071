"""Reward-model stage: `torchrun ... -m tinyllm_mcore.reward --init-from SFT_CKPT --preference-data PREFIX ...`.

The GPT trunk with a scalar head: `RewardModel` is megatron's GPTModel whose last pipeline stage, instead of the
vocab-parallel output layer, applies a [hidden -> 1] linear head to the final-norm hidden states. The reward of a
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

from tinyllm_mcore.pretrain import batch_to_device
from tinyllm_mcore.training.loop import Stage, main

REPORT_NAMES = ("reward loss", "reward accuracy", "rewards/chosen", "rewards/rejected", "rewards/margin")


def reward_model_class():
    from megatron.core.models.gpt import GPTModel
    from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

    class RewardModel(GPTModel):
        """GPTModel with a scalar head on the last stage: forward returns per-position rewards [b, s]."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if self.post_process:
                del self.output_layer  # no LM head: the trunk's hidden states go to the scalar head
                self.output_layer = None
                self.reward_head = torch.nn.Linear(self.config.hidden_size, 1, bias=False,
                                                   dtype=self.config.params_dtype)
                torch.nn.init.normal_(self.reward_head.weight, std=1.0 / (self.config.hidden_size + 1) ** 0.5)

        def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
            # LanguageModule's version edits the (absent) output layer's entry on the last stage
            post_process, self.post_process = self.post_process, False
            try:
                return super().sharded_state_dict(prefix, sharded_offsets, metadata)
            finally:
                self.post_process = post_process

        def _postprocess(self, hidden_states, *args, **kwargs):
            if not self.post_process:
                return hidden_states
            if self.config.sequence_parallel:
                hidden_states = gather_from_sequence_parallel_region(hidden_states, group=self.pg_collection.tp)
            return self.reward_head(hidden_states).squeeze(-1).transpose(0, 1).float()  # [s, b, 1] -> [b, s]

    return RewardModel


def reward_model_provider(args, preset, config, pre_process, post_process, vp_stage):
    from tinyllm_mcore.model import layer_spec
    from tinyllm_mcore.presets import padded_vocab_size

    use_te = {"auto": None, "local": False, "transformer_engine": True}[args.transformer_impl]
    model = reward_model_class()(
        config=config, transformer_layer_spec=layer_spec(preset, use_te),
        vocab_size=padded_vocab_size(preset.vocab_size, config.tensor_model_parallel_size,
                                     args.make_vocab_size_divisible_by),
        max_sequence_length=preset.max_position_embeddings, pre_process=pre_process, post_process=post_process,
        share_embeddings_and_output_weights=False, position_embedding_type="rope",
        rotary_base=int(preset.rope_theta), rotary_percent=1.0, vp_stage=vp_stage)
    if getattr(args, "init_from", None):
        load_trunk(args.init_from, model)
    return model


def load_trunk(load: str, model) -> None:
    """Load every parameter but the reward head from an LM dist checkpoint (any saved layout)."""
    from megatron.core import dist_checkpointing

    from tinyllm_mcore.training.checkpoint import resolve_load_dir

    path = resolve_load_dir(load)
    sharded = {k: v for k, v in model.sharded_state_dict().items() if not k.startswith("reward_head.")}
    loaded = dist_checkpointing.load({"model": sharded}, str(path))["model"]
    missing, unexpected = model.load_state_dict(loaded, strict=False)
    missing = [k for k in missing if not k.startswith("reward_head.") and not k.endswith("_extra_state")]
    if missing or unexpected:
        raise ValueError(f"{path} is not an LM checkpoint of this model: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")


def last_token_index(loss_mask: torch.Tensor) -> torch.Tensor:
    """Position of each sequence's last answer token (eos): one after the last position with loss_mask 1."""
    positions = torch.arange(loss_mask.size(1), device=loss_mask.device).expand_as(loss_mask)
    last = torch.where(loss_mask > 0, positions, torch.full_like(positions, -1)).max(dim=1).values
    if (last < 0).any():
        raise ValueError("a preference sequence has no answer tokens (empty loss mask)")
    return (last + 1).clamp(max=loss_mask.size(1) - 1)


def reward_loss(loss_mask: torch.Tensor, rewards_per_position: torch.Tensor):
    rewards = rewards_per_position.gather(1, last_token_index(loss_mask)[:, None]).squeeze(1).view(-1, 2)
    margin = rewards[:, 0] - rewards[:, 1]
    losses = -F.logsigmoid(margin)
    loss_sum = losses.sum()
    pairs = torch.tensor(float(losses.numel()), device=losses.device)
    stats = {"reward loss": loss_sum, "reward accuracy": (margin > 0).float().sum(),
             "rewards/chosen": rewards[:, 0].sum(), "rewards/rejected": rewards[:, 1].sum(),
             "rewards/margin": margin.sum()}
    return loss_sum, pairs.to(torch.int), {k: torch.stack([v.detach().float(), pairs]) for k, v in stats.items()}


def reward_forward_step(data_iterator, model):
    from tinyllm_mcore.dpo import flatten_pairs, pair_attention_mask

    batch = flatten_pairs(batch_to_device(next(data_iterator)))
    output = model(batch["tokens"], batch["position_ids"], pair_attention_mask(batch))
    return output, partial(reward_loss, batch["loss_mask"])


def add_reward_args(parser) -> None:
    g = parser.add_argument_group("reward model")
    g.add_argument("--preference-data", nargs="*", default=None,
                   help="preference jsonl ({prompt, chosen, rejected}) or preprocessed indexed prefix(es)")
    g.add_argument("--init-from", default=None, help="LM checkpoint (SFT) whose trunk initialises the reward model")
    parser.set_defaults(sequences_per_sample=2, allow_no_data=True, shuffle_each_epoch=True)


def make_stage(datasets_provider=None) -> Stage:
    from tinyllm_mcore.dpo import preference_datasets

    return Stage(name="reward", datasets_provider=datasets_provider or preference_datasets,
                 forward_step=reward_forward_step, model_provider=reward_model_provider, extra_args=add_reward_args,
                 default_warmup_fraction=0.03, report_names=REPORT_NAMES)


STAGE = make_stage()

if __name__ == "__main__":
    from tinyllm_mcore.pretrain import load_tokenizer

    raise SystemExit(main(STAGE, tokenizer_loader=load_tokenizer))
