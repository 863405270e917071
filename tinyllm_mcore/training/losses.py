"""Loss functions in the loop's convention: (loss_sum, count, {name: tensor([sum, count])}).

The loop sets megatron's `calculate_per_token_loss`, so gradients are divided by the count summed over all
micro-batches and data-parallel ranks: an exact global mean, independent of how the batch is split.
"""
from __future__ import annotations

import torch


def masked_token_loss(loss_mask: torch.Tensor, per_token_loss: torch.Tensor, name: str = "lm loss"):
    """Mean cross-entropy over the tokens where loss_mask is 1 (GPTModel returns per-token losses [b, s])."""
    mask = loss_mask.reshape(-1).float()
    loss_sum = (per_token_loss.float().reshape(-1) * mask).sum()
    count = mask.sum()
    return loss_sum, count.to(torch.int), {name: torch.stack([loss_sum.detach(), count.detach()])}
