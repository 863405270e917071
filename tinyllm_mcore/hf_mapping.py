"""megatron-core <-> Hugging Face parameter names and layouts, derived from a ModelPreset (one source of truth).

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

megatron side: the GPTModel's ``state_dict()`` names (what a TP1/PP1 model holds = the global tensors)::

    embedding.word_embeddings.weight                 [V_pad, h]   rows >= V are TP padding, stripped on export
    decoder.layers.{i}.input_layernorm.weight        (TE spec: self_attention.linear_qkv.layer_norm_weight)
    decoder.layers.{i}.self_attention.linear_qkv.{weight,bias}
        fused per query group g: [q heads of g; k_g; v_g], groups in order  ->  [(nq + 2 nkv) d, h]
    decoder.layers.{i}.self_attention.linear_proj.weight
    decoder.layers.{i}.pre_mlp_layernorm.weight      (TE spec: mlp.linear_fc1.layer_norm_weight)
    decoder.layers.{i}.mlp.linear_fc1.weight         [gate; up]  ->  [2f, h]
    decoder.layers.{i}.mlp.linear_fc2.weight
    decoder.final_layernorm.weight
    output_layer.weight                              [V_pad, h]

MoE models (preset.num_experts > 0) are HF's native Qwen2-MoE (``Qwen2MoeForCausalLM``, the per-expert tensor names
that transformers 4.x and 5.x save and load); attention, norms, embeddings as above, and each layer's MLP is::

    HF model.layers.{i}.mlp.                          megatron decoder.layers.{i}.mlp.
      gate.weight                [E, h]                 router.weight                      (TopKRouter, no bias)
      experts.{e}.gate_proj.weight  [f, h]  \
      experts.{e}.up_proj.weight    [f, h]  /            experts.local_experts.{e}.linear_fc1.weight  [gate; up] [2f, h]
      experts.{e}.down_proj.weight  [h, f]              experts.local_experts.{e}.linear_fc2.weight
      shared_expert.{gate,up}_proj.weight [s, h]        shared_experts.linear_fc1.weight  [gate; up] [2s, h]
      shared_expert.down_proj.weight      [h, s]        shared_experts.linear_fc2.weight
      shared_expert_gate.weight           [1, h]        shared_experts.gate_weight   (output x sigmoid(gate . x))

f = moe_intermediate_size (preset.ffn_hidden_size), s = shared_expert_intermediate_size. The experts are megatron's
SequentialMLP (one megatron MLP per expert; grouped GEMM needs CUDA), so their layouts are the dense MLP's. Without a
shared expert megatron has none; Qwen2-MoE always builds one, so the export writes it with s = 0 (empty tensors and a
zero gate: it adds exactly 0) and the import ignores an empty one. Routing is Qwen2-MoE's: softmax over all E router
logits in fp32, top k, renormalised iff ``norm_topk_prob`` — presets.transformer_config sets megatron's router to
match (``moe_router_pre_softmax = not norm_topk_prob``). Dist checkpoints stack experts under
``decoder.layers.mlp.experts.experts.linear_fc{1,2}.weight`` with shape [L, E, ...] (EP ranks own slices of E).

Dist checkpoints (``GPTModel.sharded_state_dict()``, measured on megatron-core 0.16.1) store the same tensors as
*global* arrays under layer-stacked keys: ``decoder.layers.<suffix>`` with a leading axis of ``num_layers`` (global
layer index, so PP stages write disjoint slices), both layer specs using the TE layer-norm names (the local spec maps
``input_layernorm.`` -> ``self_attention.linear_qkv.layer_norm_``). TP shards are slices of the global arrays: QKV
rows by query group, fc1 as [gate of all ranks; up of all ranks] (megatron's swiglu factory), so the global layouts
above do not depend on TP. Only the embedding/output row count does (padded to a multiple of 128 x TP); megatron
marks those two with allow_shape_mismatch. Linear layers also save ``_extra_state`` objects (None for the local spec).
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator

import torch
from torch import Tensor

from tinyllm_mcore.presets import ModelPreset, padded_vocab_size

# ------------------------------------------------------------------------------------------------ names
HF_EMBED, HF_NORM, HF_LM_HEAD = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"
MC_EMBED, MC_NORM, MC_OUTPUT = "embedding.word_embeddings.weight", "decoder.final_layernorm.weight", "output_layer.weight"

# megatron layer-local names: local spec -> TE spec (the TE spec fuses the pre-norms into the next linear)
LOCAL_TO_TE = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}
TE_TO_LOCAL = {te: local for local, te in LOCAL_TO_TE.items()}

# megatron layer-local (local spec) name -> HF layer-local names it is made of
LAYER_MAP = {
    "input_layernorm.weight": ["input_layernorm.weight"],
    "self_attention.linear_qkv.weight": ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"],
    "self_attention.linear_qkv.bias": ["self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"],
    "self_attention.linear_proj.weight": ["self_attn.o_proj.weight"],
    "pre_mlp_layernorm.weight": ["post_attention_layernorm.weight"],
    "mlp.linear_fc1.weight": ["mlp.gate_proj.weight", "mlp.up_proj.weight"],
    "mlp.linear_fc2.weight": ["mlp.down_proj.weight"],
}
HF_O_BIAS = "self_attn.o_proj.bias"

# Qwen2-MoE's shared expert, written empty (width 0, gate 0) when the model has none
HF_SHARED_EXPERT = ("mlp.shared_expert.gate_proj.weight", "mlp.shared_expert.up_proj.weight",
                    "mlp.shared_expert.down_proj.weight", "mlp.shared_expert_gate.weight")


def layer_map(preset: ModelPreset) -> dict[str, list[str]]:
    """megatron layer-local (local spec) name -> the HF layer-local names it is made of, dense or MoE."""
    if not preset.num_experts:
        return LAYER_MAP
    m = {k: v for k, v in LAYER_MAP.items() if not k.startswith("mlp.")}
    m["mlp.router.weight"] = ["mlp.gate.weight"]
    for e in range(preset.num_experts):
        m[f"mlp.experts.local_experts.{e}.linear_fc1.weight"] = [f"mlp.experts.{e}.gate_proj.weight",
                                                                 f"mlp.experts.{e}.up_proj.weight"]
        m[f"mlp.experts.local_experts.{e}.linear_fc2.weight"] = [f"mlp.experts.{e}.down_proj.weight"]
    if preset.moe_shared_expert_ffn_hidden_size:
        m["mlp.shared_experts.linear_fc1.weight"] = list(HF_SHARED_EXPERT[:2])
        m["mlp.shared_experts.linear_fc2.weight"] = [HF_SHARED_EXPERT[2]]
        m["mlp.shared_experts.gate_weight"] = [HF_SHARED_EXPERT[3]]
    return m


def _mlp_shapes(preset: ModelPreset, hf: bool) -> dict[str, tuple[int, ...]]:
    """Per-layer MLP tensor shapes (HF or megatron local names)."""
    h, f = preset.hidden_size, preset.ffn_hidden_size
    if not preset.num_experts:
        if hf:
            return {"mlp.gate_proj.weight": (f, h), "mlp.up_proj.weight": (f, h), "mlp.down_proj.weight": (h, f)}
        return {"mlp.linear_fc1.weight": (2 * f, h), "mlp.linear_fc2.weight": (h, f)}
    s = preset.moe_shared_expert_ffn_hidden_size or 0
    out = {("mlp.gate.weight" if hf else "mlp.router.weight"): (preset.num_experts, h)}
    for e in range(preset.num_experts):
        if hf:
            out.update({f"mlp.experts.{e}.gate_proj.weight": (f, h), f"mlp.experts.{e}.up_proj.weight": (f, h),
                        f"mlp.experts.{e}.down_proj.weight": (h, f)})
        else:
            out.update({f"mlp.experts.local_experts.{e}.linear_fc1.weight": (2 * f, h),
                        f"mlp.experts.local_experts.{e}.linear_fc2.weight": (h, f)})
    if hf:
        out.update(dict(zip(HF_SHARED_EXPERT, [(s, h), (s, h), (h, s), (1, h)])))
    elif s:
        out.update({"mlp.shared_experts.linear_fc1.weight": (2 * s, h), "mlp.shared_experts.linear_fc2.weight": (h, s),
                    "mlp.shared_experts.gate_weight": (1, h)})
    return out


def hf_layer_name(layer: int, local: str) -> str:
    return f"model.layers.{layer}.{local}"


def megatron_layer_name(layer: int, local: str, te: bool = False) -> str:
    return f"decoder.layers.{layer}.{LOCAL_TO_TE.get(local, local) if te else local}"


def to_local_name(name: str) -> str:
    """A megatron state-dict name with TE layer-norm names rewritten to the local spec's."""
    for te, local in TE_TO_LOCAL.items():
        if name.endswith("." + te):
            return name[: -len(te)] + local
    return name


