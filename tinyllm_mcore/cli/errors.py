"""Bad input ends a CLI with one clear line on stderr and a non-zero exit, not a traceback."""
from __future__ import annotations

import os
import sys

from tinyllm_mcore.runtime.distributed import ParallelConfigError
from tinyllm_mcore.checkpoint.io import CheckpointError

# Errors that describe the user's input (paths, sizes, files). Anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, ParallelConfigError, CheckpointError,
               FloatingPointError)


def run_cli(fn) -> int:
    try:
        fn()
    except USER_ERRORS as e:
        rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
        if rank == "0":
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0
