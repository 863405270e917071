"""LoRA checkpoints: the adapters (and their optimizer state) only, plus a pointer to the frozen base checkpoint.

A LoRA run's metadata (checkpoint/metadata.py) records the adapter settings (`lora`) and its base (`lora_base`: the
base's iter_* directory and the sha256 of its manifest, which lists every file's size and crc32). Opening a LoRA
checkpoint — to resume, fine-tune further, or for inference and conversion — loads the base's weights, then the
adapters over them; a base that is gone or whose manifest is not the recorded one is refused with one line (the
adapters were trained on other weights).
"""
from __future__ import annotations

from pathlib import Path

from tinyllm_mcore.checkpoint import CheckpointError
from tinyllm_mcore.checkpoint import io as ckpt
from tinyllm_mcore.checkpoint import safety
from tinyllm_mcore.model.lora import LoraSettings, is_adapter_key


def is_lora_checkpoint(saved: ckpt.SavedCheckpoint) -> bool:
    return saved.metadata.lora_base is not None


def settings_of(saved: ckpt.SavedCheckpoint, seed: int = 0) -> LoraSettings:
    """The adapter settings a LoRA checkpoint was trained with (its model is rebuilt with them)."""
    record = saved.metadata.lora or {}
    try:
        return LoraSettings(rank=int(record["rank"]), alpha=float(record["alpha"]),
                            dropout=float(record["dropout"]), targets=tuple(record["targets"]), seed=seed)
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{saved.path}: unreadable LoRA settings in its metadata") from None


def base_record(base: ckpt.SavedCheckpoint) -> dict:
    """What a LoRA checkpoint records of the base it adapts; the base must have a manifest (its checksum)."""
    if is_lora_checkpoint(base):  # a LoRA run on a LoRA checkpoint resumes it: the same base
        return dict(base.metadata.lora_base)
    checksum = safety.manifest_checksum(base.path)
    if checksum is None:
        raise CheckpointError(f"{base.path} has no {safety.MANIFEST}: a LoRA run needs a base checkpoint with a "
                              "manifest (its checksum is how the adapters name their base)")
    return {"path": str(Path(base.path).resolve()), "manifest_checksum": checksum}


def open_base(saved: ckpt.SavedCheckpoint, *, verify: bool = True,
              require_manifest: bool = False) -> ckpt.SavedCheckpoint:
    """The base checkpoint of LoRA checkpoint `saved`, checked to be the one the adapters were trained on."""
    record = saved.metadata.lora_base
    path = Path(record.get("path", ""))
    if not path.is_dir():
        raise CheckpointError(f"{saved.path}: its LoRA base checkpoint {path} is gone (the adapters hold no base "
                              "weights): restore it there")
    found, expected = safety.manifest_checksum(path), record.get("manifest_checksum")
    if found != expected:
        raise CheckpointError(f"{saved.path}: its LoRA base checkpoint {path} changed since the adapters were "
                              f"trained (manifest sha256 {(found or 'none')[:16]}, recorded {str(expected)[:16]}): "
                              "restore that base or train the adapters again")
    return ckpt.read_checkpoint(path, verify=verify, require_manifest=require_manifest)


def load(saved: ckpt.SavedCheckpoint, base: ckpt.SavedCheckpoint, models, optimizer=None, scheduler=None, *,
         finetune: bool = False, load_optim: bool = True, load_rng: bool = True) -> tuple[int, int]:
    """The base's weights, then the LoRA checkpoint's adapters, optimizer, schedule and RNG over them (models built
    with the checkpoint's adapter settings); returns (iteration, consumed_samples) as load_checkpoint does."""
    ckpt.load_checkpoint(base, models, finetune=True, skip_key=is_adapter_key)
    return ckpt.load_checkpoint(saved, models, optimizer, scheduler, finetune=finetune, load_optim=load_optim,
                                load_rng=load_rng, skip_key=lambda key: not is_adapter_key(key))
