"""HF ``config.json`` <-> ModelPreset, and the generation config an export ships.

Reading accepts qwen2, llama, the seed's ``tinyllm`` and qwen2_moe (every layer MoE); anything the megatron model
cannot represent is one MappingError naming the field. Writing produces ``LlamaForCausalLM`` with attention_bias
(q/k/v/o biases; o is written as zeros, which is numerically Qwen2) for dense presets and ``Qwen2MoeForCausalLM`` for
MoE presets. A ``qwen2`` config is written only as converter *input* (tests, benchmarks): exporting as qwen2 is
refused (see EXPORT_ARCHS).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tinyllm_mcore.convert.mapping import MappingError
from tinyllm_mcore.model.presets import PRESETS, ModelPreset

READABLE_MODEL_TYPES = ("qwen2", "llama", "tinyllm", "qwen2_moe")
CONFIG_ARCHS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"}

# The seed's demo (web_demo.py): nucleus sampling at top_p 0.8, no top-k, temperature 1; a mild repetition penalty
# because 92M-class models loop otherwise.
GENERATION_DEFAULTS = dict(do_sample=True, top_p=0.8, top_k=0, temperature=1.0, repetition_penalty=1.1,
                           max_new_tokens=512)


@dataclass(frozen=True)
class HFFacts:
    """What an HF config says beyond the preset: how its tensors are laid out."""
    model_type: str
    tied: bool            # lm_head shares the embedding (no lm_head tensor)
    attention_bias: bool  # q/k/v biases present (absent ones are zeros)


def default_hf_arch(preset: ModelPreset) -> str:
    """llama for dense models, Qwen2-MoE for MoE models (the only HF fit)."""
    return "qwen2_moe" if preset.num_experts else "llama"


def read_hf_config(hf_dir: Path) -> dict:
    """``hf_dir/config.json`` as a dict; FileNotFoundError / ValueError naming the file."""
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {hf_dir}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError names no file
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: not a JSON object")
    return config


def _moe_fields(config: dict) -> dict:
    if config.get("mlp_only_layers") or int(config.get("decoder_sparse_step", 1)) != 1:
        raise MappingError("Qwen2-MoE with dense layers (mlp_only_layers / decoder_sparse_step != 1) is not "
                           "supported: every layer must be MoE")
    return dict(num_experts=int(config["num_experts"]), moe_router_topk=int(config["num_experts_per_tok"]),
                moe_shared_expert_ffn_hidden_size=int(config.get("shared_expert_intermediate_size") or 0),
                moe_norm_topk_prob=bool(config.get("norm_topk_prob", False)))


def _check_representable(config: dict, model_type: str, preset: ModelPreset) -> None:
    h, heads = preset.hidden_size, preset.num_attention_heads
    if h % heads:
        raise MappingError(f"hidden_size {h} is not divisible by num_attention_heads {heads}")
    if config.get("head_dim") not in (None, h // heads):
        raise MappingError(f"head_dim {config['head_dim']} != hidden_size / num_attention_heads = {h // heads}")
    if heads % preset.kv_heads:
        raise MappingError(f"{heads} attention heads are not divisible by {preset.kv_heads} key/value heads")
    if config.get("hidden_act", "silu") != "silu":
        raise MappingError(f"hidden_act {config['hidden_act']!r} is not supported (SwiGLU with silu only)")
    scaling, rope_params = config.get("rope_scaling") or {}, config.get("rope_parameters") or {}
    rope_type = scaling.get("rope_type", scaling.get("type")) or rope_params.get("rope_type", "default")
    if rope_type not in (None, "default"):
        raise MappingError(f"rope scaling {rope_type!r} is not supported")
    if model_type in ("qwen2", "qwen2_moe") and config.get("use_sliding_window"):
        raise MappingError("Qwen2 sliding-window attention is not supported")
    if config.get("mlp_bias"):
        raise MappingError("mlp_bias is not supported (the MLP has no biases)")


def preset_from_hf_config(config: dict, name: str | None = None) -> tuple[ModelPreset, HFFacts]:
    """The ModelPreset of an HF config.json (a named preset when every architectural field agrees) and its facts;
    MappingError naming the problem."""
    model_type = config.get("model_type")
    if model_type not in READABLE_MODEL_TYPES:
        raise MappingError(f"unsupported architecture model_type={model_type!r} (architectures="
                           f"{config.get('architectures')}); supported: {', '.join(READABLE_MODEL_TYPES)}")
    try:
        moe = _moe_fields(config) if model_type == "qwen2_moe" else {}
        heads = int(config["num_attention_heads"])
        preset = ModelPreset(
            name=name or "hf",
            hidden_size=int(config["hidden_size"]),
            num_layers=int(config["num_hidden_layers"]),
            num_attention_heads=heads,
            # a Qwen2-MoE's experts are moe_intermediate_size wide
            ffn_hidden_size=int(config["moe_intermediate_size" if moe else "intermediate_size"]),
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
    _check_representable(config, model_type, preset)
    attention_bias = (config.get("attention_bias", True) if model_type == "llama"
                      else config.get("qkv_bias", True) if model_type == "qwen2_moe" else True)
    for p in PRESETS.values():  # the vocab and context length may differ from the named preset's
        if p.replace(name=preset.name, vocab_size=preset.vocab_size,
                     max_position_embeddings=preset.max_position_embeddings) == preset:
            preset = preset.replace(name=p.name)
            break
    return preset, HFFacts(model_type=model_type, tied=bool(config.get("tie_word_embeddings", False)),
                           attention_bias=bool(attention_bias))


def hf_config(preset: ModelPreset, arch: str | None = None, *, torch_dtype: str = "float32",
              bos_token_id: int | None = 1, eos_token_id: int = 2, pad_token_id: int | None = 0) -> dict:
    """config.json for the preset as ``LlamaForCausalLM`` (dense default), ``Qwen2MoeForCausalLM`` (MoE) or
    ``Qwen2ForCausalLM`` (an import source only)."""
    arch = arch or default_hf_arch(preset)
    if arch not in CONFIG_ARCHS:
        raise ValueError(f"unsupported --hf-arch {arch!r}; choose one of {', '.join(CONFIG_ARCHS)}")
    if (arch == "qwen2_moe") != bool(preset.num_experts):
        raise ValueError(f"--hf-arch {arch} does not fit a {'MoE' if preset.num_experts else 'dense'} model; "
                         f"use {default_hf_arch(preset)}")
    config = {
        "architectures": [CONFIG_ARCHS[arch]],
        "model_type": arch,
        "vocab_size": preset.vocab_size,
        "hidden_size": preset.hidden_size,
        "intermediate_size": preset.ffn_hidden_size,
        "num_hidden_layers": preset.num_layers,
        "num_attention_heads": preset.num_attention_heads,
        "num_key_value_heads": preset.kv_heads,
        "head_dim": preset.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": preset.max_position_embeddings,
        "rms_norm_eps": preset.norm_eps,
        "rope_theta": preset.rope_theta,
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        "torch_dtype": torch_dtype,
    }
    if arch == "llama":
        config.update(attention_bias=True, mlp_bias=False, pretraining_tp=1)
    else:
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=preset.num_layers)
    if arch == "qwen2_moe":
        config.update(
            moe_intermediate_size=preset.ffn_hidden_size,
            shared_expert_intermediate_size=preset.moe_shared_expert_ffn_hidden_size or 0,  # 0: an empty one
            num_experts=preset.num_experts,
            num_experts_per_tok=preset.moe_router_topk,
            norm_topk_prob=preset.moe_norm_topk_prob,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            qkv_bias=True,
            output_router_logits=False,
            router_aux_loss_coef=0.001,
        )
    return config


def generation_config(eos_token_id: int = 2, pad_token_id: int | None = 0, bos_token_id: int | None = 1) -> dict:
    return {"bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "pad_token_id": pad_token_id,
            **GENERATION_DEFAULTS}
