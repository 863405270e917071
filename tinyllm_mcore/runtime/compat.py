"""The megatron-core versions this project supports, and the few places where they differ for us.

Tested range: megatron-core 0.16.1 (the newest on Python 3.11) to 0.19.x (what pip installs on Python 3.12); setup.py
pins the same range. Every difference between those versions that our code meets is handled here, so nothing else
asks which megatron-core is installed:

- Checkpoint layout. Up to 0.18 a dist checkpoint keeps its common (non-tensor) state in `common.pt`; 0.19 stores it
  inside the torch_dist files as the sharded object `common_state`, and reads `common.pt` first when one exists.
  `is_complete_dist_checkpoint` accepts both layouts, and `write_common_state_file` adds `common.pt` to a checkpoint
  written without one, so 0.16 can read what 0.19 wrote (0.16 does not know `common_state`).
  A checkpoint in 0.19's layout without `common.pt` (from another tool) fails below 0.19 with one line saying so
  (`unreadable_layout`). Each checkpoint records the megatron-core version that wrote it (`checkpoint_stamp`).
- 0.19 logs "GPTModel IS DEPRECATED ... use HybridModel" for every model built. GPTModel still gets fixes and is what
  the design asks for (docs/architecture.md, "megatron-core versions"); `silence_known_noise` filters it out
  (called when tinyllm_mcore is imported).
- Optimizer state: 0.19 matches saved parameter groups by their LR/WD settings too, so a resume without the same
  --lr fails; `match_saved_param_groups_by_structure` restores 0.16's rule (the saved settings win).
- Checkpoint writes. Up to 0.18 megatron's writer forks a process per file bucket on every save, and its results
  queue lives in a multiprocessing Manager server (spawned; we forked it) — forks of a process that runs gloo and
  OpenMP threads, which can deadlock in the child and leave the save waiting forever (`JoinableQueue.join()`).
  0.19 writes with threads; `write_checkpoints_in_process` gives the older versions the same (and every version an
  in-process results queue: our saves are synchronous), so no save starts a process.
- CUDA streams on CPU (0.19's DDP waits on the current CUDA stream in every gradient sync) are the CPU adapter's
  business: runtime/cpu.py.
"""
from __future__ import annotations

import logging
from importlib import metadata
from pathlib import Path

from packaging.version import Version

from tinyllm_mcore.runtime import files

# The range setup.py declares: the oldest and the newest release line tested (CI runs both ends).
OLDEST_TESTED = "0.16.1"
NEWEST_TESTED_SERIES = "0.19"

# megatron.core.dist_checkpointing's file names (the same in every supported version).
CONFIG_FILE = "metadata.json"  # written last by dist_checkpointing.save: present means the save finished
COMMON_STATE_FILE = "common.pt"  # common state up to 0.18 (and readable by 0.19)
TORCH_DIST_INDEX = ".metadata"  # torch.distributed.checkpoint's index of the .distcp files

# The first release that keeps the common state inside the torch_dist files (0.17 and 0.18 still write common.pt).
COMMON_STATE_IN_TORCH_DIST_SINCE = (0, 19)

# The key under which a checkpoint's common state records the writing megatron-core version.
VERSION_KEY = "megatron_core_version"


def megatron_core_version() -> str:
    """The installed megatron-core version ("0.19.2"), read from the package metadata (no megatron import)."""
    return metadata.version("megatron-core")


def is_supported(version: str) -> bool:
    """Whether `version` lies in the tested range OLDEST_TESTED .. NEWEST_TESTED_SERIES.x (pre-releases included)."""
    release = Version(version).release
    return Version(OLDEST_TESTED).release <= release and release[:2] <= Version(NEWEST_TESTED_SERIES).release


# --- checkpoints -----------------------------------------------------------------------------------------------------

def is_complete_dist_checkpoint(path: Path) -> bool:
    """A dist checkpoint whose save finished, in the layout of any supported megatron-core.

    `metadata.json` is written after all data (0.16 and 0.19 alike); the common state is either `common.pt`
    (<= 0.18) or inside the torch_dist files, whose index `.metadata` is then present.
    """
    path = Path(path)
    return (path / CONFIG_FILE).is_file() and (
        (path / COMMON_STATE_FILE).is_file() or (path / TORCH_DIST_INDEX).is_file())


