"""GRPO rollouts: G sampled responses per prompt from the policy being trained, on its own live weights, in the run's
own process groups (TP, PP; DP replicas each sample their own prompts).

`sample_rollouts` runs `decoding.CachedDecoder` over this rank's chunk of the policy, in eval mode under no_grad,
and restores every module's train/eval mode afterwards. Nothing is copied: not the weights, not the output layer.
Finished rows leave the decoder once a quarter of its rows have finished (their KV caches are dropped), so a
batch whose responses end early does not keep computing them.

Layouts:
- TP: logits are gathered over the TP group (CachedDecoder), so every TP rank samples the same token.
- PP: a pipelined decode. Each stage runs its own layers: the first embeds the tokens, the hidden states [b, s, h]
  go stage to stage by p2p in the PP group (gloo on CPU, NCCL on GPU), the last stage applies the final norm and the
  output layer and samples, and the sampled tokens are broadcast to every PP rank each step. So every rank follows
  the same rows, finishes the same rows and stops at the same step, and all return the same lists. The stages run in
  turn (one batch in flight); a pipeline here spreads the memory, it does not overlap the stages.
- Virtual pipeline (several chunks per rank) is refused, as is sequence parallelism where the decoder cannot do the
  TP communication itself (Transformer Engine linears, MoE layers: decoding.check_sequence_parallel).

Sampling: SamplingParams' filters (inference/generate.process_logits: repetition penalty, temperature, top-k, top-p;
greedy), over the logical vocabulary only. Row i draws from its own torch.Generator seeded with row_seeds[i]: its
t-th token is the inverse CDF of its filtered distribution at the t-th uniform of that generator (drawn on the CPU,
so the same on any device). A row's tokens therefore do not depend on the other rows of its batch, on the slicing
(`max_batch_rows`) or on the parallel layout, up to float noise in the logits.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from tinyllm_mcore.checkpoint.io import unwrap
from tinyllm_mcore.inference.generate import SamplingParams, process_logits


def sample_rollouts(model, prompts: list[list[int]], *, group_size: int, params: SamplingParams,
                    row_seeds: list[int], max_new_tokens: int, max_batch_rows: int | None = None,
                    vocab_size: int | None = None) -> list[list[int]]:
    """`group_size` sampled responses for each prompt; row p * group_size + g is sample g of prompt p.

    `model`: this rank's policy chunk as training holds it (megatron DDP / Float16Module wrapped or bare; a list of
    one chunk is accepted). Every rank of the model-parallel group calls this with the same arguments and gets the
    same lists back. Each row's response ends with the first stop token sampled (kept), or after `max_new_tokens`
    (fewer where the prompt leaves less room in the model's context). `params` gives the sampling filters and stop
    ids; its `max_new_tokens` and `seed` are not read (`max_new_tokens` and `row_seeds` are). `max_batch_rows`: decode
    at most this many rows at once (default: all). `vocab_size`: the tokenizer's vocabulary; ids at or above it
    (the embedding's TP padding rows) are never sampled. Default: the model's padded vocabulary.
    """
    root, chunk = _one_chunk(model)
    params.validate()
    if group_size < 1:
        raise ValueError(f"group size must be >= 1, got {group_size}")
    rows = [list(prompt) for prompt in prompts for _ in range(group_size)]
    if len(row_seeds) != len(rows):
        raise ValueError(f"{len(rows)} rows ({len(prompts)} prompts x group size {group_size}) need as many row seeds, "
                         f"got {len(row_seeds)}")
    if max_new_tokens < 1:
        raise ValueError(f"max new tokens must be >= 1, got {max_new_tokens}")
    if max_batch_rows is not None and max_batch_rows < 1:
        raise ValueError(f"max batch rows must be >= 1, got {max_batch_rows}")
    if any(len(prompt) == 0 for prompt in prompts):
        raise ValueError("every prompt needs at least one token")
    longest = max((len(prompt) for prompt in prompts), default=0)
    if longest >= chunk.max_sequence_length:
        raise ValueError(f"prompt of {longest} tokens leaves no room in the model's {chunk.max_sequence_length}-token "
                         "context")
    if vocab_size is not None and not 0 < vocab_size <= chunk.vocab_size:
        raise ValueError(f"vocab size {vocab_size} is not within the model's {chunk.vocab_size} embedding rows")
    _check_same_arguments(rows, row_seeds, max_new_tokens, max_batch_rows)
    if not rows:
        return []
    pipeline = _Pipeline.current()
    vocab = chunk.vocab_size if vocab_size is None else vocab_size
    step = max_batch_rows or len(rows)
    modes = [(module, module.training) for module in root.modules()]  # restored exactly, module by module
    root.eval()
    try:
        with torch.no_grad():  # not inference_mode: megatron caches its RoPE table, which training reuses
            out: list[list[int]] = []
            for start in range(0, len(rows), step):
                out += _decode(chunk, pipeline, rows[start:start + step], row_seeds[start:start + step], params,
                               max_new_tokens, vocab)
            return out
    finally:
        for module, mode in modes:
            module.training = mode


def _one_chunk(model):
    """(the chunk as given, its bare GPT module) for this rank's only chunk (a virtual pipeline is refused)."""
    from megatron.core import parallel_state as ps

    if isinstance(model, (list, tuple)):
        if len(model) != 1:
            raise ValueError(f"rollouts run on one model chunk per rank, got {len(model)} (virtual pipeline "
                             "stages): train the GRPO stage without --num-layers-per-virtual-pipeline-stage")
        model = model[0]
    if (ps.get_virtual_pipeline_model_parallel_world_size() or 1) > 1:
        raise ValueError("rollouts do not run with virtual pipeline stages: train the GRPO stage without "
                         "--num-layers-per-virtual-pipeline-stage")
    chunk = unwrap(model)
    if chunk.post_process and chunk.output_layer is None:
        raise ValueError("rollouts need a language model: this one has a reward head")
    return model, chunk


def _check_same_arguments(rows, seeds, max_new_tokens, max_batch_rows) -> None:
    """Every rank of the model-parallel group (TP x PP) must decode the same rows, or their messages would not match
    (a hang or garbage): a fingerprint of the arguments is compared, and every rank raises the same ValueError."""
    from megatron.core import parallel_state as ps

    group = ps.get_model_parallel_group()
    if dist.get_world_size(group) == 1:
        return
    lengths = [len(row) for row in rows]
    mod = 2 ** 61 - 1
    fingerprint = [len(rows), max(lengths, default=0), sum(lengths), sum(sum(row) for row in rows) % mod,
                   sum(int(s) % mod for s in seeds) % mod, max_new_tokens, max_batch_rows or 0]
    mine = torch.tensor(fingerprint, dtype=torch.long, device=_group_device(group))
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, mine, group=group)
    if any(not torch.equal(other, gathered[0]) for other in gathered):
        raise ValueError("the ranks of a model-parallel group called sample_rollouts with different prompts, seeds or "
                         "budgets: every TP and PP rank of a data-parallel replica must pass the same")


def _group_device(group) -> torch.device:
    """Where a collective's tensors live: CUDA for NCCL, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@dataclass(frozen=True)
class _Pipeline:
    """This rank's place in its pipeline (global ranks, as torch.distributed's p2p takes them)."""
    size: int
    first: bool
    last: bool
    group: object = None
    previous: int | None = None  # the previous stage's rank
    next: int | None = None
    last_rank: int | None = None  # the last stage's rank: it samples and broadcasts the tokens

    @classmethod
    def current(cls) -> "_Pipeline":
        from megatron.core import parallel_state as ps

        size = ps.get_pipeline_model_parallel_world_size()
        if size == 1:
            return cls(size=1, first=True, last=True)
        first, last = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
        return cls(size=size, first=first, last=last, group=ps.get_pipeline_model_parallel_group(),
                   previous=None if first else ps.get_pipeline_model_parallel_prev_rank(),
                   next=None if last else ps.get_pipeline_model_parallel_next_rank(),
                   last_rank=ps.get_pipeline_model_parallel_last_rank())

    def receive(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        hidden = torch.empty(shape, dtype=like.dtype, device=like.device)
        dist.recv(hidden, src=self.previous, group=self.group)
        return hidden

    def send(self, hidden: torch.Tensor) -> None:
        dist.send(hidden.contiguous(), dst=self.next, group=self.group)

    def share_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """The last stage's sampled tokens on every stage."""
        if self.size > 1:
            dist.broadcast(tokens, src=self.last_rank, group=self.group)
        return tokens


