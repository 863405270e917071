"""The megatron-core <-> Hugging Face parameter table: one entry per megatron tensor, each carrying its transform.

``mapping_table(preset, padded_vocab)`` lists, in model order, which HF tensors make up each megatron tensor and how
(``Entry.transform``); the same table converts in both directions, gives every tensor's shape on both sides and is
the only place that knows megatron's layouts. Nothing is guessed from a name.

HF side (Qwen2 / Llama / the seed's ``tinyllm``, identical names)::

    model.embed_tokens.weight                        [V, h]
    model.layers.{i}.input_layernorm.weight          [h]
    model.layers.{i}.self_attn.{q,k,v}_proj.weight   [nq*d | nkv*d, h]    (+ .bias: q/k/v only; Llama may add o)
    model.layers.{i}.self_attn.o_proj.weight         [h, nq*d]
    model.layers.{i}.post_attention_layernorm.weight [h]
    model.layers.{i}.mlp.{gate,up}_proj.weight       [f, h]
    model.layers.{i}.mlp.down_proj.weight            [h, f]
    model.norm.weight                                [h]
    lm_head.weight                                   [V, h]     (absent when tie_word_embeddings)

megatron side: the GPTModel's ``state_dict()`` names (local spec; what a TP1/PP1 model holds = the global tensors)::

    embedding.word_embeddings.weight                 [V_pad, h]   rows >= V are TP padding   (PaddedVocab)
    decoder.layers.{i}.input_layernorm.weight        (TE spec: self_attention.linear_qkv.layer_norm_weight)
    decoder.layers.{i}.self_attention.linear_qkv.{weight,bias}
        per query group g: [q heads of g; k_g; v_g], groups in order  ->  [(nq + 2 nkv) d, h]        (FusedQKV)
    decoder.layers.{i}.self_attention.linear_proj.weight
    decoder.layers.{i}.pre_mlp_layernorm.weight      (TE spec: mlp.linear_fc1.layer_norm_weight)
    decoder.layers.{i}.mlp.linear_fc1.weight         [gate; up]  ->  [2f, h]                       (GateUp)
    decoder.layers.{i}.mlp.linear_fc2.weight
    decoder.final_layernorm.weight
    output_layer.weight                              [V_pad, h]                                    (PaddedVocab)

MoE models (preset.num_experts > 0) are HF's native Qwen2-MoE (``Qwen2MoeForCausalLM``, the per-expert tensor names
that transformers 4.x and 5.x save and load); attention, norms, embeddings as above, and each layer's MLP is::

    HF model.layers.{i}.mlp.                          megatron decoder.layers.{i}.mlp.
      gate.weight                [E, h]                 router.weight                      (TopKRouter, no bias)
      experts.{e}.gate_proj.weight  [f, h]  \\
      experts.{e}.up_proj.weight    [f, h]  /            experts.local_experts.{e}.linear_fc1.weight  [gate; up] [2f, h]
      experts.{e}.down_proj.weight  [h, f]              experts.local_experts.{e}.linear_fc2.weight
      shared_expert.{gate,up}_proj.weight [s, h]        shared_experts.linear_fc1.weight  [gate; up] [2s, h]
      shared_expert.down_proj.weight      [h, s]        shared_experts.linear_fc2.weight
      shared_expert_gate.weight           [1, h]        shared_experts.gate_weight   (output x sigmoid(gate . x))

f = moe_intermediate_size (preset.ffn_hidden_size), s = shared_expert_intermediate_size. The experts are megatron's
SequentialMLP (one megatron MLP per expert; grouped GEMM needs CUDA), so their layouts are the dense MLP's. Without a
shared expert megatron has none; Qwen2-MoE always builds one, so the export writes it with s = 0 (empty tensors and a
zero gate: it adds exactly 0) and the import ignores an empty one (``HFOnly`` entries). Routing is Qwen2-MoE's:
softmax over all E router logits in fp32, top k, renormalised iff ``norm_topk_prob`` — build.transformer_config
sets megatron's router to match (``moe_router_pre_softmax = not norm_topk_prob``).

Dist checkpoints (``GPTModel.sharded_state_dict()``, measured on megatron-core 0.16.1) store the same tensors as
*global* arrays under layer-stacked keys: ``decoder.layers.<suffix>`` with a leading axis of ``num_layers`` (global
layer index, so PP stages write disjoint slices), both layer specs using the TE layer-norm names; MoE experts are
stacked again under ``decoder.layers.mlp.experts.experts.linear_fc{1,2}.weight`` [L, E, ...]. TP shards are slices of
the global arrays (QKV rows by query group, fc1 as [gate of all ranks; up of all ranks]), so the global layouts above
do not depend on TP. Only the embedding/output row count does (padded to a multiple of 128 x TP); megatron marks those
two with allow_shape_mismatch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Protocol

import torch
from torch import Tensor

from tinyllm_mcore.model.presets import ModelPreset, padded_vocab_size

Shape = tuple[int, ...]

HF_EMBED, HF_NORM, HF_LM_HEAD = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"
MC_EMBED, MC_NORM, MC_OUTPUT = "embedding.word_embeddings.weight", "decoder.final_layernorm.weight", "output_layer.weight"
HF_O_BIAS = "self_attn.o_proj.bias"  # Llama's; our architecture has none (exported as zeros for the llama arch)

# megatron layer-local names: local spec -> TE spec (the TE spec fuses the pre-norms into the next linear)
LOCAL_TO_TE = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}
TE_TO_LOCAL = {te: local for local, te in LOCAL_TO_TE.items()}


class MappingError(ValueError):
    """Tensors that do not fit the preset (reported as one line by the converters)."""


# ------------------------------------------------------------------------------------------------ transforms
class Transform(Protocol):
    """Turns the HF tensors of one entry into its megatron tensor (to_megatron) and back (to_hf)."""

    def to_megatron(self, parts: list[Tensor]) -> Tensor | None: ...

    def to_hf(self, tensor: Tensor) -> list[Tensor]: ...


class Copy:
    """One HF tensor is the megatron tensor."""

    def to_megatron(self, parts: list[Tensor]) -> Tensor:
        return parts[0]

    def to_hf(self, tensor: Tensor) -> list[Tensor]:
        return [tensor]


@dataclass(frozen=True)
class PaddedVocab:
    """Embedding / output rows: megatron appends zero rows up to the TP-padded vocab (never produced or targeted)."""
    vocab_size: int
    padded_vocab: int

    def to_megatron(self, parts: list[Tensor]) -> Tensor:
        return pad_vocab_rows(parts[0], self.padded_vocab)

    def to_hf(self, tensor: Tensor) -> list[Tensor]:
        return [tensor[:self.vocab_size]]


@dataclass(frozen=True)
class FusedQKV:
    """HF q, k, v -> megatron's fused QKV: per query group, its q heads, then its k head, then its v head."""
    query_groups: int
    head_dim: int
    heads_per_group: int

    def to_megatron(self, parts: list[Tensor]) -> Tensor:
        q, k, v = parts
        rest, g, d = q.shape[1:], self.query_groups, self.head_dim
        return torch.cat([q.reshape(g, self.heads_per_group * d, *rest), k.reshape(g, d, *rest),
                          v.reshape(g, d, *rest)], dim=1).reshape(-1, *rest)

    def to_hf(self, tensor: Tensor) -> list[Tensor]:
        rest, g, d = tensor.shape[1:], self.query_groups, self.head_dim
        q, k, v = tensor.reshape(g, (self.heads_per_group + 2) * d, *rest).split(
            [self.heads_per_group * d, d, d], dim=1)
        return [q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)]


