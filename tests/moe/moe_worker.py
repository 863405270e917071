"""Runs several MoE training configurations in one process (group) and writes their histories as JSON.

Usage: python moe_worker.py RUNS.json OUT.json   (under torchrun for 2 processes; plain python for one)
RUNS.json: [{"name": ..., "argv": [...], "skew_router": false}, ...]. Between runs only megatron's parallel state is
torn down. "skew_router" initialises every layer so that nearly all tokens pick expert 0 first (for the aux-loss test).
"""
import json
import sys

import torch
import torch.distributed as dist

from tests.harness.progression_data import progression_datasets
from tinyllm_mcore.pretrain import lm_forward_step
from tinyllm_mcore.training.loop import Stage, parse_args, train


def skew_router(args, chunks):
    """Hidden unit 0 of every token's embedding is a large constant, and only expert 0's router row reads it: after
    the pre-MLP RMSNorm that unit dominates, so expert 0's logit is ~3 above the others for (nearly) every token."""
    if not getattr(args, "skew_router", False):
        return
    from megatron.core.transformer.moe.router import TopKRouter

    with torch.no_grad():
        for chunk in chunks:
            for name, p in chunk.named_parameters():
                if name.endswith("embedding.word_embeddings.weight"):
                    p[:, 0] = 1.0
            for m in chunk.modules():
                if isinstance(m, TopKRouter):
                    m.weight[:, 0] = 0.0
                    m.weight[0, 0] = 0.4


STAGE = Stage("pretrain", progression_datasets, lm_forward_step, after_load=skew_router)
KEYS = ("lm loss", "moe aux loss", "moe load imbalance", "moe load entropy", "moe dropped fraction", "expert_load",
        "expert_tokens")


def inference_logits(load, tokens, tp=1, ep=1):
    """Full-vocab logits of a checkpoint loaded at TP x EP (model in eval mode, no sequence parallelism)."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from tinyllm_mcore.runtime import distributed as rt
    from tinyllm_mcore.training.checkpoint import load_model_for_inference

    rt.initialize(tp, 1, ep=ep)
    (model,), preset = load_model_for_inference(load)
    tokens = torch.tensor(tokens)
    position_ids = torch.arange(tokens.size(1)).expand_as(tokens)
    with torch.no_grad():
        logits = gather_from_tensor_model_parallel_region(model(tokens, position_ids, None))
    assert ps.get_expert_model_parallel_world_size() == ep
    return logits[..., :preset.vocab_size].tolist()


def main(runs_path, out_path):
    from megatron.core import parallel_state

    results = {}
    for run in json.load(open(runs_path)):
        if "logits" in run:  # {"name", "logits": {"load": CKPT, "tokens": [[...]], "tp": 1, "ep": 2}}
            results[run["name"]] = inference_logits(**run["logits"])
            parallel_state.destroy_model_parallel()
            dist.barrier()
            continue
        args = parse_args(STAGE, run["argv"] + ["--mock-data"])
        args.skew_router = run.get("skew_router", False)
        out = train(STAGE, args)
        results[run["name"]] = {
            "train": {k: [r.get(k) for r in out["history"] if r["split"] == "train"] for k in KEYS},
            "valid": [r["lm loss"] for r in out["history"] if r["split"] == "valid"],
        }
        parallel_state.destroy_model_parallel()
        dist.barrier()
    if dist.get_rank() == 0:
        json.dump(results, open(out_path, "w"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
