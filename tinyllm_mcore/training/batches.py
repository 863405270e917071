"""What the stages share: tokenizer loading, batch movement and attention masks, the LM forward step and preference
pair flattening. Stage modules (pretrain, sft, dpo, reward) import from here, never from each other.

A forward step has the signature `(ctx, data_iterator, model) -> (output, loss_fn)`; the loop binds `ctx` (the
run's `RunContext`) before handing it to megatron's schedule, which calls it with `(data_iterator, model)`.
"""
from __future__ import annotations

from functools import partial

import torch

from tinyllm_mcore.model.losses import masked_token_loss


def load_tokenizer(args):
    """The run's tokenizer from --tokenizer-model / --tokenizer-type, or None (mock data with --vocab-size)."""
    if not args.tokenizer_model:
        return None
    from tinyllm_mcore.tokenizer.core import Tokenizer

    return Tokenizer.load(args.tokenizer_model, args.tokenizer_type)


def batch_to_device(batch: dict) -> dict:
    if torch.cuda.is_available():
        return {k: v.cuda(non_blocking=True) for k, v in batch.items()}
    return batch


def attention_mask(batch: dict):
    """Packed samples carry segment_ids: attention is causal within each packed sample only. None = plain causal."""
    if "segment_ids" not in batch:
        return None
    from tinyllm_mcore.data.sft_samples import packed_attention_mask

    return packed_attention_mask(batch["segment_ids"])


def lm_forward_step(ctx, data_iterator, model):
    """Forward a micro-batch of {tokens, labels, loss_mask, position_ids[, segment_ids]}; masked next-token loss."""
    batch = batch_to_device(next(data_iterator))
    output = model(batch["tokens"], batch["position_ids"], attention_mask(batch), labels=batch["labels"])
    return output, partial(masked_token_loss, batch["loss_mask"])


# ---------------------------------------------------------------------------------------------------------------
# Preference pairs (DPO and reward modelling): a sample is a (chosen, rejected) pair with a leading dim of 2


def flatten_pairs(batch: dict) -> dict:
    """[mbs, 2, s] -> [2·mbs, s], rows alternating chosen, rejected."""
    for k, v in batch.items():
        if v.dim() < 3 or v.size(1) != 2:
            raise ValueError(f"preference samples need a leading pair dimension of 2; {k!r} has shape "
                             f"{tuple(v.shape[1:])}")
    return {k: v.flatten(0, 1) for k, v in batch.items()}
