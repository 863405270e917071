"""The LM head and its cross-entropy fused and chunked over the vocabulary (no [tokens, vocab] logits are kept).

At the seed's vocab (64798) the logits of a micro-batch are the largest tensor of a small model's step: 4 × 512
tokens make 530 MB of fp32 logits, and the unfused path walks them a dozen times (matmul output, fp32 upcast,
log-softmax, its backward, zero fills, the one-hot subtraction). Here the vocabulary is processed in slices whose
fp32 logits stay cache-sized: the forward keeps only the per-token log-sum-exp, and the backward recomputes each
slice's logits (one extra matmul) to form softmax − one-hot in place. Numerics are those of `F.cross_entropy` on
fp32 logits: the softmax is fp32, only the matmuls run in the weights' dtype.

Used for the CPU training loss without tensor parallelism (with TP the vocab is split across ranks and megatron's
vocab-parallel cross-entropy combines the partial softmaxes).

Also the loop's loss convention, which every stage's loss function follows: (loss_sum, count, {name: [sum, count]}).
The loop sets megatron's `calculate_per_token_loss`, so gradients are divided by the count summed over all
micro-batches and data-parallel ranks: an exact global mean, independent of how the batch is split.

And GRPO's math (the last section): group-relative advantages and the clipped policy-gradient loss with the k3 KL.
"""
from __future__ import annotations

import torch

# fp32 logits per chunk ≈ this many bytes. CPU: cache-sized (8 MB measured fastest of 8-128 MB at 42m, 2 threads).
# (The training model uses this on CPU only; on a GPU the chunks would merely bound memory.)
CHUNK_BYTES = 8 * 1024 * 1024
CHUNK_BYTES_CUDA = 1024 * 1024 * 1024


def chunk_columns(num_tokens: int, vocab_size: int, device: torch.device) -> int:
    budget = CHUNK_BYTES_CUDA if device.type == "cuda" else CHUNK_BYTES
    return max(256, min(vocab_size, budget // (4 * max(num_tokens, 1))))


class LinearCrossEntropy(torch.autograd.Function):
    """loss[i] = logsumexp(h_i W^T) − (h_i W^T)[label_i] for hidden [N, h], weight [V, h], labels [N].

    Chunks run over the vocabulary: each weight slice takes part in one matmul per pass (CPU matmul libraries
    repack the weight operand on every call, so slicing the tokens instead would repack the whole LM head per
    chunk), and a running log-sum-exp combines the chunks.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        n, vocab = hidden.shape[0], weight.shape[0]
        cols = chunk_columns(n, vocab, hidden.device)
        lse = torch.full((n,), float("-inf"), dtype=torch.float32, device=hidden.device)
        label_logit = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        for start in range(0, vocab, cols):
            end = min(start + cols, vocab)
            logits = torch.matmul(hidden, weight[start:end].t()).float()
            lse = torch.logaddexp(lse, torch.logsumexp(logits, dim=-1))
            inside = (labels >= start) & (labels < end)
            local = (labels - start).clamp(0, end - start - 1)
            label_logit += torch.where(inside, logits.gather(1, local[:, None]).squeeze(1), 0.0)
        ctx.save_for_backward(hidden, weight, labels, lse)
        return lse - label_logit

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        hidden, weight, labels, lse = ctx.saved_tensors
        n, vocab = hidden.shape[0], weight.shape[0]
        cols = chunk_columns(n, vocab, hidden.device)
        grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
        grad_weight = torch.empty_like(weight)
        grad_loss = grad_loss.float()
        rows = torch.arange(n, device=hidden.device)
        for start in range(0, vocab, cols):
            end = min(start + cols, vocab)
            probs = torch.matmul(hidden, weight[start:end].t()).float()
            probs.sub_(lse[:, None]).exp_()  # softmax restricted to this vocab slice
            inside = (labels >= start) & (labels < end)
            probs[rows[inside], labels[inside] - start] -= 1.0
            probs.mul_(grad_loss[:, None])  # d loss / d logits
            grad_logits = probs.to(hidden.dtype)
            grad_hidden += torch.matmul(grad_logits, weight[start:end]).float()
            grad_weight[start:end] = torch.matmul(grad_logits.t(), hidden)
        return grad_hidden.to(hidden.dtype), grad_weight, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy of `hidden @ weight.T` against labels; hidden [..., h], labels [...] -> loss [...]."""
    shape = labels.shape
    loss = LinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1))
    return loss.view(shape)


def masked_token_loss(loss_mask: torch.Tensor, per_token_loss: torch.Tensor, name: str = "lm loss"):
    """Mean cross-entropy over the tokens where loss_mask is 1 (GPTModel returns per-token losses [b, s])."""
    mask = loss_mask.reshape(-1).float()
    loss_sum = (per_token_loss.float().reshape(-1) * mask).sum()
    count = mask.sum()
    return loss_sum, count.to(torch.int), {name: torch.stack([loss_sum.detach(), count.detach()])}


def pair_loss_report(losses: torch.Tensor, stats: dict[str, torch.Tensor]):
    """The loop's loss convention for per-pair losses: (loss_sum, pair count, {name: [sum, pairs]})."""
    loss_sum = losses.sum()
    pairs = torch.tensor(float(losses.numel()), device=losses.device)
    reports = {k: torch.stack([v.detach().float(), pairs]) for k, v in stats.items()}
    return loss_sum, pairs.to(torch.int), reports