def _decode(chunk, pipeline: _Pipeline, prompts: list[list[int]], seeds: list[int], params: SamplingParams,
            max_new_tokens: int, vocab: int) -> list[list[int]]:
    """One batch of rows, decoded together: each row's response tokens."""
    from tinyllm_mcore.inference.decoding import CachedDecoder

    weight = next(chunk.decoder.layers[0].parameters())
    device = weight.device
    batch, lengths = len(prompts), [len(p) for p in prompts]
    longest, context = max(lengths), chunk.max_sequence_length
    total = min(longest + max_new_tokens, context)
    budget = torch.tensor([min(max_new_tokens, context - n) for n in lengths], device=device)
    # tokens so far, right-padded with each row's own first token: the repetition penalty then sees only the row's
    # own tokens (as in generate.Generator)
    tokens = torch.tensor([p + [p[0]] * (total - len(p)) for p in prompts], dtype=torch.long, device=device)
    last = torch.tensor(lengths, device=device) - 1  # each row's last token position
    stop = torch.tensor(sorted(set(int(s) for s in params.stop_ids)) or [-1], device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    produced = torch.zeros(batch, dtype=torch.long, device=device)
    uniforms = None
    if pipeline.last and not params.is_greedy:
        uniforms = torch.stack([torch.rand(max_new_tokens, generator=torch.Generator().manual_seed(int(seed)),
                                           dtype=torch.float64) for seed in seeds]).to(device)
    hidden_size = chunk.config.hidden_size

    decoder = CachedDecoder(chunk, batch, total)
    active = torch.arange(batch, device=device)  # the rows the decoder holds, in its order
    inputs = tokens[:, :longest] if pipeline.first else pipeline.receive((batch, longest, hidden_size), weight)
    out = decoder.prefill(inputs, last + 1)
    while True:
        if pipeline.last:
            sampled = _sample(out[:, :vocab], tokens[active, : int(last.max()) + 1], params,
                              None if uniforms is None else uniforms[active], produced[active])
        else:
            pipeline.send(out)
            sampled = torch.empty(active.numel(), dtype=torch.long, device=device)
        sampled = pipeline.share_tokens(sampled)
        finished = done[active]
        generating = ~finished
        position = last[active]
        new = torch.where(finished, tokens[active, position], sampled)  # a finished row keeps its last token
        position += generating.long()
        last[active], tokens[active, position] = position, new
        produced[active] += generating.long()
        done[active] = finished | (torch.isin(new, stop) | (produced[active] >= budget[active]))
        if bool(done.all()):
            break
        going = ~done[active]
        if int(going.sum()) <= active.numel() * 3 // 4:
            # a quarter of the decoder's rows have finished: they leave it (every rank decides alike, from the same
            # tokens); copying the caches this way costs at most a few full copies over the whole decode
            keep = torch.nonzero(going).squeeze(1)
            decoder.select(keep)
            active, new = active[keep], new[keep]
        inputs = new if pipeline.first else pipeline.receive((active.numel(), 1, hidden_size), weight)
        out = decoder.decode(inputs, last[active])
    start = torch.tensor(lengths, device=device)
    return [row[s:s + n] for row, s, n in zip(tokens.tolist(), start.tolist(), produced.tolist())]


# The inverse CDF is found in two levels: the cumulative sum over blocks of this many vocabulary entries, then within
# the chosen block. Only the [b, V] probabilities' block sums touch the whole vocabulary (float32); the short sums are
# float64. One float64 cumulative sum over [128, 64798] probabilities took ~165 ms on this project's CPU (1 thread),
# more than a 16m decode step; this takes ~25 ms, and torch.multinomial ~490 ms.
SAMPLING_BLOCK = 256


def _sample(logits: torch.Tensor, seen: torch.Tensor, params: SamplingParams, uniforms: torch.Tensor | None,
            produced: torch.Tensor) -> torch.Tensor:
    """Each row's next token [b] from its logits [b, V]: the argmax, or the inverse CDF of its filtered distribution
    at the row's next uniform (the first token whose cumulative probability exceeds u x the total)."""
    logits = process_logits(logits, seen, params)
    if params.is_greedy:
        return logits.argmax(dim=-1)
    b, vocab = logits.shape
    probs = logits.softmax(dim=-1)
    # block sums without a padded copy: whole blocks as a view, then the remainder's
    whole = vocab // SAMPLING_BLOCK * SAMPLING_BLOCK
    sums = [probs[:, :whole].unflatten(1, (-1, SAMPLING_BLOCK)).sum(dim=-1)] + (
        [probs[:, whole:].sum(dim=-1, keepdim=True)] if whole < vocab else [])
    cdf = torch.cat(sums, dim=1).double().cumsum(dim=-1)  # [b, blocks]
    total = cdf[:, -1:]
    u = uniforms.gather(1, produced.clamp(max=uniforms.size(1) - 1)[:, None])
    # strictly below each sum it is compared with, so the position found exists and has a positive probability:
    # cdf[j - 1] <= point < cdf[j] means block j has positive mass, and within it the same holds for the token
    point = _below(u * total, total)
    block = torch.searchsorted(cdf, point, right=True)  # [b, 1]
    before = torch.where(block > 0, cdf.gather(1, (block - 1).clamp(min=0)), torch.zeros_like(point))
    ids = block * SAMPLING_BLOCK + torch.arange(SAMPLING_BLOCK, device=block.device)  # [b, B]
    within = probs.gather(1, ids.clamp(max=vocab - 1)).masked_fill(ids >= vocab, 0.0).double().cumsum(dim=-1)
    offset = torch.searchsorted(within, _below(point - before, within[:, -1:]), right=True)
    return ids.gather(1, offset).squeeze(-1)


def _below(x: torch.Tensor, limit: torch.Tensor) -> torch.Tensor:
    """x, but at most the largest float64 under limit."""
    return torch.minimum(x, torch.nextafter(limit, torch.zeros_like(limit)))