# ------------------------------------------------------------------------------------------------ shapes
def hf_shapes(preset: ModelPreset, *, o_proj_bias: bool = False, tied: bool = False) -> dict[str, tuple[int, ...]]:
    """Every HF tensor name -> shape for this preset (unpadded vocab)."""
    h, d, v = preset.hidden_size, preset.head_dim, preset.vocab_size
    q, kv = preset.num_attention_heads * d, preset.kv_heads * d
    per_layer = {
        "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h), "self_attn.v_proj.weight": (kv, h),
        "self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,),
        "self_attn.o_proj.weight": (h, q),
        **_mlp_shapes(preset, hf=True),
    }
    if o_proj_bias:
        per_layer[HF_O_BIAS] = (h,)
    shapes = {HF_EMBED: (v, h)}
    for i in range(preset.num_layers):
        shapes.update({hf_layer_name(i, k): s for k, s in per_layer.items()})
    shapes[HF_NORM] = (h,)
    if not tied:
        shapes[HF_LM_HEAD] = (v, h)
    return shapes


def megatron_shapes(preset: ModelPreset, padded_vocab: int) -> dict[str, tuple[int, ...]]:
    """Every megatron state-dict name (local spec) -> shape of the global (TP1/PP1) tensor."""
    h, d = preset.hidden_size, preset.head_dim
    qkv = (preset.num_attention_heads + 2 * preset.kv_heads) * d
    per_layer = {
        "input_layernorm.weight": (h,), "self_attention.linear_qkv.weight": (qkv, h),
        "self_attention.linear_qkv.bias": (qkv,), "self_attention.linear_proj.weight": (h, preset.num_attention_heads * d),
        "pre_mlp_layernorm.weight": (h,), **_mlp_shapes(preset, hf=False),
    }
    shapes = {MC_EMBED: (padded_vocab, h)}
    for i in range(preset.num_layers):
        shapes.update({megatron_layer_name(i, k): s for k, s in per_layer.items()})
    shapes[MC_NORM] = (h,)
    shapes[MC_OUTPUT] = (padded_vocab, h)
    return shapes


