"""Checkpoints with megatron.core.dist_checkpointing (torch_dist format): reshardable across TP/PP/DP.

Layout (Megatron-LM's):  SAVE/iter_0000100/  (one dist checkpoint)  and  SAVE/latest_checkpointed_iteration.txt.
The pointer file is replaced atomically only after every rank finished writing, so a process killed mid-save
leaves the pointer on the previous complete checkpoint; the half-written iter dir is ignored and overwritten.

Contents: model (each virtual-pipeline chunk), optimizer, LR scheduler, RNG states (per TP/PP rank; skipped when
the layout changes), iteration, consumed samples and the run's metadata (checkpoint/metadata.py, a versioned
schema). Common (non-tensor) state is read with torch.load's weights_only default, so only plain Python values are
stored there.

Reading one: `resolve_load_dir` (once per --load), then `read_checkpoint` (the files verified, the common state read
once, the metadata parsed) gives the SavedCheckpoint that `check_matches_run`, `check_tokenizer` and
`load_checkpoint` take.
"""
from __future__ import annotations

import os
import random
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from tinyllm_mcore.runtime import compat
from tinyllm_mcore.runtime import distributed as rt
from tinyllm_mcore.runtime import files
from tinyllm_mcore.checkpoint import CheckpointError, formats
from tinyllm_mcore.checkpoint import safety as safety
from tinyllm_mcore.checkpoint.metadata import KEY as METADATA_KEY
from tinyllm_mcore.checkpoint.metadata import CheckpointMetadata
from tinyllm_mcore.checkpoint.safety import TRACKER
from tinyllm_mcore.model.presets import PRESETS


