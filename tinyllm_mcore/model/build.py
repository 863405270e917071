"""The one model assembly: a preset and the current parallel layout → this rank's model chunks.

Everyone builds here: the trainer (its chunks, then wrapped in megatron DDP: training/loop.py), DPO (frozen
reference chunks beside the policy's: stages/dpo.py), inference (the chunks of a checkpoint's model:
inference/open.py) and the converters (the whole model in one process: convert/mcore_model.py).
`transformer_config` turns preset + layout + precision into megatron's TransformerConfig, `build_chunks` makes one
chunk per virtual pipeline stage (pre/post-process flags from the parallel state, layer spec, dtype, device), and
`build_model` is one chunk. The modules themselves (layer specs, attention, norms, the LM and reward heads) are
model/gpt.py's. megatron is imported inside the functions: importing this module stays cheap for CLI parsing.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from tinyllm_mcore.model.presets import ModelPreset, padded_vocab_size


def model_dtype(bf16: bool = False, fp16: bool = False) -> torch.dtype:
    """The weights' (and pipeline messages') dtype for --bf16 / --fp16; fp32 without either."""
    return torch.bfloat16 if bf16 else torch.float16 if fp16 else torch.float32


def use_te_for(transformer_impl: str) -> bool | None:
    """--transformer-impl to build_model's use_te: auto (None: TE when usable), local, transformer_engine."""
    return {"auto": None, "local": False, "transformer_engine": True}[transformer_impl]


def transformer_config(
    preset: ModelPreset,
    *,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    virtual_pipeline_model_parallel_size: int | None = None,
    expert_model_parallel_size: int = 1,
    sequence_parallel: bool = False,
    bf16: bool = False,
    fp16: bool = False,
    use_cpu_initialization: bool = False,
    init_method_std: float = 0.02,
    attention_dropout: float = 0.0,
    hidden_dropout: float = 0.0,
    recompute: bool = False,
    moe_aux_loss_coeff: float = 1e-2,
    moe_expert_capacity_factor: float | None = None,
    **extra,
):
    """The megatron-core TransformerConfig for a preset and a parallel layout; weights in `model_dtype(bf16, fp16)`.

    MoE training knobs (not part of the architecture, so not preset fields): `moe_aux_loss_coeff` (switch-transformer
    load-balancing loss, 0 = off) and `moe_expert_capacity_factor` (token dropping: an expert takes at most
    factor x tokens x topk / experts tokens per micro-batch, lowest router probability dropped first; None = no dropping).
    """
    from megatron.core.transformer.transformer_config import TransformerConfig

    dtype = model_dtype(bf16, fp16)
    kwargs = dict(
        num_layers=preset.num_layers,
        hidden_size=preset.hidden_size,
        num_attention_heads=preset.num_attention_heads,
        num_query_groups=preset.kv_heads,
        ffn_hidden_size=preset.ffn_hidden_size,
        kv_channels=preset.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=preset.norm_eps,
        gated_linear_unit=True,  # SwiGLU: fc1 = [gate; up], act(gate) * up
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=True,
        # CPU / no-apex safe choices; correct everywhere (fusions are a speed detail, not numerics we rely on)
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        attention_dropout=attention_dropout,
        hidden_dropout=hidden_dropout,
        init_method_std=init_method_std,
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
        expert_model_parallel_size=expert_model_parallel_size,
        sequence_parallel=sequence_parallel and tensor_model_parallel_size > 1,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=bf16,
        fp16=fp16,
        use_cpu_initialization=use_cpu_initialization,
    )
    if recompute:
        kwargs.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    if preset.num_experts:
        kwargs.update(
            num_moe_experts=preset.num_experts,
            moe_router_topk=preset.moe_router_topk,
            moe_ffn_hidden_size=preset.ffn_hidden_size,
            # Qwen2-MoE's router: p = softmax(x W_gate^T) over all experts in fp32, take the top k, optionally
            # renormalise. megatron's pre-softmax path is exactly the un-normalised variant; its post-softmax path
            # (top-k logits, then softmax over those k) equals the renormalised one: p_i / sum_topk p_j.
            moe_router_score_function="softmax",
            moe_router_pre_softmax=not preset.moe_norm_topk_prob,
            moe_router_dtype="fp32",
            moe_shared_expert_intermediate_size=preset.moe_shared_expert_ffn_hidden_size,
            moe_shared_expert_gate=bool(preset.moe_shared_expert_ffn_hidden_size),  # Qwen2-MoE's shared_expert_gate
            moe_token_dispatcher_type="alltoall",  # the CPU adapter switches to the all-gather dispatcher
            moe_router_load_balancing_type="aux_loss",
            moe_aux_loss_coeff=moe_aux_loss_coeff,
            moe_expert_capacity_factor=moe_expert_capacity_factor,
            moe_token_drop_policy="probs",
        )
    from tinyllm_mcore.runtime import cpu

    kwargs.update(cpu.config_overrides())
    kwargs.update(extra)
    return TransformerConfig(**kwargs)


