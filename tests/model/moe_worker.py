"""Runs in every rank for tests/model/test_moe.py, through tests.harness.distributed.run_ranks: an MoE training run,
or the logits of a checkpoint loaded at an expert/tensor-parallel layout.
"""
import torch

from tests.harness.progression_data import progression_datasets
from tinyllm_mcore.training.batches import lm_forward_step
from tinyllm_mcore.training.loop import Stage, parse_args, train


def skew_router(ctx):
    """Hidden unit 0 of every token's embedding is a large constant, and only expert 0's router row reads it: after
    the pre-MLP RMSNorm that unit dominates, so expert 0's logit is ~3 above the others for (nearly) every token."""
    from megatron.core.transformer.moe.router import TopKRouter

    with torch.no_grad():
        for chunk in ctx.chunks:
            for name, p in chunk.named_parameters():
                if name.endswith("embedding.word_embeddings.weight"):
                    p[:, 0] = 1.0
            for m in chunk.modules():
                if isinstance(m, TopKRouter):
                    m.weight[:, 0] = 0.0
                    m.weight[0, 0] = 0.4


STAGE = Stage("pretrain", progression_datasets, lm_forward_step)
SKEWED_STAGE = Stage("pretrain", progression_datasets, lm_forward_step, after_load=skew_router)
KEYS = ("lm loss", "moe aux loss", "moe load imbalance", "moe load entropy", "moe dropped fraction", "expert_load",
        "expert_tokens")


def inference_logits(load, tokens, tp=1, ep=1):
    """Full-vocab logits of a checkpoint loaded at TP x EP (model in eval mode, no sequence parallelism)."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from tinyllm_mcore.runtime import distributed as rt
    from tinyllm_mcore.inference.open import open_checkpoint

    rt.initialize(tp, 1, ep=ep)
    opened = open_checkpoint(load)
    model, preset = opened.model, opened.preset
    tokens = torch.tensor(tokens)
    position_ids = torch.arange(tokens.size(1)).expand_as(tokens)
    with torch.no_grad():
        logits = gather_from_tensor_model_parallel_region(model(tokens, position_ids, None))
    assert ps.get_expert_model_parallel_world_size() == ep
    return logits[..., :preset.vocab_size].tolist()


def train_run(argv: list[str], skew_router: bool = False) -> dict:
    """Train on the progression data (--mock-data); `skew_router`: every router starts sending nearly all tokens to
    expert 0 (for the aux-loss test)."""
    stage = SKEWED_STAGE if skew_router else STAGE
    out = train(stage, parse_args(stage, argv + ["--mock-data"]))
    return {"train": {k: [r.get(k) for r in out["history"] if r["split"] == "train"] for k in KEYS},
            "valid": [r["lm loss"] for r in out["history"] if r["split"] == "valid"]}