def iteration_dir(root: str | os.PathLike, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def _is_dist_checkpoint(path: Path) -> bool:
    """A finished dist checkpoint in any supported megatron-core's layout; one line if this one cannot read it."""
    if not compat.is_complete_dist_checkpoint(path):
        return False
    problem = compat.unreadable_layout(path)
    if problem:
        raise CheckpointError(f"{path}: {problem}")
    return True


def resolve_load_dir(load: str | os.PathLike) -> Path:
    """`--load` may be a save root (with the pointer file) or one iter_* checkpoint directory."""
    root = Path(load)
    if not root.exists():
        raise CheckpointError(f"checkpoint path does not exist: {root}")
    tracker = root / TRACKER
    try:
        latest = safety.read_tracker(root)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    if latest is not None:
        path = root / "release" if latest == "release" else iteration_dir(root, latest)
        if not _is_dist_checkpoint(path):
            raise CheckpointError(f"{tracker} points at {path}, which is not a complete dist checkpoint")
        return path
    if _is_dist_checkpoint(root):
        return root
    raise CheckpointError(f"not a checkpoint directory (no {TRACKER} and no dist-checkpoint metadata): {root}")


@dataclass(frozen=True)
class SavedCheckpoint:
    """One checkpoint directory as read once: what every check and the load take."""
    path: Path  # the iter_* directory --load resolved to
    common: dict  # its common (non-tensor) state
    metadata: CheckpointMetadata  # the run that wrote it

    @property
    def preset(self):
        """The ModelPreset it was trained with; one line where it recorded none."""
        if self.metadata.preset is None:
            raise CheckpointError(f"{self.path} has no model preset in its metadata (not a tinyllm-mcore checkpoint?)")
        return self.metadata.preset


def read_checkpoint(path: Path, *, verify: bool = True, require_manifest: bool = False) -> SavedCheckpoint:
    """The checkpoint in `path` (a directory resolve_load_dir gave): its files checked against the manifest first
    (`verify`, verify_checkpoint), then its common state read and its metadata parsed, once."""
    if verify:
        verify_checkpoint(path, require_manifest=require_manifest)
    common = read_common(path)
    return SavedCheckpoint(path=path, common=common, metadata=CheckpointMetadata.from_common(common, path))


def unwrap(model):
    """The GPT module inside DDP / Float16Module wrappers (whose state-dict keys carry a 'module.' prefix)."""
    while hasattr(model, "module"):
        model = model.module
    return model


def _model_key(i: int, n: int) -> str:
    return "model" if n == 1 else f"model{i}"


def _rng_state() -> dict:
    """This rank's RNG states as plain values (safe to load with weights_only)."""
    from megatron.core import tensor_parallel

    version, internal, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "random": [version, list(internal), gauss],
        "np": [np_name, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss, np_gauss],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    version, internal, gauss = state["random"]
    random.setstate((version, tuple(internal), gauss))
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = state["np"]
    np.random.set_state((np_name, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _sharded_rng(state):
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    pp, tp = ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size()
    return ShardedObject("rng_state", state, (pp, tp), (ps.get_pipeline_model_parallel_rank(),
                                                         ps.get_tensor_model_parallel_rank()),
                         replica_id=ps.get_data_parallel_rank(with_context_parallel=True))


def _state_dict(models, optimizer, scheduler, *, iteration: int, consumed_samples: int,
                metadata: CheckpointMetadata | None, rng: bool, is_loading: bool,
                optimizer_metadata: dict | None = None, model_keys: Callable[[str], bool] | None = None) -> dict:
    state = {"iteration": iteration, "consumed_samples": consumed_samples}
    if metadata is not None:
        state[METADATA_KEY] = metadata.to_dict()
    model_state = {}
    for i, m in enumerate(models):
        model = unwrap(m).sharded_state_dict()
        state[_model_key(i, len(models))] = model if model_keys is None else \
            {k: v for k, v in model.items() if model_keys(k)}
        model_state.update(state[_model_key(i, len(models))])
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(model_state, is_loading=is_loading,
                                                          metadata=optimizer_metadata)
    if scheduler is not None:
        state["opt_param_scheduler"] = scheduler.state_dict()
    if rng:
        state["rng_state"] = _sharded_rng(_rng_state())
    return state




def save_checkpoint(save_dir: str, iteration: int, models, optimizer, scheduler, *, consumed_samples: int,
                    metadata: CheckpointMetadata | None = None, dist_ckpt_optim_fully_reshardable: bool = False,
                    distrib_optim_fully_reshardable_mem_efficient: bool = False,
                    export: Callable[[Path], object] | None = None,
                    model_keys: Callable[[str], bool] | None = None) -> Path:
    """Save and publish iteration `iteration` into `save_dir` (every rank calls it); `metadata`: the run's record
    (RunContext.checkpoint_metadata); the two flags choose a distributed optimizer's format (checkpoint/formats.py).
    `export(path)` runs on every rank once the dist checkpoint is written, before the manifest: what it writes into
    the iteration folder (--save-hf's hf/) is part of the checkpoint, covered by its manifest and published with it
    (if it fails, the save is incomplete: the pointer stays, the folder goes at the next start).
    `model_keys`: the model tensors saved (LoRA: the adapters only; the frozen base is its own checkpoint)."""
    from megatron.core import dist_checkpointing

    compat.write_checkpoints_in_process()  # megatron's writer would fork per save (runtime/compat.py)

    path = iteration_dir(save_dir, iteration)
    rank0 = dist.get_rank() == 0
    if rank0:
        if path.exists():  # remnant of an interrupted save of the same iteration
            shutil.rmtree(path)
        path.mkdir(parents=True)
    dist.barrier()
    optimizer_metadata = formats.optimizer_save_metadata(
        optimizer, fully_reshardable=dist_ckpt_optim_fully_reshardable,
        mem_efficient=distrib_optim_fully_reshardable_mem_efficient)
    state = _state_dict(models, optimizer, scheduler, iteration=iteration, consumed_samples=consumed_samples,
                        metadata=metadata, rng=True, is_loading=False, optimizer_metadata=optimizer_metadata,
                        model_keys=model_keys)
    state.update(compat.checkpoint_stamp())
    dist_checkpointing.save(state, str(path), content_metadata=optimizer_metadata)
    dist.barrier()
    if export is not None:
        export(path)
    if rank0:  # publish only a complete checkpoint
        _complete(path)
        publish_checkpoint(save_dir, iteration)
    dist.barrier()
    return path


def read_common(path: Path) -> dict:
    from megatron.core import dist_checkpointing

    try:
        return dist_checkpointing.load_common_state_dict(str(path))
    except Exception as e:  # truncated or garbage common state: one line naming the checkpoint
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise CheckpointError(f"{path}: unreadable common state ({type(e).__name__}: {first})") from e


def add_load_check_flags(group) -> None:
    """The flags of every command that reads a checkpoint (training --load, generate, chat, evaluate, export)."""
    group.add_argument("--no-verify-checkpoint", action="store_true",
                       help="load without checking the files against the checkpoint's manifest of checksums")
    group.add_argument("--require-manifest", action="store_true",
                       help="refuse a checkpoint without a manifest (older or hand-made: its files cannot be verified)")
    group.add_argument("--allow-tokenizer-change", action="store_true",
                       help="accept a tokenizer other than the checkpoint's (same vocabulary size): for a deliberate "
                            "change only, since ids would mean other pieces")


def check_tokenizer(saved: SavedCheckpoint, vocab_size: int | None, identity: str | None, *,
                    allow_change: bool = False, allow_vocab_change: bool = False) -> None:
    """The one tokenizer check of every command that reads a checkpoint: the tokenizer (its `vocab_size` and
    `identity`, Tokenizer.identity) is the one the checkpoint `saved` was trained with, or one line says what
    differs. `allow_change` accepts another tokenizer of the same size (--allow-tokenizer-change); only
    training may also change the size (`allow_vocab_change`). A checkpoint that recorded no identity (converted from
    HF without a tokenizer, or older) is checked by size only."""
    path, recorded = saved.path, saved.metadata.tokenizer_model
    vocab = saved.metadata.preset.vocab_size if saved.metadata.preset is not None else None
    if None not in (vocab, vocab_size) and vocab != vocab_size and not (allow_change and allow_vocab_change):
        use = f"the checkpoint's tokenizer ({recorded})" if recorded else "the tokenizer the model was trained with"
        raise CheckpointError(f"{path} has a {vocab}-token vocabulary and this run's tokenizer "
                              f"{vocab_size}: use {use}")
    saved_identity = saved.metadata.tokenizer_identity
    if saved_identity and identity and saved_identity != identity and not allow_change:
        raise CheckpointError(f"{path} was trained with another tokenizer ({recorded}) than --tokenizer-model: use "
                              "that one, or --allow-tokenizer-change for a deliberate change of a same-size "
                              "vocabulary")


# What decides tensor shapes: routing choices (top-k) may change between stages on the same weights.
SHAPE_FIELDS = ("hidden_size", "num_layers", "num_attention_heads", "ffn_hidden_size", "num_query_groups",
                "num_experts", "moe_shared_expert_ffn_hidden_size")


def check_same_model(path: Path, saved_preset, preset, fields: tuple[str, ...] = SHAPE_FIELDS) -> None:
    """`saved_preset` (of the weights at `path`) agrees with this run's `preset` in `fields`, or one line names
    the first differences and the --model-size to pass."""
    differs = [k for k in fields if getattr(saved_preset, k) != getattr(preset, k)]
    if differs:
        shown = ", ".join(f"{k} {getattr(saved_preset, k)} vs {getattr(preset, k)}" for k in differs[:3])
        hint = (f"pass --model-size {saved_preset.name}" if saved_preset.name in PRESETS
                else "no --model-size preset describes it")
        raise CheckpointError(f"{path} is a {saved_preset.name} model and this run builds {preset.name} ({shown}): "
                              f"{hint}")


def check_matches_run(saved: SavedCheckpoint, preset, tokenizer_identity: str | None,
                      allow_tokenizer_change: bool) -> None:
    """The checkpoint was trained as this run's model with this run's tokenizer, or one line says what differs."""
    if saved.metadata.preset is not None:
        check_same_model(saved.path, saved.metadata.preset, preset)
    check_tokenizer(saved, preset.vocab_size, tokenizer_identity, allow_change=allow_tokenizer_change,
                    allow_vocab_change=True)


def verify_checkpoint(path: Path, *, require_manifest: bool = False) -> None:
    """Rank 0 checks every file against the manifest; every rank raises the same one-line error.

    A checkpoint without a manifest (written before checksums, or by hand) cannot be verified: one warning line, or
    an error with `require_manifest` (--require-manifest)."""
    def verify() -> None:
        try:
            verified = safety.verify(path)
        except safety.CheckpointIntegrityError as e:
            raise CheckpointError(str(e)) from None
        if not verified:
            if require_manifest:
                raise CheckpointError(f"{path} has no manifest.json, so its files cannot be verified "
                                      "(--require-manifest); re-save it with this version to add one")
            print(f"warning: {path} has no manifest.json (saved before checksums, or by hand): its files "
                  "cannot be verified, a damaged file may load silently (--require-manifest refuses it)",
                  file=sys.stderr, flush=True)

    rt.on_rank0_then_share(verify)


def _check_model_keys(path: Path, model_states: list[dict], saved: dict[str, tuple[int, ...]]) -> None:
    """Every tensor the model expects is in the checkpoint (`saved`: key -> global shape) with the same global shape
    (a checkpoint of another size or stage is one line, not a multi-rank dump from inside the loader)."""
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    expected = {}
    for state in model_states:
        for value in nested_values(state):
            key = getattr(value, "key", None)
            if key is not None and not key.endswith("_extra_state"):
                # the padded vocabulary rows (embedding, output layer) legitimately differ with TP: megatron marks them
                exact = isinstance(value, ShardedTensor) and not getattr(value, "allow_shape_mismatch", False)
                expected[key] = tuple(value.global_shape) if exact else None
    missing = sorted(k for k in expected if k not in saved)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{path} has no {missing[0]}{more}: it holds another kind of model (an LM, reward "
                              "or MoE checkpoint of another stage?)")
    for key, shape in expected.items():
        if shape is not None and saved[key] != shape:
            raise CheckpointError(f"{path}: {key} has shape {saved[key]} in the checkpoint but "
                                  f"{shape} in this model (another --model-size or vocabulary?)")


def load_checkpoint(saved: SavedCheckpoint, models, optimizer=None, scheduler=None, *, finetune: bool = False,
                    load_optim: bool = True, load_rng: bool = True,
                    skip_prefixes: tuple[str, ...] = (),
                    skip_key: Callable[[str], bool] | None = None) -> tuple[int, int]:
    """Load the checkpoint `saved` (read_checkpoint: already verified) into the (already built)
    models/optimizer/scheduler; return (iteration, consumed_samples).

    `finetune` loads model weights only and restarts counting from zero. RNG states are restored only when the
    parallel layout is unchanged (they are per TP/PP rank).
    `skip_prefixes`: model parameters left as built (reward: its new head, from an LM checkpoint's trunk);
    `skip_key`: the same for the keys it is true of (LoRA: the adapters, from the base checkpoint).
    """
    from megatron.core import parallel_state as ps

    try:
        return _load(saved, models, optimizer, scheduler, finetune=finetune, load_optim=load_optim,
                     load_rng=load_rng, skip_prefixes=skip_prefixes, skip_key=skip_key, ps=ps)
    except CheckpointError:
        raise
    except Exception as e:  # a damaged file the manifest could not vouch for: one line, not a multi-rank dump
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise CheckpointError(f"{saved.path}: cannot be loaded ({type(e).__name__}: {first})") from e


def _load(saved: SavedCheckpoint, models, optimizer, scheduler, *, finetune: bool, load_optim: bool,
          load_rng: bool, skip_prefixes: tuple[str, ...], skip_key, ps):
    from megatron.core import dist_checkpointing

    path, run = saved.path, saved.metadata
    same_layout = (run.tensor_model_parallel_size == ps.get_tensor_model_parallel_world_size()
                   and run.pipeline_model_parallel_size == ps.get_pipeline_model_parallel_world_size())
    saved_shapes = saved_tensor_shapes(path)
    has_optimizer = any(k.split(".")[0] == "optimizer" for k in saved_shapes)
    with_optim = optimizer is not None and load_optim and not finetune and has_optimizer
    optimizer_metadata = formats.optimizer_load_metadata(path, saved.common, optimizer, run) if with_optim else None
    if with_optim:
        formats.init_distributed_optimizer_state(optimizer)
    state = _state_dict(models, optimizer if with_optim else None, scheduler if not finetune else None,
                        iteration=0, consumed_samples=0, metadata=None,
                        rng=load_rng and not finetune and same_layout, is_loading=True,
                        optimizer_metadata=optimizer_metadata)
    keys = [_model_key(i, len(models)) for i in range(len(models))]

    def skipped(k: str) -> bool:
        return bool(skip_prefixes) and k.startswith(skip_prefixes) or skip_key is not None and skip_key(k)

    if skip_prefixes or skip_key is not None:
        for key in keys:
            state[key] = {k: v for k, v in state[key].items() if not skipped(k)}
    _check_model_keys(path, [state[key] for key in keys], saved_shapes)
    loaded = dist_checkpointing.load(state, str(path))
    for key, m in zip(keys, models):
        missing, unexpected = unwrap(m).load_state_dict(loaded[key], strict=not (skip_prefixes or skip_key))
        if [k for k in missing if not skipped(k) and not k.endswith("_extra_state")] or unexpected:
            raise CheckpointError(f"{path} does not fit this model: missing {missing[:3]}, unexpected "
                                  f"{unexpected[:3]}")
    if with_optim:
        compat.match_saved_param_groups_by_structure()
        with torch.no_grad(), compat.distributed_optimizer_load_fixes(optimizer):
            optimizer.load_state_dict(loaded["optimizer"])
    elif optimizer is not None:
        # Mixed precision keeps fp32 main weights inside the optimizer, copied from the model when it was built
        # (before this load); without optimizer state they must be refreshed from the loaded weights, or the first
        # step would write the stale initial weights back into the model.
        optimizer.reload_model_params()
    if scheduler is not None and not finetune and "opt_param_scheduler" in loaded:
        scheduler.load_state_dict(loaded["opt_param_scheduler"])
    if "rng_state" in loaded and load_rng and not finetune and same_layout:
        _set_rng_state(loaded["rng_state"])
    if finetune:
        return 0, 0
    return int(loaded["iteration"]), int(loaded["consumed_samples"])


# ==================================================================================================================
# Model-only checkpoints written by one process for a TP x PP run (the HF -> mcore converter, tinyllm_mcore/convert).
# Dist checkpoints hold global arrays, so one process with the whole (TP1/PP1) model writes what any layout loads; only
# the RNG entries are per (PP, TP) rank: one is written for every rank of the target layout, so a plain --load (no
# --finetune) at that layout finds what load_checkpoint asks for.
def write_model_checkpoint(path: str | os.PathLike, model, *, metadata: CheckpointMetadata,
                           tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1) -> Path:
    """Write ``model`` as a complete iteration-0 checkpoint into the iteration directory ``path`` (created; not
    published: see publish_checkpoint), recording ``metadata`` as the run that wrote it."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    compat.write_checkpoints_in_process()  # megatron's writer would fork per save (runtime/compat.py)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tp, pp = tensor_model_parallel_size, pipeline_model_parallel_size
    rng = _rng_state()
    state = {"iteration": 0, "consumed_samples": 0, METADATA_KEY: metadata.to_dict(),
             "model": unwrap(model).sharded_state_dict(),
             "rng_state": [ShardedObject("rng_state", rng, (pp, tp), (p, t), replica_id=0)
                           for p in range(pp) for t in range(tp)],
             **compat.checkpoint_stamp()}
    dist_checkpointing.save(state, str(path))
    _complete(path)
    return path


def _complete(path: Path) -> None:
    """After every rank wrote: the common state in a layout every supported megatron-core reads, then the manifest
    (last: a folder without it is an incomplete save)."""
    compat.write_common_state_file(path)
    safety.write_manifest(path)


def publish_checkpoint(save_dir: str | os.PathLike, iteration: int) -> None:
    """Point ``save_dir``'s tracker file at ``iteration`` (atomically; call once that checkpoint is complete)."""
    files.atomic_write_text(Path(save_dir) / TRACKER, str(iteration))


def saved_tensor_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Dist-checkpoint key -> global shape of every tensor in the checkpoint directory ``path`` (metadata only)."""
    from megatron.core import dist_checkpointing

    try:
        return {k: tuple(v.global_shape) for k, v in dist_checkpointing.load_tensors_metadata(str(path)).items()}
    except Exception as e:  # unreadable metadata: one line naming the checkpoint
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise CheckpointError(f"{path}: unreadable tensor metadata ({type(e).__name__}: {first})") from e