class GateUp:
    """HF gate_proj and up_proj -> megatron's SwiGLU linear_fc1 = [gate; up] (dense MLP, each expert, shared expert)."""

    def to_megatron(self, parts: list[Tensor]) -> Tensor:
        return torch.cat(parts)

    def to_hf(self, tensor: Tensor) -> list[Tensor]:
        return list(tensor.chunk(2))


@dataclass(frozen=True)
class HFOnly:
    """HF tensors megatron's model has no counterpart for, exported as zeros: Llama's o_proj bias (must be zero on
    import: our attention has none) and Qwen2-MoE's shared expert of width 0 (empty; its gate then multiplies 0)."""
    must_be_zero: bool

    def to_megatron(self, parts: list[Tensor]) -> None:
        return None

    def to_hf(self, tensor: None) -> list[Tensor]:
        raise AssertionError("HFOnly entries are written as zeros by megatron_to_hf")


@dataclass(frozen=True)
class Entry:
    """One megatron tensor (local-spec state-dict name; None for HFOnly) and the HF tensors it is made of."""
    megatron: str | None
    megatron_shape: Shape | None
    hf: tuple[str, ...]
    hf_shapes: tuple[Shape, ...]
    transform: Transform
    # q/k/v biases: a Llama without attention bias has none; they are then zeros
    absent_means_zero: bool = False