def unreadable_layout(path: Path) -> str | None:
    """Why the installed megatron-core cannot read this checkpoint's layout (None when it can).

    A checkpoint whose common state exists only inside the torch_dist files (written by megatron-core >= 0.19 without
    our `common.pt`, e.g. by Megatron-LM) is unreadable below 0.19.
    """
    path = Path(path)
    here = megatron_core_version()
    if Version(here).release < COMMON_STATE_IN_TORCH_DIST_SINCE and not (path / COMMON_STATE_FILE).is_file():
        return (f"written by megatron-core >= 0.19 without {COMMON_STATE_FILE}, which megatron-core {here} cannot "
                f"read: load it under megatron-core 0.19.x (Python 3.12), or save it again there with tinyllm-mcore "
                f"(which adds {COMMON_STATE_FILE})")
    return None


def checkpoint_stamp() -> dict:
    """Plain values stored in a checkpoint's common state: which megatron-core wrote it."""
    return {VERSION_KEY: megatron_core_version()}


def write_common_state_file(path: Path) -> None:
    """Give a finished checkpoint a `common.pt` if its megatron-core stored the common state elsewhere (0.19).

    Call on one rank after the save. megatron-core 0.19 reads `common.pt` when present (its legacy path), so the
    checkpoint stays identical for it, and 0.16 - which only knows `common.pt` - can load it. Written to a temp file
    and renamed, so a reader never sees half a file.
    """
    path = Path(path)
    target = path / COMMON_STATE_FILE
    if target.is_file():
        return
    import torch
    from megatron.core import dist_checkpointing

    common = dist_checkpointing.load_common_state_dict(str(path))
    with files.atomic_output(target) as tmp:
        torch.save(common, tmp)


# --- optimizer state ---------------------------------------------------------------------------------------------

# What identifies an optimizer parameter group in megatron-core 0.16..0.18 (and still in 0.19, among more keys).
_STRUCTURAL_GROUP_KEYS = ("wd_mult", "lr_mult", "is_expert_parallel", "is_decoupled_lr")


def match_saved_param_groups_by_structure() -> None:
    """Let a resume that does not restate --lr/--min-lr/--weight-decay load its optimizer state under 0.19.

    megatron-core 0.19 matches saved optimizer parameter groups to the current ones by their settings, max_lr, min_lr,
    start_wd and end_wd included, so resuming a run whose flags default to other values fails ("Could not find
    parameter group"). Up to 0.18 groups matched on their structure only and the saved group, with the saved
    settings, replaced the current one, the same rule our LR scheduler follows (megatron's
    use_checkpoint_opt_param_scheduler). Where 0.19's match fails, this matches on structure, as before. A no-op
    below 0.19; idempotent.
    """
    from megatron.core.optimizer import optimizer as megatron_optimizer

    if "max_lr" not in getattr(megatron_optimizer, "param_group_identifier_keys", ()):
        return
    cls = megatron_optimizer.MegatronOptimizer
    by_settings = cls._filter_and_reorder_param_groups
    if getattr(by_settings, "tinyllm_by_structure", False):
        return

    def structure(group: dict) -> tuple:
        return tuple(group.get(key, group.get(f"pre_{key}")) for key in _STRUCTURAL_GROUP_KEYS)

    def filter_and_reorder(current_groups, state_dict_groups):
        try:
            return by_settings(current_groups, state_dict_groups)
        except ValueError:
            saved = {structure(group): group for group in state_dict_groups}
            if len(saved) != len(state_dict_groups) or any(structure(g) not in saved for g in current_groups):
                raise  # groups that differ only in their settings: only 0.19's own match can tell them apart
            ordered = []
            for current, params in zip(current_groups, [group["params"] for group in state_dict_groups]):
                group = saved[structure(current)]
                group["params"] = params
                ordered.append(group)
            return ordered

    filter_and_reorder.tinyllm_by_structure = True
    cls._filter_and_reorder_param_groups = staticmethod(filter_and_reorder)