# ---------------------------------------------------------------------------------------------------------------
# GRPO (Shao et al. 2024, DeepSeekMath): group-relative advantages, the clipped policy-gradient loss and the k3 KL
# to a frozen reference. Pure tensor math on per-token log-probs (−the per-token cross-entropy the model returns),
# so it is the same at every parallel layout; the stage computes the log-probs and owns the rollouts.

# A group's rewards tie when max − min is at most this: such a group has no learning signal (every advantage 0).
TIE_TOLERANCE = 1e-6


class GroupAdvantages:
    """Advantages of G samples per prompt: A = (r − mean) / (std + eps) within each group (std with Bessel's
    correction, as TRL and verl compute it; Megatron-LM's RL and minimind divide by the population std, which makes
    advantages √(G/(G−1)) larger; G ≥ 2). A group whose rewards all tie gets advantage 0 and is flagged
    ``tied``: the stage leaves its tokens out of the loss (``sequence_keep``) and reports the share of such groups
    (small models fail silently by producing all-zero rewards — this is where it shows)."""

    def __init__(self, rewards: torch.Tensor, group_size: int, eps: float = 1e-6):
        if group_size < 2:
            raise ValueError(f"group-relative advantages need at least 2 samples per group, got {group_size}")
        if rewards.numel() % group_size:
            raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
        grouped = rewards.detach().float().reshape(-1, group_size)
        self.group_size = group_size
        self.mean = grouped.mean(dim=1)
        self.std = grouped.std(dim=1)
        self.tied = (grouped.max(dim=1).values - grouped.min(dim=1).values) <= TIE_TOLERANCE
        advantages = (grouped - self.mean[:, None]) / (self.std[:, None] + eps)
        self.advantages = torch.where(self.tied[:, None], 0.0, advantages).reshape(-1)  # [groups · G], sample order

    @property
    def sequence_keep(self) -> torch.Tensor:
        """[groups · G] bool: the samples whose group has a learning signal."""
        return (~self.tied).repeat_interleave(self.group_size)

    @property
    def tied_groups(self) -> int:
        return int(self.tied.sum())


def grpo_loss(logps: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor, clip_eps: float, kl_beta: float,
              old_logps: torch.Tensor | None = None, reference_logps: torch.Tensor | None = None,
              clip_eps_high: float | None = None):
    """The GRPO loss of a micro-batch in the loop's convention: (loss_sum, token count, {name: [sum, count]}).

    Per response token t of sequence i (``mask`` 1: the sampled response tokens of sequences that train, i.e. the
    response mask times ``GroupAdvantages.sequence_keep``)::

        ratio = exp(logp − old_logp)                                   (1 when old_logps is None: on-policy)
        pg    = −min(ratio · A_i, clip(ratio, 1 − clip_eps, 1 + clip_eps_high) · A_i)      (PPO's clip)
        kl    = exp(ref_logp − logp) − (ref_logp − logp) − 1                             (k3: ≥ 0, unbiased)
        loss  = pg + kl_beta · kl

    summed over tokens and counted, so the loop's per-token reduction makes it a token mean over the whole global
    batch (every response token weighs the same, however long its sequence — DAPO's token-level mean).
    ``logps``, ``old_logps``, ``reference_logps``: [b, s] log-probs of the sampled tokens; ``advantages`` [b].
    ``old_logps`` are the rollout policy's (detached); with one update per rollout batch they equal ``logps``
    and may be left out. ``reference_logps`` are needed when ``kl_beta`` > 0; the KL is reported whenever they are
    given. Reports: the loss and its policy-gradient and KL parts, the clip fraction (tokens whose clipped term
    is the minimum, i.e. whose gradient the clip removes) and the mean ratio.
    """
    if kl_beta and reference_logps is None:
        raise ValueError("a KL penalty (kl_beta > 0) needs the reference model's log-probs")
    high = clip_eps if clip_eps_high is None else clip_eps_high
    mask = mask.float()
    logps = logps.float()
    old = logps.detach() if old_logps is None else old_logps.detach().float()
    advantage = advantages.detach().float().reshape(-1, 1)

    ratio = torch.exp(logps - old)
    unclipped = ratio * advantage
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + high) * advantage
    policy_loss = -torch.minimum(unclipped, clipped)
    clip_active = (clipped < unclipped).float()
    per_token = policy_loss
    reports = {"policy loss": policy_loss, "clip fraction": clip_active, "ratio": ratio.detach()}
    if reference_logps is not None:
        log_ratio = reference_logps.detach().float() - logps
        kl = torch.exp(log_ratio) - log_ratio - 1.0
        reports["kl"] = kl
        if kl_beta:
            per_token = per_token + kl_beta * kl

    loss_sum = (per_token * mask).sum()
    count = mask.sum()
    out = {"grpo loss": torch.stack([loss_sum.detach(), count])}
    out.update({name: torch.stack([(value.detach() * mask).sum(), count]) for name, value in reports.items()})
    return loss_sum, count.to(torch.int), out