def dist_checkpoint_shapes(preset: ModelPreset, tensor_model_parallel_size: int = 1,
                           make_vocab_size_divisible_by: int = 128) -> dict[str, tuple[int, ...]]:
    """Dist-checkpoint key -> global shape, as GPTModel.sharded_state_dict() writes them (layers stacked, TE names;
    MoE experts stacked too: ``decoder.layers.mlp.experts.experts.<linear>`` [L, E, ...])."""
    padded = padded_vocab_size(preset.vocab_size, tensor_model_parallel_size, make_vocab_size_divisible_by)
    out = {}
    for name, shape in megatron_shapes(preset, padded).items():
        if name.startswith("decoder.layers."):
            local = name.split(".", 3)[3]
            if local.startswith("mlp.experts.local_experts."):
                linear = local.split(".", 4)[4]
                out[f"decoder.layers.mlp.experts.experts.{linear}"] = (preset.num_layers, preset.num_experts, *shape)
                continue
            out[f"decoder.layers.{LOCAL_TO_TE.get(local, local)}"] = (preset.num_layers, *shape)
        else:
            out[name] = shape
    return out


# ------------------------------------------------------------------------------------------------ layouts
def fuse_qkv(q: Tensor, k: Tensor, v: Tensor, preset: ModelPreset) -> Tensor:
    """HF q, k, v ([heads*d, ...]) -> megatron's fused QKV: per query group, its q heads then its k then its v."""
    groups, d = preset.kv_heads, preset.head_dim
    rest = q.shape[1:]
    per_group_q = preset.num_attention_heads // groups * d
    return torch.cat([q.reshape(groups, per_group_q, *rest), k.reshape(groups, d, *rest),
                      v.reshape(groups, d, *rest)], dim=1).reshape(-1, *rest)


