"""The tiny-llm GPT's modules: layer specs, SDPA core attention, a sequence-parallel RMSNorm, the LM and reward
heads (model/build.py assembles them into chunks), and flops_per_token for MFU.

Layer spec: Transformer Engine's when TE imports and CUDA is present (fused kernels, packed THD attention), else
megatron-core's local spec with its core attention swapped for PyTorch's scaled_dot_product_attention (flash /
memory-efficient kernels on GPU, a fused kernel on CPU; megatron's local attention materialises [b, n, s, s] scores
and builds its causal mask with device="cuda"). Both specs share dist-checkpoint names, so checkpoints move freely
between them.
"""
from __future__ import annotations

import importlib

import torch

from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

from tinyllm_mcore.model.losses import linear_cross_entropy
from tinyllm_mcore.model.presets import ModelPreset
from tinyllm_mcore.runtime import compat

compat.define_te_general_gemm()  # megatron-core 0.16's MoE router without Transformer Engine


def transformer_engine_usable() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        importlib.import_module("transformer_engine.pytorch")
    except Exception:
        return False
    return True


class SDPAttention(DotProductAttention):
    """megatron-core core attention computed by torch's scaled_dot_product_attention.

    Inputs are megatron's [s, b, heads, head_dim]; the mask, if any, is megatron's boolean convention (True = masked
    out, shape broadcastable to [b, 1, sq, sk]), e.g. the block-diagonal causal mask of packed SFT sequences.
    """

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None, packed_seq_params=None):
        assert packed_seq_params is None, "packed THD sequences need the Transformer Engine spec; pass an attention mask"
        assert attention_bias is None, "attention bias is not supported"
        groups = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        # [s, b, n, d] -> [b, n, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        sq, sk = q.size(2), k.size(2)
        mask, causal = None, False
        if attention_mask is not None:
            mask = ~attention_mask
        elif sq == sk:
            causal = True
        elif sq > 1:  # prefill continuing a KV cache: query i sees keys up to (sk - sq + i)
            mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(diagonal=sk - sq)
        dropout = self.attention_dropout.p if self.training else 0.0
        with tensor_parallel.get_cuda_rng_tracker().fork() if dropout > 0 and not self.config.sequence_parallel else _null():
            ctx = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal, scale=self.softmax_scale,
                enable_gqa=groups > 1,
            )
        # [b, n, s, d] -> [s, b, n*d]
        return ctx.permute(2, 0, 1, 3).reshape(sq, ctx.size(0), self.hidden_size_per_partition)


class RMSNorm(torch.nn.RMSNorm):
    """torch RMSNorm built from a megatron config, usable with sequence parallelism.

    megatron's WrappedTorchNorm refuses sequence parallel; the only extra requirement is that the weight's gradient,
    computed on a sequence shard, is summed over TP ranks — megatron does that for params marked `sequence_parallel`.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-6, **unused):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)


class TinyLLMGPTModel(GPTModel):
    """megatron's GPTModel; on CPU without tensor parallelism the LM head and its loss are fused and chunked.

    megatron materialises [s, b, vocab] logits and runs its vocab-parallel cross-entropy over them (several passes,
    to combine partial softmaxes across TP ranks). With one TP rank there is nothing to combine: `lm_loss` computes
    the same per-token losses chunk by chunk without keeping the logits — at the seed's 64798-token vocab that is a
    large share of a small model's step on a CPU (2x faster at 16m). On GPUs, where the unfused logits are cheap
