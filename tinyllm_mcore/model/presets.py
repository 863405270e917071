"""Model presets: the one source of truth for tiny-llm shapes and architecture constants.

The seed (wdndev/tiny-llm-zh) defines six sizes. Its architecture is exactly Hugging Face's Qwen2 layout:
pre-norm RMSNorm (eps 1e-6), rotate-half RoPE (theta 1e4), multi-head attention (kv heads = heads), SwiGLU MLP,
bias on q/k/v only, untied input/output embeddings. Everything here is consumed by `model/build.py` (the
megatron-core config and GPTModel) and by `convert/mapping.py` (to name and shape HF tensors), so shapes are never
restated.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

# The seed's vocabulary: ChatGLM3's 64789 sentencepiece pieces + 9 appended special tokens.
SEED_VOCAB_SIZE = 64798


@dataclass(frozen=True)
class ModelPreset:
    name: str
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    ffn_hidden_size: int
    max_position_embeddings: int
    vocab_size: int = SEED_VOCAB_SIZE
    num_query_groups: int | None = None  # None = MHA (kv heads = heads), as in every seed preset
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    # MoE (the seed's tiny_llm_moe branch), laid out as HF Qwen2-MoE: every layer's MLP is `num_experts` SwiGLU
    # experts of width ffn_hidden_size behind a softmax top-k router, plus optionally one shared SwiGLU expert whose
    # output is scaled by sigmoid(shared_expert_gate · x). 0 experts = dense.
    num_experts: int = 0
    moe_router_topk: int = 2
    moe_shared_expert_ffn_hidden_size: int | None = None
    # Qwen2-MoE's norm_topk_prob: renormalise the top-k softmax probabilities to sum to 1 (False: softmax over all
    # experts, the chosen ones keep their share, as Qwen1.5-MoE).
    moe_norm_topk_prob: bool = False

    def __post_init__(self):
        if self.moe_shared_expert_ffn_hidden_size == 0:  # --moe-shared-expert-intermediate-size 0 = none
            object.__setattr__(self, "moe_shared_expert_ffn_hidden_size", None)
        if self.num_experts and not 1 <= self.moe_router_topk <= self.num_experts:
            raise ValueError(f"--moe-router-topk {self.moe_router_topk} must be between 1 and the "
                             f"{self.num_experts} experts")
        if self.moe_shared_expert_ffn_hidden_size and not self.num_experts:
            raise ValueError("a shared expert (--moe-shared-expert-intermediate-size) needs --num-experts > 0")

    @property
    def kv_heads(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def replace(self, **overrides) -> "ModelPreset":
        return dataclasses.replace(self, **overrides)

    def num_parameters(self, vocab_size: int | None = None) -> int:
        """Parameter count of the logical (unpadded) model, computed from the shapes alone."""
        v = self.vocab_size if vocab_size is None else vocab_size
        h, f, d = self.hidden_size, self.ffn_hidden_size, self.head_dim
        q, kv = self.num_attention_heads * d, self.kv_heads * d
        attn = h * (q + 2 * kv) + (q + 2 * kv) + q * h  # qkv weight + qkv bias + o_proj (no bias)
        mlp = 3 * h * f  # gate, up, down; no biases
        if self.num_experts:
            shared = self.moe_shared_expert_ffn_hidden_size or 0
            mlp = self.num_experts * 3 * h * f + h * self.num_experts + (3 * h * shared + h if shared else 0)
        per_layer = attn + mlp + 2 * h  # two RMSNorm weights
        return 2 * v * h + self.num_layers * per_layer + h  # untied embeddings + layers + final norm


PRESETS: dict[str, ModelPreset] = {
    p.name: p
    for p in [
        ModelPreset("16m", hidden_size=120, num_layers=6, num_attention_heads=6, ffn_hidden_size=384, max_position_embeddings=512),
        ModelPreset("42m", hidden_size=288, num_layers=6, num_attention_heads=6, ffn_hidden_size=768, max_position_embeddings=512),
        ModelPreset("92m", hidden_size=512, num_layers=8, num_attention_heads=8, ffn_hidden_size=1408, max_position_embeddings=1024),
        ModelPreset("210m", hidden_size=768, num_layers=16, num_attention_heads=12, ffn_hidden_size=2048, max_position_embeddings=1024),
        ModelPreset("440m", hidden_size=1024, num_layers=24, num_attention_heads=16, ffn_hidden_size=2816, max_position_embeddings=1024),
        ModelPreset("1.5b", hidden_size=2048, num_layers=24, num_attention_heads=16, ffn_hidden_size=5504, max_position_embeddings=1024),
        # Not a seed size: small enough for unit tests and the CPU quickstart, shaped so TP2/PP2/PP4 all divide it.
        ModelPreset("tiny", hidden_size=64, num_layers=4, num_attention_heads=4, ffn_hidden_size=176, max_position_embeddings=256, vocab_size=1024),
        # MoE variant of 92m: 8 experts of half the dense width, top-2, so a token's active MLP (2 x 704) equals
        # 92m's dense 1408 (144 M parameters, ~92 M active per token). A shared expert: --moe-shared-expert-intermediate-size.
        ModelPreset("92m-moe", hidden_size=512, num_layers=8, num_attention_heads=8, ffn_hidden_size=704, max_position_embeddings=1024, num_experts=8, moe_router_topk=2),
        # For tests: 4 experts (EP2/EP4 divide it), a gated shared expert, 2 layers (PP2 divides it).
        ModelPreset("tiny-moe", hidden_size=64, num_layers=2, num_attention_heads=4, ffn_hidden_size=64, max_position_embeddings=256, vocab_size=1024, num_experts=4, moe_router_topk=2, moe_shared_expert_ffn_hidden_size=32),
    ]
}


def get_preset(name: str, **overrides) -> ModelPreset:
    if name not in PRESETS:
        raise ValueError(f"unknown --model-size {name!r}; choose one of: {', '.join(PRESETS)}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]


def padded_vocab_size(vocab_size: int, tensor_parallel_size: int, divisible_by: int = 128) -> int:
    """Megatron pads the embedding rows so each TP shard is equal and matmul-friendly.

    The logical vocab (what the tokenizer and HF export use) is unchanged; padded rows are never targets and are
    stripped on export.
    """
    multiple = divisible_by * tensor_parallel_size
    return ((vocab_size + multiple - 1) // multiple) * multiple
