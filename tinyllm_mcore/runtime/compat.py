"""megatron-core and torch as this project meets them: the supported versions, what differs, and every patch.

Tested range: megatron-core 0.16.1 (the newest on Python 3.11) to 0.19.x (what pip installs on Python 3.12); setup.py
pins the same range, and torch >= 2.4.

The patch mechanism. Every megatron/torch attribute this project replaces goes through `patch`, `wrap` (a
replacement built from the original) or `patched` (for the duration of a `with` block, e.g. on one object), each
declared with the megatron-core releases - and torch releases, where the patch depends on torch - it was checked
against. A patch asked for on a release outside its range raises `PatchVersionError` instead of changing code it
was not checked with; applied patches are recorded (`applied_patches`) and applying one twice does nothing. The
patches live here and in the CPU adapter (runtime/cpu.py, what megatron needs without CUDA); nothing outside
runtime/ patches (tests/runtime/test_patches.py lists every patched attribute with its range and scans the package).

What this module handles, so nothing else asks which megatron-core is installed:

- Checkpoint layout. Up to 0.18 a dist checkpoint keeps its common (non-tensor) state in `common.pt`; 0.19 stores it
  inside the torch_dist files as the sharded object `common_state`, and reads `common.pt` first when one exists.
  `is_complete_dist_checkpoint` accepts both layouts, and `write_common_state_file` adds `common.pt` to a checkpoint
  written without one, so 0.16 can read what 0.19 wrote (0.16 does not know `common_state`).
  A checkpoint in 0.19's layout without `common.pt` (from another tool) fails below 0.19 with one line saying so
  (`unreadable_layout`). Each checkpoint records the megatron-core version that wrote it (`checkpoint_stamp`).
- 0.19 logs "GPTModel IS DEPRECATED ... use HybridModel" for every model built. GPTModel still gets fixes and is what
  the design asks for (docs/architecture.md, "megatron-core versions"); like every library warning it is held back
  unless --verbose (runtime/quiet.py).
- Optimizer state: 0.19 matches saved parameter groups by their LR/WD settings too, so a resume without the same
  --lr fails; `match_saved_param_groups_by_structure` restores 0.16's rule (the saved settings win). Loading the
  distributed optimizer's state needs two fixes in every supported version (`distributed_optimizer_load_fixes`).
- Checkpoint writes. Up to 0.18 megatron's writer forks a process per file bucket on every save, and its results
  queue lives in a multiprocessing Manager server (spawned; we forked it) - forks of a process that runs gloo and
  OpenMP threads, which can deadlock in the child and leave the save waiting forever (`JoinableQueue.join()`).
  0.19 writes with threads; `write_checkpoints_in_process` gives the older versions the same (and every version an
  in-process results queue: our saves are synchronous), so no save starts a process.
- Models without Transformer Engine: 0.16's MoE router needs `te_general_gemm` defined (`define_te_general_gemm`).

Not here: what differs only on CPU (0.19's DDP waits on the current CUDA stream in every gradient sync) is the CPU
adapter's business, runtime/cpu.py, through the same mechanism.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from types import ModuleType

from packaging.requirements import Requirement
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


@functools.lru_cache(maxsize=None)
def installed_version(package: str) -> str:
    """The installed version of `package` ("0.19.2", "2.13.0+cpu"), from its metadata (no import)."""
    return metadata.version(package)


def megatron_core_version() -> str:
    """The installed megatron-core version ("0.19.2"), read from the package metadata (no megatron import)."""
    return installed_version("megatron-core")


def is_supported(version: str) -> bool:
    """Whether `version` lies in the tested range OLDEST_TESTED .. NEWEST_TESTED_SERIES.x (pre-releases included)."""
    release = Version(version).release
    return Version(OLDEST_TESTED).release <= release and release[:2] <= Version(NEWEST_TESTED_SERIES).release


# --- patches ---------------------------------------------------------------------------------------------------------

# The ranges a patch declares (requirement strings). Every supported megatron-core release, and setup.py's torch.
MEGATRON_CORE = f"megatron-core>={OLDEST_TESTED},<0.{int(NEWEST_TESTED_SERIES.split('.')[1]) + 1}"
TORCH = "torch>=2.4"


class PatchVersionError(RuntimeError):
    """A patch asked for where the installed megatron-core or torch lies outside the range it was checked against."""


@dataclass(frozen=True)
class Patch:
    """One replaced megatron/torch attribute and the releases it applies to."""

    target: str                # "module.attribute" or "module.Class.attribute"; "module.Class()." is per object
    versions: tuple[str, ...]  # requirements that must all hold, e.g. ("megatron-core>=0.16.1,<0.19",)
    why: str
    scoped: bool               # replaced only inside `with patched(...)`


_APPLIED: dict[str, Patch] = {}  # every patch this process applied (scoped ones: entered at least once)
_INSTALLED: dict[str, object] = {}  # target -> the replacement put there (process-wide patches)
_MISSING = object()


@functools.lru_cache(maxsize=None)
def _requirements(versions: tuple[str, ...]) -> tuple[Requirement, ...]:
    requirements = tuple(Requirement(text) for text in versions)
    unknown = [r.name for r in requirements if r.name not in ("megatron-core", "torch")]
    if unknown or not any(r.name == "megatron-core" for r in requirements):
        raise ValueError(f"a patch's versions name megatron-core (and torch where it matters), not {versions}")
    return requirements


def _versions(versions: str | tuple[str, ...]) -> tuple[str, ...]:
    return (versions,) if isinstance(versions, str) else tuple(versions)


def outside_range(versions: str | tuple[str, ...]) -> str | None:
    """Which installed package lies outside `versions` ("megatron-core 0.20.0 is not >=0.16.1,<0.20"), or None."""
    for requirement in _requirements(_versions(versions)):
        here = installed_version(requirement.name)
        if not requirement.specifier.contains(Version(here).public, prereleases=True):
            return f"{requirement.name} {here} is not {requirement.specifier}"
    return None


def applied_patches() -> dict[str, Patch]:
    """target -> Patch for every patch applied in this process."""
    return dict(_APPLIED)


def _target(owner, name: str) -> str:
    if isinstance(owner, ModuleType):
        return f"{owner.__name__}.{name}"
    if isinstance(owner, type):
        return f"{owner.__module__}.{owner.__qualname__}.{name}"
    return f"{type(owner).__module__}.{type(owner).__qualname__}().{name}"


def _declare(owner, name: str, versions, why: str, *, scoped: bool) -> str:
    """Check the range (before anything changes) and record the patch; the target's name."""
    target = _target(owner, name)
    declared = Patch(target, _versions(versions), why, scoped)
    problem = outside_range(declared.versions)
    if problem:
        raise PatchVersionError(f"patch of {target} is declared for {', '.join(declared.versions)}, but {problem}: "
                                f"check it against this release and widen its range, or drop it")
    if _APPLIED.setdefault(target, declared) != declared:
        raise ValueError(f"{target} is patched with two different declarations")
    return target