def build_model(
    preset: ModelPreset,
    config,
    *,
    vp_stage: int | None = None,
    use_te: bool | None = None,
    make_vocab_size_divisible_by: int = 128,
    head: str = "lm",
    seed: int = 0,
):
    """One pipeline chunk (`vp_stage`) of the tiny-llm GPT for this rank, the whole model at PP1: as megatron makes
    it, not moved or wrapped (that is build_chunks', which the trainer, inference and the converters call).

    `config` is the TransformerConfig from `transformer_config`; the parallel state must be initialised.
    The embedding is padded to a multiple of `make_vocab_size_divisible_by × TP` rows (see presets.padded_vocab_size).
    `head` is "lm" (the vocabulary output layer) or "reward" (a scalar per position, see RewardModel, whose head is
    initialised from `seed`).
    """
    from megatron.core import parallel_state

    from tinyllm_mcore.model.gpt import HEADS, block_spec

    if head not in HEADS:
        raise ValueError(f"unknown model head {head!r}: use one of {sorted(HEADS)}")
    vocab = padded_vocab_size(preset.vocab_size, config.tensor_model_parallel_size, make_vocab_size_divisible_by)
    return HEADS[head](
        config=config,
        transformer_layer_spec=block_spec(preset, config, vp_stage, use_te),
        vocab_size=vocab,
        max_sequence_length=preset.max_position_embeddings,
        # the embedding on the first chunk of the pipeline, the head on its last
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        parallel_output=True,
        share_embeddings_and_output_weights=False,  # the seed unties input/output embeddings
        position_embedding_type="rope",
        rotary_base=int(preset.rope_theta),
        rotary_percent=1.0,
        vp_stage=vp_stage,
        **({"head_init_seed": seed} if head == "reward" else {}),
    )


def build_chunks(
    preset: ModelPreset,
    config,
    *,
    head: str = "lm",
    seed: int = 0,
    use_te: bool | None = None,
    make_vocab_size_divisible_by: int = 128,
    init_weights: Callable[[torch.nn.Module], None] | None = None,
    device: torch.device | str | None = None,
    half_precision_wrapper: bool = True,
    lora=None,
) -> list[torch.nn.Module]:
    """This rank's model chunks at the current parallel layout: one per virtual pipeline stage of `config` (one
    without interleaving), each with its pipeline position's embedding / output head.

    Each chunk is built, handed to `init_weights`, given LoRA adapters on its frozen weights when `lora` (a
    model.lora.LoraSettings) is set, moved to `device` (default: the current CUDA
    device when there is one, else the CPU) and, when `config` is bf16/fp16 and `half_precision_wrapper` is set,
    wrapped in megatron's Float16Module (casts the first stage's float inputs to the model's dtype and the last
    stage's outputs to fp32, for the losses). Inference passes False: its logits stay in the model's dtype.
    """
    from megatron.core.transformer.module import Float16Module

    if device is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    vpp = config.virtual_pipeline_model_parallel_size or 1
    chunks = []
    for vp_stage in range(vpp):
        model = build_model(preset, config, vp_stage=vp_stage if vpp > 1 else None, head=head, seed=seed,
                            use_te=use_te, make_vocab_size_divisible_by=make_vocab_size_divisible_by)
        if init_weights is not None:
            init_weights(model)
        if lora is not None:
            from tinyllm_mcore.model.lora import apply_lora

            apply_lora(model, lora, config)
        if device is not None:
            model.to(device)
        if half_precision_wrapper and (config.bf16 or config.fp16):
            model = Float16Module(config, model)
        chunks.append(model)
    return chunks
