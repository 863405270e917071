"""CachedDecoder: the KV-cached forward that generation (inference/generate.py) and GRPO rollouts
(inference/rollout.py) run, on one pipeline chunk of a built model. Training never calls it."""
from __future__ import annotations

import torch

from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.mlp import MLP

from tinyllm_mcore.model.lora import adapter_beside


# Up to this many rows (sequences), the output layer runs as whichever of F.linear and [vocab, h] @ [h, rows] on its
# own weight is faster on this machine (`head_product`); more rows run over an [h, vocab] copy (`HeadCopy`) when the
# caller keeps one. Which few-row product is faster depends on the CPU and the MKL build, by up to 2x either way
# (benchmarks/bench_output_layer.py; docs/benchmarks.md, generation): one machine measured 92m's 64896 x 512 at 1 / 2
# / 8 rows as F.linear 12.4 / 29.9 / 25.9 ms vs weight @ columns 7.1 / 7.1 / 16.2 ms, another 9.5 / 10.1 / 32.2 vs
# 19.2 / 20.3 / 23.2 ms.
FEW_ROWS = 8


def _product_linear(weight: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.linear(hidden, weight)


def _product_columns(weight: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    # [vocab, h] @ [h, rows] on the weight itself; a single row goes in twice, as MKL's one-column product takes a slow
    # path on some CPUs
    rows = hidden.size(0)
    columns = hidden.t() if rows > 1 else hidden.repeat(2, 1).t()
    return (weight @ columns).t()[:rows].contiguous()


HEAD_PRODUCTS = {"linear": _product_linear, "columns": _product_columns}
# (weight shape, dtype, device, rows, threads) -> the faster product's name, measured once per process (as
# cudnn.benchmark keeps its choices): a property of the machine, not of a run
_HEAD_PRODUCT_CHOICE: dict[tuple, str] = {}


def head_product(weight: torch.Tensor, hidden: torch.Tensor, tp_group=None) -> str:
    """The faster few-row output-layer product here, timed on first use for this shape and thread count (best of 3
    alternating runs each, ~10 products); under TP, tensor-parallel rank 0's choice for every rank of the group, so
    the ranks run alike. TINYLLM_HEAD_PRODUCT=linear|columns fixes it (reproducible timings)."""
    import os
    import time

    fixed = os.environ.get("TINYLLM_HEAD_PRODUCT")
    if fixed:
        if fixed not in HEAD_PRODUCTS:
            raise ValueError(f"TINYLLM_HEAD_PRODUCT={fixed}: use one of {', '.join(HEAD_PRODUCTS)}")
        return fixed
    key = (tuple(weight.shape), weight.dtype, weight.device, hidden.size(0), torch.get_num_threads())
    if key not in _HEAD_PRODUCT_CHOICE:
        names = list(HEAD_PRODUCTS)
        best = {name: float("inf") for name in names}
        with torch.no_grad():
            for name in names:
                HEAD_PRODUCTS[name](weight, hidden)  # warm-up (MKL's first-call setup)
            for _ in range(3):
                for name in names:
                    t0 = time.perf_counter()
                    HEAD_PRODUCTS[name](weight, hidden)
                    best[name] = min(best[name], time.perf_counter() - t0)
        choice = min(names, key=best.__getitem__)
        if tp_group is not None and tp_group.size() > 1:
            import torch.distributed as dist

            index = torch.tensor([names.index(choice)], dtype=torch.long, device=hidden.device)
            dist.broadcast(index, src=dist.get_global_rank(tp_group, 0), group=tp_group)
            choice = names[int(index)]
        _HEAD_PRODUCT_CHOICE[key] = choice
    return _HEAD_PRODUCT_CHOICE[key]


class CachedDecoder:
    """A KV-cached inference forward over a built model chunk's own modules and weights, caching *rotated* keys.

    A chunk is the whole model at PP1, or one pipeline stage: the first stage (pre_process) embeds tokens, others take
    the previous stage's hidden states [b, s, h]; the last stage (post_process) returns logits, others their hidden
    states [b, s, h] (every position: the next stage caches their keys and values). Moving them between stages is
    the caller's (inference/rollout.py).

    megatron-core's static inference context caches keys before RoPE and rotates all cached keys again in every layer
    at every step, and its paths that cache rotated keys (flash decode, the dynamic engine) need CUDA flash-attn.
    Here RoPE is applied once per key and keys/values go to preallocated [b, groups, max_length, head_dim] buffers;
    activations stay [b, s, h]. The local spec's parallel linears run as `F.linear` on their own (TP-sharded)
    [out, in] weights, plus megatron's TP all-reduce / all-gather where their forward would communicate (skipping
    megatron's autograd wrappers); other modules (Transformer Engine's fused norm+linear, MoE layers) are called as
    modules. Only each sequence's last prompt position goes past the last layer's attention in the prompt forward
    (the other positions only need their keys and values cached), and only that position reaches the output layer.

    The output layer is the one large weight, and a few rows times megatron's [vocab, h] weight through `F.linear`
    take 1.3-4x longer on a CPU than the same product laid out otherwise (MKL packs the whole transposed weight per
    call on some CPUs, the reverse on others): up to FEW_ROWS sequences it runs as whichever of `F.linear` and
    weight @ hidden^T this machine computes faster (`head_product`, timed once per process and shape), above that over
    a `HeadCopy` when the caller keeps one (a contiguous [h, vocab] copy, kept across calls). The layers' smaller weights run as fast through
    `F.linear`.

    Sequences keep their own positions: a batch of prompts is right-padded (causal attention keeps padding out of
    every real token's view) and each sequence then decodes at its own next position, with a key mask only when
    positions differ. The rotate-half RoPE, q/k/v split and SwiGLU are megatron's (rope_utils, attention, mlp).
    """

    def __init__(self, model: GPTModel, batch_size: int, max_length: int, head_copy: "HeadCopy | None" = None):
        self.model = model
        self.first, self.last = model.pre_process, model.post_process
        self.layers = list(model.decoder.layers)
        if not self.layers:
            raise ValueError("cached decoding needs at least one transformer layer in each pipeline chunk")
        check_sequence_parallel(model)
        attention = self.layers[0].self_attention
        self.heads = attention.num_attention_heads_per_partition
        self.groups = attention.num_query_groups_per_partition
        self.head_dim = attention.hidden_size_per_attention_head
        self.softmax_scale = getattr(attention.core_attention, "softmax_scale", None)
        self.tp = parallel_state.get_tensor_model_parallel_world_size()
        weight = next(self.layers[0].parameters())  # the chunk's weights' dtype and device
        shape = (batch_size, self.groups, max_length, self.head_dim)
        # zeros, not empty: a masked slot still enters attention's probabilities @ values as 0 x value (NaN if unset)
        self.keys = [torch.zeros(shape, dtype=weight.dtype, device=weight.device) for _ in self.layers]
        self.values = [torch.zeros(shape, dtype=weight.dtype, device=weight.device) for _ in self.layers]
        # megatron's RoPE table (cached per length: ask for the model's full length, then slice) [max_length, head_dim]
        freqs = model.rotary_pos_emb(max(model.max_sequence_length, max_length))[:max_length, 0, 0, :]
        self.cos, self.sin = freqs.cos().to(weight.dtype), freqs.sin().to(weight.dtype)
        self.rows = torch.arange(batch_size, device=weight.device)
        self.head_in_out = (head_copy.of(model) if head_copy is not None and self.last and batch_size > FEW_ROWS
                            else None)

    def prefill(self, inputs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Right-padded prompts (row i's prompt: its first lengths[i] positions) -> logits [b, vocab] at each prompt's
        last token; caches positions 0..s-1. `inputs`: tokens [b, s] on the first stage, else the previous stage's
        hidden states [b, s, h]; a stage before the last returns its hidden states [b, s, h]."""
        s = inputs.size(1)
        cos, sin = self.cos[:s, None, :], self.sin[:s, None, :]  # broadcast over [b, s, heads, head_dim]

        def store(cache, new):  # new [b, s, groups, head_dim]
            cache[:, :, :s] = new.transpose(1, 2)
            return cache[:, :, :s]

        hidden = self._layers(inputs, cos, sin, store, mask=None, causal=True, keep=lengths - 1 if self.last else None)
        return self._logits(hidden[:, 0]) if self.last else hidden

    def decode(self, inputs: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One new position per sequence at its own position [b] -> logits [b, vocab]. `inputs`: tokens [b] on the
        first stage, else the previous stage's hidden states [b, 1, h]; a stage before the last returns [b, 1, h]."""
        length = int(positions.max()) + 1
        mask = None
        if int(positions.min()) + 1 != length:  # sequences at different positions: hide each one's later slots
            mask = (torch.arange(length, device=positions.device) <= positions[:, None])[:, None, None, :]
        cos, sin = self.cos[positions][:, None, None, :], self.sin[positions][:, None, None, :]

        def store(cache, new):  # new [b, 1, groups, head_dim]
            cache[self.rows, :, positions] = new[:, 0]
            return cache[:, :, :length]

        hidden = self._layers(inputs[:, None] if self.first else inputs, cos, sin, store, mask=mask, causal=False)
        return self._logits(hidden[:, -1]) if self.last else hidden

    def select(self, rows: torch.Tensor) -> None:
        """Keep only these sequences (indices into the current batch, in their new order), e.g. the unfinished ones;
        later calls take inputs for these rows only."""
        for cache in (self.keys, self.values):
            for i, layer_cache in enumerate(cache):  # one layer at a time: at most one extra layer's cache at once
                cache[i] = layer_cache[rows]
        self.rows = torch.arange(rows.numel(), device=rows.device)

    def _layers(self, inputs, cos, sin, store, mask, causal, keep=None):
        """Embedding (first stage) and the chunk's layers; with `keep` [b] (the last stage's prompt forward), the last
        layer continues past its attention with only position keep[i] of row i, and the result is [b, 1, h]."""
        b, s = inputs.shape[:2]
        d, q_per_group = self.head_dim, self.heads // self.groups
        hidden = self._embed(inputs) if self.first else inputs  # [b, s, h]
        for layer, key_cache, value_cache in zip(self.layers, self.keys, self.values):
            attention = layer.self_attention
            qkv = self._linear(attention.linear_qkv, layer.input_layernorm(hidden),
                               adapter_beside(attention, "linear_qkv")).view(b, s, self.groups, -1)
            query, key, value = qkv.split([q_per_group * d, d, d], dim=-1)
            query = _rotate(query.reshape(b, s, self.heads, d), cos, sin)
            keys, values = store(key_cache, _rotate(key, cos, sin)), store(value_cache, value)
            if keep is not None and layer is self.layers[-1]:
                # nothing reads the other positions' outputs of the last layer: one query per sequence, which sees
                # its own prompt (a key mask only where prompts are shorter than the batch's longest)
                hidden, query = hidden[self.rows, keep][:, None], query[self.rows, keep][:, None]
                s, causal = 1, False
                if int(keep.min()) + 1 != keys.size(2):
                    mask = (torch.arange(keys.size(2), device=keep.device) <= keep[:, None])[:, None, None, :]
            context = torch.nn.functional.scaled_dot_product_attention(
                query.transpose(1, 2), keys, values, attn_mask=mask, is_causal=causal, scale=self.softmax_scale,
                enable_gqa=q_per_group > 1)
            hidden = hidden + self._linear(attention.linear_proj, context.transpose(1, 2).reshape(b, s, -1),
                                           adapter_beside(attention, "linear_proj"))
            hidden = hidden + self._mlp(layer.mlp, layer.pre_mlp_layernorm(hidden))
        return hidden

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """[b, s] -> [b, s, h]; no embedding dropout in eval. Under sequence parallelism megatron's embedding would
        reduce-scatter its output over the sequence: here the TP shards' lookups are all-reduced instead, as every
        activation of this decoder is whole on every TP rank."""
        embedding = self.model.embedding.word_embeddings
        if not getattr(embedding, "reduce_scatter_embeddings", False):
            return embedding(tokens)
        outside = (tokens < embedding.vocab_start_index) | (tokens >= embedding.vocab_end_index)
        local = torch.nn.functional.embedding((tokens - embedding.vocab_start_index).masked_fill(outside, 0),
                                              embedding.weight).masked_fill(outside[..., None], 0.0)
        return tensor_parallel.reduce_from_tensor_model_parallel_region(local, group=embedding.tp_group)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        output_layer, hidden = self.model.output_layer, self.model.decoder.final_layernorm(hidden)
        if not _plain(output_layer):  # it gathers its output itself
            return self._linear(output_layer, hidden)
        rows = hidden.size(0)
        if self.head_in_out is not None:
            logits = hidden @ self.head_in_out
        elif rows > FEW_ROWS:  # no copy (rollouts make none): at many rows F.linear is as fast as the copy
            logits = torch.nn.functional.linear(hidden, output_layer.weight)
        else:
            product = head_product(output_layer.weight, hidden, output_layer.tp_group if self.tp > 1 else None)
            logits = HEAD_PRODUCTS[product](output_layer.weight, hidden)
        logits = logits if output_layer.bias is None else logits + output_layer.bias
        return tensor_parallel.gather_from_tensor_model_parallel_region(logits) if self.tp > 1 else logits

    def _linear(self, linear, x: torch.Tensor, adapter=None) -> torch.Tensor:
        """A megatron linear's output with its bias (and its LoRA `adapter`'s output: model/lora.py) added;
        column-parallel outputs stay sharded, as the module's."""
        if not _plain(linear):
            out, bias = linear(x)  # through its forward hooks: a LoRA adapter is included
            return out if bias is None else out + bias
        if type(linear) is tensor_parallel.RowParallelLinear and linear.tp_group.size() > 1:
            # the bias joins after the all-reduce, once (as megatron's row-parallel forward adds it)
            out = tensor_parallel.reduce_from_tensor_model_parallel_region(
                torch.nn.functional.linear(x, linear.weight), group=linear.tp_group)
            out = out if linear.bias is None else out + linear.bias
        else:
            out = torch.nn.functional.linear(x, linear.weight, linear.bias)
        return out if adapter is None else out + adapter.delta(x, sequence_parallel=False)

    def _mlp(self, mlp, x: torch.Tensor) -> torch.Tensor:
        """megatron's MLP (SwiGLU: fc1 = [gate; up] per TP shard) on plain ops; other MLPs (MoE) as modules."""
        if type(mlp) is not MLP:
            out, bias = mlp(x)
            return out if bias is None else out + bias
        intermediate = self._linear(mlp.linear_fc1, x, adapter_beside(mlp, "linear_fc1"))
        if mlp.config.gated_linear_unit:
            gate, up = torch.chunk(intermediate, 2, dim=-1)
            intermediate = mlp.config.activation_func(gate) * up
        else:
            intermediate = mlp.activation_func(intermediate)
        return self._linear(mlp.linear_fc2, intermediate, adapter_beside(mlp, "linear_fc2"))


class HeadCopy:
    """The output layer's weight as a contiguous [h, vocab] copy for `CachedDecoder` batches of more than FEW_ROWS
    sequences, made at the first such call and reused while the weight is unchanged (one extra copy of the output
    layer's TP shard, the only one; none is made while batches stay at FEW_ROWS or fewer).

    Invalidation: the copy is remade when the output layer's weight is another tensor or was modified in place
    through the parameter (an optimizer step, `load_state_dict`, `copy_` under no_grad: each bumps the tensor's
    version counter). A write through `weight.data` bumps nothing: after one, make a new Generator."""

    def __init__(self):
        self._key, self._copy = None, None

    def of(self, model: GPTModel) -> torch.Tensor | None:
        linear = model.output_layer
        if not _plain(linear):
            return None
        weight = linear.weight
        key = (id(weight), weight.data_ptr(), weight._version, weight.dtype, weight.shape)
        if key != self._key:
            self._copy = None  # let the old copy go before making the new one
            self._copy, self._key = weight.detach().t().contiguous(), key
        return self._copy


def check_sequence_parallel(model: GPTModel) -> None:
    """Under sequence parallelism the decoder keeps every activation whole on every TP rank and does the TP
    communication itself, which it can only for the local spec's plain linears and MLPs (megatron's column/row
    parallel linears, its dense MLP); Transformer Engine's linears and MoE layers would split or gather the sequence
    themselves. A ValueError names what is in the way."""
    if not model.config.sequence_parallel:
        return
    for layer in model.decoder.layers:
        attention = layer.self_attention
        if type(layer.mlp) is not MLP:
            raise ValueError(f"cached decoding with sequence parallelism needs dense MLP layers, not "
                             f"{type(layer.mlp).__name__} (MoE): decode at TP1, or without --sequence-parallel")
        linears = (attention.linear_qkv, attention.linear_proj, layer.mlp.linear_fc1, layer.mlp.linear_fc2)
        if not all(_plain(linear) for linear in linears):
            raise ValueError("cached decoding with sequence parallelism needs the local layer spec's linears, not "
                             f"{type(attention.linear_qkv).__name__} (Transformer Engine): use "
                             "--transformer-impl local, or no --sequence-parallel")


def _rotate(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE over the whole head dim (rotary_percent 1), as megatron's rope_utils computes it."""
    first, second = torch.chunk(t, 2, dim=-1)
    return t * cos + torch.cat((-second, first), dim=-1) * sin


def _plain(linear) -> bool:
    """megatron's own column/row-parallel linear whose forward is a matmul (+ TP reduce), no gather / SP."""
    if type(linear) is tensor_parallel.ColumnParallelLinear:
        return not linear.gather_output
    return type(linear) is tensor_parallel.RowParallelLinear