# --- checkpoint writes ---------------------------------------------------------------------------------------------

def write_checkpoints_in_process() -> None:
    """Before each save: megatron's writer runs in this process (module docstring, "Checkpoint writes").

    The results queue is a plain `queue.Queue` (the synchronous save puts and takes it in this process; emptied here
    so a failed save's leftover cannot be read as the next one's), and where the writer forks per bucket
    (`write_preloaded_data_multiproc`, up to 0.18) each bucket is written by a thread instead."""
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if not isinstance(filesystem_async._results_queue, queue.Queue):
        filesystem_async._results_queue = queue.Queue()
    while not filesystem_async._results_queue.empty():
        filesystem_async._results_queue.get_nowait()
    writer = filesystem_async.FileSystemWriterAsync
    if hasattr(writer, "write_preloaded_data_multiproc") and not getattr(
            writer.write_preloaded_data_multiproc, "tinyllm_threads", False):
        writer.write_preloaded_data_multiproc = staticmethod(_write_buckets_in_threads)


def _write_buckets_in_threads(transform_list, use_msc: bool, rank: int, write_buckets, global_results_queue) -> None:
    """megatron 0.16's `write_preloaded_data_multiproc` contract (one result dict, or the first worker exception, put
    on `global_results_queue`) with one thread per bucket; each thread runs megatron's own bucket writer."""
    import queue
    import threading

    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    results, done = queue.Queue(), queue.Queue()  # done: the writer's task_done() handshake
    threads = []
    for index, bucket in enumerate(write_buckets):
        done.put(index)
        threads.append(threading.Thread(
            target=FileSystemWriterAsync.write_preloaded_data, args=(transform_list, index, bucket, results, done),
            kwargs={"use_fsync": True, "use_msc": use_msc}, name=f"checkpoint-writer-{index}", daemon=True))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    written: dict | Exception = {}
    while not results.empty():
        index, outcome = results.get_nowait()
        if isinstance(outcome, Exception):
            written = outcome
            break
        written[index] = outcome
    if isinstance(written, dict) and len(written) != len(write_buckets):
        written = RuntimeError(f"checkpoint writer threads returned {len(written)} of {len(write_buckets)} buckets")
    global_results_queue.put(written)


_write_buckets_in_threads.tinyllm_threads = True


# --- logging ---------------------------------------------------------------------------------------------------------

# (logger, message start) of log lines the Python 3.12 stack prints that no user can act on; our CLIs promise one
# `error:` line on bad input, so stray log lines on stderr count.
_KNOWN_NOISE = (
    # megatron-core 0.19, once per model built: GPTModel is supported and what the design asks for (module docstring).
    ("megatron.core.models.gpt.gpt_model", "GPTModel IS DEPRECATED"),
    # megatron-core 0.19, on loading a checkpoint with common.pt: we write one on purpose, so 0.16 can read it.
    ("megatron.core.dist_checkpointing.strategies.common", "load_common is deprecated"),
    # megatron-core 0.19, on the first save: its own (synchronous here) writer is "deprecated" in favour of NVRx,
    # an optional package; nothing to act on.
    ("megatron.core.dist_checkpointing.strategies.torch", "MCore's async save is deprecated"),
    # PyPI's torch for Python 3.12 is the CUDA build; on a CPU machine it says so when megatron-core 0.19 imports
    # torch.utils.cpp_extension. The CPU build (Python 3.11 here) and GPU machines never print it.
    ("torch.utils.cpp_extension", "No CUDA runtime is found"),
)


class _DropMessage(logging.Filter):
    def __init__(self, start: str):
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.start)


def silence_known_noise() -> None:
    """Filter out the log lines listed above. Idempotent; works before megatron or torch's submodules are imported
    (the filters sit on the named loggers)."""
    for logger_name, start in _KNOWN_NOISE:
        logger = logging.getLogger(logger_name)
        if not any(isinstance(f, _DropMessage) and f.start == start for f in logger.filters):
            logger.addFilter(_DropMessage(start))
