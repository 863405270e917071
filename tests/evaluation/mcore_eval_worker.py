"""Saves a random tiny checkpoint (at TP2) and evaluates it in ppl mode at several parallel layouts in one launch.

Usage: torchrun --nproc-per-node 2 mcore_eval_worker.py SPEC.json OUT.json
SPEC: {"save": dir, "tokenizer": dir, "benchmark_dir": dir, "shots": k, "vocab_size": n, "layouts": [[tp, pp], ...]}
OUT (rank 0): {"tp1pp1": {"choices": {subject: [...]}, "scores": {subject: [[4 floats], ...]},
                          "responses": [gen-mode answers of the first subject]}, ...}
"""
import argparse
import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import torch.distributed as dist  # noqa: E402


def save_random_checkpoint(save: str, vocab_size: int) -> None:
    from tinyllm_mcore.model import build_model
    from tinyllm_mcore.presets import get_preset, transformer_config
    from tinyllm_mcore.runtime import distributed as rt
    from tinyllm_mcore.training.checkpoint import save_checkpoint

    rt.initialize(tp=2, pp=1, seed=7)
    preset = get_preset("tiny", vocab_size=vocab_size)
    # A wide init makes option scores differ clearly (a 0.02-std random model scores everything nearly alike).
    config = transformer_config(preset, tensor_model_parallel_size=2, use_cpu_initialization=True, init_method_std=0.3)
    model = build_model(preset, config)
    args = argparse.Namespace(preset=dataclasses.asdict(preset), tensor_model_parallel_size=2,
                              pipeline_model_parallel_size=1, make_vocab_size_divisible_by=128)
    save_checkpoint(save, 1, [model], None, None, consumed_samples=0, args=args)


def main(spec_path, out_path):
    from megatron.core import parallel_state

    from tinyllm_mcore.evaluation.multiple_choice import evaluate_multiple_choice, load_tasks
    from tinyllm_mcore.evaluation.runner import open_mcore

    spec = json.load(open(spec_path))
    save_random_checkpoint(spec["save"], spec["vocab_size"])
    parallel_state.destroy_model_parallel()
    tasks = load_tasks(spec["benchmark_dir"], "test", spec["shots"])
    results = {}
    for tp, pp in spec["layouts"]:
        lm, encoder = open_mcore(spec["save"], spec["tokenizer"], tensor_parallel_size=tp, pipeline_parallel_size=pp)
        result = evaluate_multiple_choice(lm, encoder, tasks, batch_size=3)
        results[f"tp{tp}pp{pp}"] = {
            "choices": {s: [r["pred"] for r in recs] for s, recs in result["records"].items()},
            "scores": {s: [r["scores"] for r in recs] for s, recs in result["records"].items()},
        }
        # gen mode on one subject: KV-cached inference.Generator at PP1, re-forward through the pipeline at PP2
        gen = evaluate_multiple_choice(lm, encoder, tasks[:1], mode="gen", max_new_tokens=4, batch_size=4)
        results[f"tp{tp}pp{pp}"]["responses"] = [r["response_ids"] for r in gen["records"][tasks[0].subject]]
        parallel_state.destroy_model_parallel()
        dist.barrier()
    if dist.get_rank() == 0:
        json.dump(results, open(out_path, "w"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