def _own_value(owner, name: str):
    """The attribute as stored on `owner` itself (classmethods as such), or _MISSING where it is inherited/absent."""
    return vars(owner).get(name, _MISSING)


def patch(owner, name: str, replacement, *, versions: str | tuple[str, ...], why: str) -> None:
    """Set `owner.name` to `replacement` for the rest of the process. Idempotent: while the replacement set by an
    earlier call is still in place, nothing changes. Raises PatchVersionError outside `versions`."""
    wrap(owner, name, lambda original: replacement, versions=versions, why=why)


def wrap(owner, name: str, wrapper, *, versions: str | tuple[str, ...], why: str) -> None:
    """Set `owner.name` to `wrapper(original)`, where original is the attribute as `owner` stores it (a class's
    classmethod/staticmethod object, not the bound function) or, if inherited, as looked up. Idempotent: the
    original is wrapped once (while the replacement is in place). Raises PatchVersionError outside `versions`."""
    target = _declare(owner, name, versions, why, scoped=False)
    if target in _INSTALLED and _own_value(owner, name) is _INSTALLED[target]:
        return
    own = _own_value(owner, name)
    replacement = wrapper(getattr(owner, name, None) if own is _MISSING else own)
    setattr(owner, name, replacement)
    _INSTALLED[target] = replacement