def pad_vocab_rows(w: Tensor, padded_vocab: int) -> Tensor:
    """Append zero rows up to the TP-padded vocab."""
    if w.shape[0] == padded_vocab:
        return w
    return torch.cat([w, w.new_zeros(padded_vocab - w.shape[0], *w.shape[1:])])


# ------------------------------------------------------------------------------------------------ the table
def _layer_entries(p: ModelPreset, i: int, o_proj_bias: bool) -> list[Entry]:
    h, d, f = p.hidden_size, p.head_dim, p.ffn_hidden_size
    q, kv = p.num_attention_heads * d, p.kv_heads * d
    qkv = FusedQKV(p.kv_heads, d, p.num_attention_heads // p.kv_heads)
    mc, hf = (lambda n: f"decoder.layers.{i}.{n}"), (lambda n: f"model.layers.{i}.{n}")

    def entry(mc_name, mc_shape, hf_names, hf_shapes, transform, **kw):
        return Entry(mc(mc_name), mc_shape, tuple(hf(n) for n in hf_names), tuple(hf_shapes), transform, **kw)

    def swiglu(mc_prefix: str, hf_prefix: str, width: int) -> list[Entry]:
        return [entry(f"{mc_prefix}.linear_fc1.weight", (2 * width, h),
                      [f"{hf_prefix}.gate_proj.weight", f"{hf_prefix}.up_proj.weight"], [(width, h)] * 2, GateUp()),
                entry(f"{mc_prefix}.linear_fc2.weight", (h, width), [f"{hf_prefix}.down_proj.weight"], [(h, width)],
                      Copy())]

    entries = [
        entry("input_layernorm.weight", (h,), ["input_layernorm.weight"], [(h,)], Copy()),
        entry("self_attention.linear_qkv.weight", (q + 2 * kv, h),
              ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"],
              [(q, h), (kv, h), (kv, h)], qkv),
        entry("self_attention.linear_qkv.bias", (q + 2 * kv,),
              ["self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"], [(q,), (kv,), (kv,)], qkv,
              absent_means_zero=True),
        entry("self_attention.linear_proj.weight", (h, q), ["self_attn.o_proj.weight"], [(h, q)], Copy()),
    ]
    if o_proj_bias:
        entries.append(Entry(None, None, (hf(HF_O_BIAS),), ((h,),), HFOnly(must_be_zero=True)))
    entries.append(entry("pre_mlp_layernorm.weight", (h,), ["post_attention_layernorm.weight"], [(h,)], Copy()))
    if not p.num_experts:
        return entries + swiglu("mlp", "mlp", f)
    entries.append(entry("mlp.router.weight", (p.num_experts, h), ["mlp.gate.weight"], [(p.num_experts, h)], Copy()))
    for e in range(p.num_experts):
        entries += swiglu(f"mlp.experts.local_experts.{e}", f"mlp.experts.{e}", f)
    s = p.moe_shared_expert_ffn_hidden_size or 0
    if s:
        entries += swiglu("mlp.shared_experts", "mlp.shared_expert", s)
        entries.append(entry("mlp.shared_experts.gate_weight", (1, h), ["mlp.shared_expert_gate.weight"], [(1, h)],
                             Copy()))
    else:
        entries.append(Entry(None, None, tuple(hf(f"mlp.shared_expert.{n}_proj.weight") for n in ("gate", "up", "down"))
                             + (hf("mlp.shared_expert_gate.weight"),), ((0, h), (0, h), (h, 0), (1, h)),
                             HFOnly(must_be_zero=False)))
    return entries


def mapping_table(preset: ModelPreset, padded_vocab: int, *, tied: bool = False,
                  o_proj_bias: bool = False) -> list[Entry]:
    """Every megatron tensor of the preset's model, in model order, with the HF tensors it is made of.

    ``tied``: the HF model has no lm_head (the output layer is read from the embedding; import only).
    ``o_proj_bias``: list Llama's o_proj bias (zeros on export; must be zero on import).
    """
    h, v = preset.hidden_size, preset.vocab_size
    vocab = PaddedVocab(v, padded_vocab)
    table = [Entry(MC_EMBED, (padded_vocab, h), (HF_EMBED,), ((v, h),), vocab)]
    for i in range(preset.num_layers):
        table += _layer_entries(preset, i, o_proj_bias)
    table.append(Entry(MC_NORM, (h,), (HF_NORM,), ((h,),), Copy()))
    table.append(Entry(MC_OUTPUT, (padded_vocab, h), (HF_EMBED if tied else HF_LM_HEAD,), ((v, h),), vocab))
    return table


def hf_shapes(preset: ModelPreset, *, o_proj_bias: bool = False, tied: bool = False) -> dict[str, Shape]:
    """Every HF tensor name -> shape for this preset (unpadded vocab), as the export writes them."""
    table = mapping_table(preset, preset.vocab_size, tied=tied, o_proj_bias=o_proj_bias)
    return {name: shape for e in table for name, shape in zip(e.hf, e.hf_shapes)}


def megatron_shapes(preset: ModelPreset, padded_vocab: int) -> dict[str, Shape]:
    """Every megatron state-dict name (local spec) -> shape of the global (TP1/PP1) tensor."""
    return {e.megatron: e.megatron_shape for e in mapping_table(preset, padded_vocab) if e.megatron is not None}


def te_name(local_name: str) -> str:
    """A megatron layer-local name as the TE spec spells it (the fused pre-norms)."""
    return LOCAL_TO_TE.get(local_name, local_name)


def local_name(name: str) -> str:
    """A megatron state-dict or dist-checkpoint name with TE layer-norm names rewritten to the local spec's."""
    for te, local in TE_TO_LOCAL.items():
        if name.endswith("." + te):
            return name[: -len(te)] + local
    return name


_LAYERS, _EXPERTS = "decoder.layers.", "mlp.experts.local_experts."
_STACKED_EXPERTS = "decoder.layers.mlp.experts.experts."


def dist_checkpoint_key(name: str) -> tuple[str, tuple[int, ...]]:
    """A whole-model state-dict name (local spec) -> its dist-checkpoint key (layers stacked, TE names) and its index
    along the stacked axes: () outside the layers, (layer,) in a layer, (layer, expert) for a MoE expert's linear."""
    if not name.startswith(_LAYERS):
        return name, ()
    layer, layer_local = name[len(_LAYERS):].split(".", 1)
    if layer_local.startswith(_EXPERTS):
        expert, linear = layer_local[len(_EXPERTS):].split(".", 1)
        return _STACKED_EXPERTS + linear, (int(layer), int(expert))
    return _LAYERS + te_name(layer_local), (int(layer),)


def whole_model_name(key: str, index: tuple[int, ...]) -> str:
    """The inverse of dist_checkpoint_key: a dist-checkpoint key (either layer spec's names) and its index along the
    stacked axes (a ShardedTensor's first ``prepend_axis_num`` offsets: global layer, expert) -> the whole model's
    local-spec state-dict name."""
    if key.startswith(_STACKED_EXPERTS) and len(index) == 2:
        return f"{_LAYERS}{index[0]}.{_EXPERTS}{index[1]}.{key[len(_STACKED_EXPERTS):]}"
    if key.startswith(_LAYERS) and len(index) == 1:
        return local_name(f"{_LAYERS}{index[0]}.{key[len(_LAYERS):]}")
    if index:
        raise MappingError(f"dist-checkpoint key {key} with {len(index)} stacked axes is not part of this model")
    return key


def dist_checkpoint_shapes(preset: ModelPreset, tensor_model_parallel_size: int = 1,
                           make_vocab_size_divisible_by: int = 128) -> dict[str, Shape]:
    """Dist-checkpoint key -> global shape, as GPTModel.sharded_state_dict() writes them (layers stacked, TE names;
    MoE experts stacked too: ``decoder.layers.mlp.experts.experts.<linear>`` [L, E, ...])."""
    padded = padded_vocab_size(preset.vocab_size, tensor_model_parallel_size, make_vocab_size_divisible_by)
    stacked = {1: (preset.num_layers,), 2: (preset.num_layers, preset.num_experts)}
    out = {}
    for name, shape in megatron_shapes(preset, padded).items():
        key, index = dist_checkpoint_key(name)
        out[key] = (*stacked.get(len(index), ()), *shape)
    return out


# ------------------------------------------------------------------------------------------------ conversion
def check_finite(name: str, t: Tensor, where: str) -> Tensor:
    """Refuse a tensor with NaN/inf values: a converted model with them would only produce NaN losses/logits later."""
    bad = t.numel() - int(torch.isfinite(t).sum())
    if bad:
        raise MappingError(f"{name} ({where}) has {bad} non-finite value(s) (NaN/inf); refusing to convert "
                           "(--allow-non-finite converts anyway)")
    return t


def _check_shape(name: str, t: Tensor, shape: Shape) -> Tensor:
    if tuple(t.shape) != tuple(shape):
        raise MappingError(f"{name}: shape {tuple(t.shape)} does not match the config's {tuple(shape)}")
    return t


def hf_to_megatron(table: list[Entry], read_hf: Callable[[str], Tensor | None], *,
                   dtype: torch.dtype | None = None) -> Iterator[tuple[str, Tensor, list[str]]]:
    """Yield (megatron state-dict name, global tensor, HF names used) one tensor at a time.

    ``read_hf(name)`` returns an HF tensor or None when absent; absent tensors are an error except q/k/v biases
    (zeros) and HFOnly tensors. A non-zero tensor that must be zero (o_proj bias) cannot be represented."""
    for entry in table:
        parts = []
        for name, shape in zip(entry.hf, entry.hf_shapes):
            t = read_hf(name)
            if t is None and not (entry.absent_means_zero or isinstance(entry.transform, HFOnly)):
                raise MappingError(f"tensor {name} is missing from the checkpoint")
            parts.append(torch.zeros(shape) if t is None else _check_shape(name, t, shape))
        if isinstance(entry.transform, HFOnly):
            for name, t in zip(entry.hf, parts):
                if entry.transform.must_be_zero and torch.count_nonzero(t):
                    raise MappingError(f"{name} is non-zero: this architecture has no such tensor")
            continue
        t = _check_shape(entry.megatron, entry.transform.to_megatron(parts), entry.megatron_shape)
        yield entry.megatron, t if dtype is None else t.to(dtype), list(entry.hf)


def megatron_to_hf(table: list[Entry], read_mc: Callable[[str], Tensor], *,
                   dtype: torch.dtype | None = None) -> Iterator[tuple[str, Tensor, str]]:
    """Yield (HF name, tensor, where it came from) one tensor at a time; ``read_mc`` takes local-spec names."""
    for entry in table:
        if isinstance(entry.transform, HFOnly):
            for name, shape in zip(entry.hf, entry.hf_shapes):
                yield name, torch.zeros(shape, dtype=dtype or torch.float32), "(zeros)"
            continue
        parts = entry.transform.to_hf(read_mc(entry.megatron))
        for name, part in zip(entry.hf, parts):
            yield name, part if dtype is None else part.to(dtype), entry.megatron
