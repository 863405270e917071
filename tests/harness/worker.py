"""What each rank runs for `tests.harness.distributed.run_ranks`: `python -m tests.harness.worker SPEC.json`, started
by run_ranks itself or by torchrun, with the repository root as working directory (so `tests.*` imports).

SPEC: {"target": "package.module:function" | null, "kwargs": {...}, "out_dir": dir,
       "cases": {name: {...} (keyword arguments for target) | ["package.module:function", {...}]} | null}.
Writes OUT_DIR/rank<R>.json: the function's return value ({name: value} with cases). A failure exits non-zero with
the traceback on stderr; run_ranks then stops the other ranks.
"""
from __future__ import annotations

import importlib
import json
import os
import sys
from datetime import timedelta
from pathlib import Path

from tinyllm_mcore.runtime.files import atomic_write_text


def resolve(target: str):
    module, _, function = target.partition(":")
    if not function:
        raise ValueError(f"target {target!r} is not 'package.module:function'")
    return getattr(importlib.import_module(module), function)


def reset_parallel_state() -> None:
    """Megatron's model-parallel groups go between cases; the process group stays (re-creating it can hang)."""
    if "megatron.core.parallel_state" in sys.modules:  # no megatron import for a case that never used it
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()


def main(spec_path: str) -> None:
    import torch.distributed as dist

    spec = json.loads(Path(spec_path).read_text())
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    # gloo on CPU: the code under test finds the group started and only builds megatron's groups on it
    dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world_size,
                            timeout=timedelta(minutes=30))
    if spec["cases"] is None:
        result = resolve(spec["target"])(**spec["kwargs"])
        reset_parallel_state()
    else:
        result = {}
        for name, case in spec["cases"].items():
            target, kwargs = case if isinstance(case, list) else (spec["target"], case)
            result[name] = resolve(target)(**{**spec["kwargs"], **kwargs})  # a case overrides the shared arguments
            reset_parallel_state()
            dist.barrier()
    out = Path(spec["out_dir"]) / f"rank{rank}.json"
    atomic_write_text(out, json.dumps(result))  # a value that is not JSON-able fails here, in the rank that returned it
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