def split_qkv(qkv: Tensor, preset: ModelPreset) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse of fuse_qkv."""
    groups, d = preset.kv_heads, preset.head_dim
    rest = qkv.shape[1:]
    per_group_q = preset.num_attention_heads // groups * d
    q, k, v = qkv.reshape(groups, per_group_q + 2 * d, *rest).split([per_group_q, d, d], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


def pad_vocab_rows(w: Tensor, padded_vocab: int) -> Tensor:
    """Append zero rows up to the TP-padded vocab (megatron never produces or targets those ids)."""
    if w.shape[0] == padded_vocab:
        return w
    return torch.cat([w, w.new_zeros(padded_vocab - w.shape[0], *w.shape[1:])])


# ------------------------------------------------------------------------------------------------ conversion
def conversion_log(quiet: bool):
    """The converters' printer: every mapped tensor (lines indented by two spaces) unless quiet, always the rest."""
    def log(msg: str) -> None:
        if not (quiet and msg.startswith("  ")):
            print(msg, flush=True)

    return log


class MappingError(ValueError):
    """Tensors that do not fit the preset (reported as one line by the converters)."""


def check_finite(name: str, t: Tensor, where: str) -> Tensor:
    """Refuse a tensor with NaN/inf values: a converted model with them would only produce NaN losses/logits later."""
    bad = t.numel() - int(torch.isfinite(t).sum())
    if bad:
        raise MappingError(f"{name} ({where}) has {bad} non-finite value(s) (NaN/inf); refusing to convert "
                           "(--allow-non-finite converts anyway)")
    return t