(measured: chunking made 92m on an H100 0.64x as fast), and everywhere else (TP, inference, logits requests),
it is megatron's path.
    """

    def _postprocess(self, hidden_states, input_ids, position_ids, labels, *args, **kwargs):
        fused = (labels is not None and self.post_process and not hidden_states.is_cuda
                 and parallel_state.get_tensor_model_parallel_world_size() == 1
                 and self.config.mtp_num_layers is None and not self.share_embeddings_and_output_weights
                 and kwargs.get("inference_context") is None and kwargs.get("inference_params") is None)
        if not fused:
            return super()._postprocess(hidden_states, input_ids, position_ids, labels, *args, **kwargs)
        # hidden [s, b, h] -> loss [b, s]
        return linear_cross_entropy(hidden_states.transpose(0, 1), self.output_layer.weight, labels)


class RewardModel(TinyLLMGPTModel):
    """The GPT trunk with a scalar head: on the last stage a [hidden -> 1] linear replaces the LM head.

    forward returns per-position rewards [b, s] (float32); the reward stage reads them at each sequence's last token.
    """

    def __init__(self, *args, head_init_seed: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        if self.post_process:
            del self.output_layer  # no LM head: the final-norm hidden states go to the scalar head
            self.output_layer = None
            self.reward_head = torch.nn.Linear(self.config.hidden_size, 1, bias=False, dtype=self.config.params_dtype)
            # its own generator: the head starts the same at every layout (megatron seeds each pipeline rank apart)
            generator = torch.Generator().manual_seed(head_init_seed)
            std = 1.0 / (self.config.hidden_size + 1) ** 0.5
            with torch.no_grad():
                self.reward_head.weight.copy_(torch.randn(self.reward_head.weight.shape, generator=generator) * std)

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
            # The head sees every position: gather the sequence shards. Every TP rank then computes the same loss,
            # so the backward only splits the gradient back into shards (the default reduce-scatter would sum the
            # TP ranks' identical gradients: TP times too large).
            hidden_states = tensor_parallel.gather_from_sequence_parallel_region(
                hidden_states, tensor_parallel_output_grad=False, group=self.pg_collection.tp)
        return self.reward_head(hidden_states).squeeze(-1).transpose(0, 1).float()  # [s, b, 1] -> [b, s]


HEADS = {"lm": TinyLLMGPTModel, "reward": RewardModel}


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def layer_spec(preset: ModelPreset, use_te: bool | None = None) -> ModuleSpec:
    """The transformer-layer spec: TE when usable (or asked for), else local + SDPA attention."""
    if use_te is None:
        use_te = transformer_engine_usable()
    # MoE: megatron's MoELayer (TopKRouter, token dispatcher, SequentialMLP experts: one megatron MLP per expert, so
    # the experts' names and layouts are the dense MLP's; grouped GEMM needs CUDA kernels) and, with a shared expert,
    # SharedExpertMLP. On the local spec the pre-MLP norm stays a separate module (ours below), as on the TE spec.
    moe = dict(num_experts=preset.num_experts or None, moe_grouped_gemm=False)
    if use_te:
        return get_gpt_layer_with_transformer_engine_spec(**moe)
    spec = get_gpt_layer_local_spec(normalization="RMSNorm", **moe)
    spec.submodules.self_attention.submodules.core_attention = SDPAttention
    spec.submodules.input_layernorm = RMSNorm
    spec.submodules.pre_mlp_layernorm = RMSNorm
    return spec


def block_spec(preset: ModelPreset, config, vp_stage: int | None, use_te: bool | None):
    """The decoder block for this pipeline chunk; on the local spec the final norm is our RMSNorm too."""
    spec = layer_spec(preset, use_te)
    if spec.submodules.input_layernorm is not RMSNorm:
        return spec  # TE: megatron picks TENorm for the final norm
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[spec] * num_layers, layer_norm=RMSNorm)


def flops_per_token(preset: ModelPreset, seq_length: int, vocab_size: int | None = None) -> float:
    """Training FLOPs per token (forward + backward = 3 × forward), counting matmuls only.

    Forward per token: 2 × (matmul parameters) + attention scores and context 2 × 2 × s × h per layer (causal
    masking not discounted, as in Megatron-LM's and PaLM's MFU convention) + the LM head 2 × h × V.
    """
    v = preset.vocab_size if vocab_size is None else vocab_size
    h, f, L = preset.hidden_size, preset.ffn_hidden_size, preset.num_layers
    qkv = h * (preset.num_attention_heads + 2 * preset.kv_heads) * preset.head_dim
    proj = preset.num_attention_heads * preset.head_dim * h
    mlp = 3 * h * f
    if preset.num_experts:  # the router, k routed experts per token and the gated shared expert
        shared = preset.moe_shared_expert_ffn_hidden_size or 0
        mlp = h * preset.num_experts + 3 * h * f * preset.moe_router_topk + (3 * h * shared + h if shared else 0)
    attn = 2 * seq_length * preset.num_attention_heads * preset.head_dim
    forward = 2 * L * (qkv + proj + mlp + attn) + 2 * h * v
    return 3.0 * forward
