"""Runs several training configurations in one process (group) and writes their losses as JSON.

Usage: python loop_worker.py RUNS.json OUT.json   (under torchrun for 2 processes; plain python for one)
RUNS.json: [{"name": ..., "argv": [...], "expect_error": bool?}, ...]. Between runs only megatron's parallel state is torn down, so one
launch (one ~5 s megatron import) covers many layouts.
"""
import json
import sys

import torch.distributed as dist

from tests.harness.progression_data import progression_datasets
from tinyllm_mcore.training.steps import lm_forward_step
from tinyllm_mcore.training.loop import Stage, parse_args, train

STAGE = Stage("pretrain", progression_datasets, lm_forward_step)


def main(runs_path, out_path):
    from megatron.core import parallel_state

    from tinyllm_mcore.training.checkpoint import CheckpointError

    results = {}
    for run in json.load(open(runs_path)):
        args = parse_args(STAGE, run["argv"] + ["--mock-data"])
        try:
            out = train(STAGE, args)
        except CheckpointError as e:  # a run expected to be refused records the one-line message
            if not run.get("expect_error"):
                raise
            results[run["name"]] = {"error": str(e)}
        else:
            results[run["name"]] = {
                "train": [r["lm loss"] for r in out["history"] if r["split"] == "train"],
                "valid": [r["lm loss"] for r in out["history"] if r["split"] == "valid"],
            }
        parallel_state.destroy_model_parallel()
        dist.barrier()
    if dist.get_rank() == 0:
        json.dump(results, open(out_path, "w"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