def _is_out_of_space(error: BaseException, directory) -> bool:
    import errno
    import shutil

    # megatron's checkpoint writer reports a full disk as "unexpected pos N vs M", without the errno: look at the disk
    usage = shutil.disk_usage(directory)
    if usage.free < min(1 << 20, usage.total // 20):
        return True
    while error is not None:
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(error) or "os error 28" in str(error):  # safetensors' Rust errors
            return True
        error = error.__cause__ or error.__context__
    return False


@contextlib.contextmanager
def staged_output_dir(target, replaceable=lambda existing: True):
    """Yield an empty temporary directory beside ``target``; it becomes ``target`` only when the block succeeds.

    On any failure (bad input, disk full, a signal) the temporary is removed and ``target`` is left as it was, so a
    failed conversion leaves no empty or partial output. An existing non-empty ``target`` is replaced whole, only if
    ``replaceable(target)`` says it is an earlier output of the same kind (never someone's unrelated folder).
    """
    import shutil
    import tempfile
    from pathlib import Path

    target = Path(target)
    if target.exists() and not target.is_dir():
        raise ValueError(f"output {target} exists and is not a directory")
    if target.is_dir() and any(target.iterdir()) and not replaceable(target):
        raise ValueError(f"output {target} is a non-empty directory that is not an earlier output; "
                         "choose a new or empty directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield staged
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / "dir")
            os.replace(staged, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staged, target)
    except BaseException as e:
        out_of_space = _is_out_of_space(e, staged)
        shutil.rmtree(staged, ignore_errors=True)
        if out_of_space:
            raise MappingError(f"no space left on device while writing {target} (nothing was written; free space "
                               f"on {target.parent} and retry)") from None
        raise


def _check(name: str, t: Tensor, shape: tuple[int, ...]) -> Tensor:
    if tuple(t.shape) != tuple(shape):
        raise MappingError(f"{name}: shape {tuple(t.shape)} does not match the config's {tuple(shape)}")
    return t


def hf_to_megatron(preset: ModelPreset, read_hf: Callable[[str], Tensor | None], padded_vocab: int, *,
                   tied: bool = False, dtype: torch.dtype | None = None) -> Iterator[tuple[str, Tensor, list[str]]]:
    """Yield (megatron state-dict name, global tensor, HF names used) one tensor at a time.

    ``read_hf(name)`` returns an HF tensor or None when absent (absent q/k/v biases = Llama without attention bias:
    zeros; absent lm_head with ``tied``: the embedding). A present, non-zero o_proj bias cannot be represented.
    """
    hf = hf_shapes(preset, tied=tied)
    mc = megatron_shapes(preset, padded_vocab)
    cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)

    def get(name: str, allow_zero: bool = False) -> Tensor:
        t = read_hf(name)
        if t is None:
            if not allow_zero:
                raise MappingError(f"tensor {name} is missing from the checkpoint")
            return torch.zeros(hf[name])
        return _check(name, t, hf[name])

    embed = get(HF_EMBED)
    yield MC_EMBED, cast(pad_vocab_rows(embed, padded_vocab)), [HF_EMBED]
    del embed
    for i in range(preset.num_layers):
        o_bias = read_hf(hf_layer_name(i, HF_O_BIAS))
        if o_bias is not None and torch.count_nonzero(o_bias):
            raise MappingError(f"{hf_layer_name(i, HF_O_BIAS)} is non-zero: this architecture has no o_proj bias")
        for local, hf_locals in layer_map(preset).items():
            names = [hf_layer_name(i, n) for n in hf_locals]
            parts = [get(n, allow_zero=n.endswith("_proj.bias")) for n in names]
            if local.startswith("self_attention.linear_qkv."):
                t = fuse_qkv(*parts, preset)
            elif local.endswith("linear_fc1.weight"):  # dense MLP, each expert, the shared expert: [gate; up]
                t = torch.cat(parts)
            else:
                t = parts[0]
            name = megatron_layer_name(i, local)
            yield name, cast(_check(name, t, mc[name])), names
    yield MC_NORM, cast(get(HF_NORM)), [HF_NORM]
    head_name = HF_EMBED if tied else HF_LM_HEAD
    yield MC_OUTPUT, cast(pad_vocab_rows(get(head_name), padded_vocab)), [head_name]


def megatron_to_hf(preset: ModelPreset, read_mc: Callable[[str], Tensor], *, o_proj_bias: bool = False,
                   dtype: torch.dtype | None = None) -> Iterator[tuple[str, Tensor, str]]:
    """Yield (HF name, tensor, megatron name it came from); padded vocab rows are stripped.

    ``read_mc(name)`` takes local-spec names; ``o_proj_bias`` adds Llama's ``o_proj.bias`` as zeros.
    """
    v = preset.vocab_size
    cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)
    yield HF_EMBED, cast(read_mc(MC_EMBED)[:v]), MC_EMBED
    for i in range(preset.num_layers):
        for local, hf_locals in layer_map(preset).items():
            name = megatron_layer_name(i, local)
            t = read_mc(name)
            names = [hf_layer_name(i, n) for n in hf_locals]
            if local.startswith("self_attention.linear_qkv."):
                parts = split_qkv(t, preset)
            elif local.endswith("linear_fc1.weight"):
                parts = t.chunk(2)
            else:
                parts = (t,)
            for n, p in zip(names, parts):
                yield n, cast(p), name
        if preset.num_experts and not preset.moe_shared_expert_ffn_hidden_size:
            # Qwen2-MoE always has a shared expert: an empty one with a zero gate adds exactly nothing
            shapes = _mlp_shapes(preset, hf=True)
            for n in HF_SHARED_EXPERT:
                yield hf_layer_name(i, n), torch.zeros(shapes[n], dtype=dtype or torch.float32), "(no shared expert)"
        if o_proj_bias:
            yield hf_layer_name(i, HF_O_BIAS), torch.zeros(preset.hidden_size, dtype=dtype or torch.float32), "(zeros)"
    yield HF_NORM, cast(read_mc(MC_NORM)), MC_NORM
    yield HF_LM_HEAD, cast(read_mc(MC_OUTPUT)[:v]), MC_OUTPUT