@contextlib.contextmanager
def patched(owner, name: str, replacement, *, versions: str | tuple[str, ...], why: str):
    """`owner.name` is `replacement` inside the block and what it was afterwards (an attribute `owner` did not hold
    itself is removed again, so lookups reach the inherited one). Owner may be a single object. Raises
    PatchVersionError outside `versions`."""
    _declare(owner, name, versions, why, scoped=True)
    before = _own_value(owner, name)
    if before is replacement:  # nested inside the same patch
        yield
        return
    setattr(owner, name, replacement)
    try:
        yield
    finally:
        if before is _MISSING:
            delattr(owner, name)
        else:
            setattr(owner, name, before)


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

    def structure(group: dict) -> tuple:
        return tuple(group.get(key, group.get(f"pre_{key}")) for key in _STRUCTURAL_GROUP_KEYS)

    def by_structure_where_settings_fail(original: staticmethod) -> staticmethod:
        by_settings = original.__func__

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

        return staticmethod(filter_and_reorder)

    wrap(megatron_optimizer.MegatronOptimizer, "_filter_and_reorder_param_groups", by_structure_where_settings_fail,
         versions="megatron-core>=0.19,<0.20", why="0.19 matches saved param groups by LR/WD settings too")


@contextlib.contextmanager
def distributed_optimizer_load_fixes(optimizer):
    """While loading: the distributed optimizer copies only the state tensors the checkpoint has.

    megatron 0.16 restores torch Adam's per-parameter `step` from the saved param groups, then copies every key of
    the live state from what it read: fully_reshardable did not read a `step` (KeyError), and dp_reshardable hands
    back the placeholder `step` of the state built for loading, which would reset Adam's bias correction. So: copy
    the tensors that were read, never `step`. It also hands every parameter the *same* step tensor, which torch Adam
    then increments once per parameter per update (resume diverged from the second step on): each gets its own.
    Scoped to these optimizer instances for the duration of the load; applied under every supported version.
    """
    import torch
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    fixed = []
    with contextlib.ExitStack() as scope:
        for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
            if isinstance(opt, DistributedOptimizer) and isinstance(opt.optimizer, torch.optim.Optimizer):
                scope.enter_context(patched(
                    opt, "_set_main_param_and_optimizer_states", functools.partial(_copy_loaded_states, opt),
                    versions=MEGATRON_CORE, why="copy only the state tensors read, never Adam's step"))
                fixed.append(opt)
        yield
    for opt in fixed:
        for param_state in opt.optimizer.state.values():
            if "step" in param_state:
                param_state["step"] = param_state["step"].clone()


def _copy_loaded_states(opt, model_param, tensors: dict) -> None:
    """`_set_main_param_and_optimizer_states` for one distributed optimizer during a load (see above)."""
    group_index, group_order = opt.model_param_group_index_map[model_param]
    main_param = opt.optimizer.param_groups[group_index]["params"][group_order]
    live = {"param": main_param, **opt.optimizer.state[main_param]}
    for key, value in tensors.items():
        if key in live and key != "step":
            live[key].copy_(value)


# --- checkpoint writes ---------------------------------------------------------------------------------------------

def write_checkpoints_in_process() -> None:
    """Before each save: megatron's writer runs in this process (module docstring, "Checkpoint writes").

    The results queue is a plain `queue.Queue` (the synchronous save puts and takes it in this process; emptied here
    so a failed save's leftover cannot be read as the next one's), and where the writer forks per bucket
    (`write_preloaded_data_multiproc`, up to 0.18) each bucket is written by a thread instead."""
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    patch(filesystem_async, "_results_queue", queue.Queue(), versions=MEGATRON_CORE,
          why="megatron keeps it in a multiprocessing Manager server process")
    while not filesystem_async._results_queue.empty():
        filesystem_async._results_queue.get_nowait()
    writer = filesystem_async.FileSystemWriterAsync
    if hasattr(writer, "write_preloaded_data_multiproc"):
        patch(writer, "write_preloaded_data_multiproc", staticmethod(_write_buckets_in_threads),
              versions="megatron-core>=0.16.1,<0.19", why="forks a writer process per file bucket on every save")


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


# --- models ----------------------------------------------------------------------------------------------------------

def define_te_general_gemm() -> None:
    """megatron-core 0.16's MoE router tests `te_general_gemm is not None` but only defines the name when Transformer
    Engine imports; without TE the router's gating linear raises NameError. None selects its plain torch.mm path
    (what 0.19 defines itself). Call before building a model; idempotent."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        patch(moe_utils, "te_general_gemm", None, versions="megatron-core>=0.16.1,<0.19",
              why="the MoE router needs the name without Transformer Engine")