# ------------------------------------------------------------------------------------------------ HF configs
SUPPORTED_MODEL_TYPES = ("qwen2", "llama", "tinyllm", "qwen2_moe")


def preset_from_hf_config(config: dict, name: str | None = None) -> tuple[ModelPreset, dict]:
    """ModelPreset for an HF config.json (qwen2, llama, the seed's tinyllm, qwen2_moe); raises MappingError naming
    the problem.

    Returns (preset, facts) where facts holds ``tied`` (lm_head shares the embedding) and ``attention_bias``.
    """
    from tinyllm_mcore.presets import PRESETS

    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise MappingError(f"unsupported architecture model_type={model_type!r} "
                           f"(architectures={config.get('architectures')}); supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    moe = {}
    if model_type == "qwen2_moe":
        if config.get("mlp_only_layers") or int(config.get("decoder_sparse_step", 1)) != 1:
            raise MappingError("Qwen2-MoE with dense layers (mlp_only_layers / decoder_sparse_step != 1) is not "
                               "supported: every layer must be MoE")
        try:
            moe = dict(num_experts=int(config["num_experts"]), moe_router_topk=int(config["num_experts_per_tok"]),
                       moe_shared_expert_ffn_hidden_size=int(config.get("shared_expert_intermediate_size") or 0),
                       moe_norm_topk_prob=bool(config.get("norm_topk_prob", False)))
            config = {**config, "intermediate_size": config["moe_intermediate_size"]}  # the experts' width
        except KeyError as e:
            raise MappingError(f"config.json lacks {e.args[0]!r}") from None
    try:
        h, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        preset = ModelPreset(
            name=name or "hf",
            hidden_size=h,
            num_layers=int(config["num_hidden_layers"]),
            num_attention_heads=heads,
            ffn_hidden_size=int(config["intermediate_size"]),
            max_position_embeddings=int(config.get("max_position_embeddings", 1024)),
            vocab_size=int(config["vocab_size"]),
            num_query_groups=int(config.get("num_key_value_heads") or heads),
            rope_theta=float(config.get("rope_theta", (config.get("rope_parameters") or {}).get("rope_theta", 1e4))),
            norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            **moe,
        )
    except KeyError as e:
        raise MappingError(f"config.json lacks {e.args[0]!r}") from None
    if preset.num_query_groups == heads:
        preset = preset.replace(num_query_groups=None)
    if h % heads:
        raise MappingError(f"hidden_size {h} is not divisible by num_attention_heads {heads}")
    if config.get("head_dim") not in (None, h // heads):
        raise MappingError(f"head_dim {config['head_dim']} != hidden_size / num_attention_heads = {h // heads}")
    if heads % preset.kv_heads:
        raise MappingError(f"{heads} attention heads are not divisible by {preset.kv_heads} key/value heads")
    if config.get("hidden_act", "silu") != "silu":
        raise MappingError(f"hidden_act {config['hidden_act']!r} is not supported (SwiGLU with silu only)")
    scaling = config.get("rope_scaling") or {}
    rope_params = config.get("rope_parameters") or {}
    rope_type = scaling.get("rope_type", scaling.get("type")) or rope_params.get("rope_type", "default")
    if rope_type not in (None, "default"):
        raise MappingError(f"rope scaling {rope_type!r} is not supported")
    if model_type in ("qwen2", "qwen2_moe") and config.get("use_sliding_window"):
        raise MappingError("Qwen2 sliding-window attention is not supported")
    if config.get("mlp_bias"):
        raise MappingError("mlp_bias is not supported (the MLP has no biases)")
    attention_bias = (config.get("attention_bias", True) if model_type == "llama"
                      else config.get("qkv_bias", True) if model_type == "qwen2_moe" else True)
    # Match a named preset when every architectural field agrees (the vocab may differ: --vocab-size).
    for p in PRESETS.values():
        if p.replace(name=preset.name, vocab_size=preset.vocab_size, max_position_embeddings=preset.max_position_embeddings) == preset:
            preset = preset.replace(name=p.name)
            break
    return preset, {"tied": bool(config.get("tie_word_embeddings", False)), "attention_bias": bool(attention_bias),
                    "model_type": model_type}


# ------------------------------------------------------------------------------------------------ megatron side
# The converters run as one ordinary CPU process whatever the TP/PP of source or target: they build the *global*
# (TP1/PP1) GPTModel, whose sharded_state_dict() names every tensor with its dist-checkpoint key and global shape.
# Dist checkpoints are reshardable, so a global write loads at any TP/PP and a global read accepts any saved layout.
@contextlib.contextmanager
def single_process_megatron():
    """megatron parallel state for a world of one (TP1/PP1, gloo); torn down afterwards if this set it up."""
    from megatron.core import parallel_state as ps

    from tinyllm_mcore.runtime import distributed as rt

    if ps.model_parallel_is_initialized():
        if (ps.get_tensor_model_parallel_world_size() != 1 or ps.get_pipeline_model_parallel_world_size() != 1
                or ps.get_expert_model_parallel_world_size() != 1):
            raise RuntimeError("the converters need a process without a TP/PP/EP > 1 megatron state")
        yield
        return
    rt.initialize(1, 1)
    try:
        yield
    finally:
        rt.destroy()


def build_global_model(preset: ModelPreset, padded_vocab: int):
    """The whole model (TP1, one pipeline stage, local spec) with uninitialised fp32 weights and `padded_vocab` rows."""
    from tinyllm_mcore.model import build_model
    from tinyllm_mcore.presets import transformer_config

    config = transformer_config(preset, use_cpu_initialization=True, perform_initialization=False)
    # padded_vocab_size(v, 1, padded) == padded: the rows the target (or source) TP layout uses.
    return build_model(preset, config, pre_process=True, post_process=True, use_te=False,
                       make_vocab_size_divisible_by=padded_vocab)


def checkpoint_tensor_shapes(path) -> dict[str, tuple[int, ...]]:
    from megatron.core import dist_checkpointing

    return {k: tuple(v.global_shape) for k, v in dist_checkpointing.load_tensors_metadata(str(path)).items()}


def alias_dist_keys(sharded: dict, saved_keys) -> None:
    """Point the model's layer-norm sharded keys at the names a checkpoint actually holds (TE or local spelling)."""
    saved_keys = set(saved_keys)
    for sh in sharded.values():
        key = getattr(sh, "key", None)
        if key is None or key in saved_keys or not key.startswith("decoder.layers."):
            continue
        suffix = key[len("decoder.layers."):]
        alias = TE_TO_LOCAL.get(suffix) or LOCAL_TO_TE.get(suffix)
        if alias and f"decoder.layers.{alias}" in saved_keys:
            sh.key = f"decoder.layers.{alias}"


def load_global_state(path, preset: ModelPreset, padded_vocab: int) -> dict[str, Tensor]:
    """Global megatron state dict (local-spec names) read from a dist checkpoint saved at any TP/PP."""
    from megatron.core import dist_checkpointing

    model = build_global_model(preset, padded_vocab)
    # Weights only: `_extra_state` objects (None for the local spec, fp8 metadata for TE) carry no parameters.
    sharded = {k: v for k, v in model.sharded_state_dict().items() if not k.endswith("._extra_state")}
    alias_dist_keys(sharded, checkpoint_tensor_shapes(path))
    loaded = dist_checkpointing.load({"model": sharded}, str(path))["model"]
    result = model.load_state_dict(loaded, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("._extra_state")]
    if missing or result.unexpected_keys:
        raise MappingError(f"checkpoint does not fit the model: missing {missing}, unexpected {result.unexpected_keys}")
    return {k: v for k, v in model.state_dict().items() if not k.endswith("._extra_state")}
