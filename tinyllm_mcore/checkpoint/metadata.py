"""What a checkpoint records of the run that wrote it: an explicit schema with a version, not the run's flag names.

Saved in the common state under `run_metadata` as plain values (`CheckpointMetadata.to_dict`, read back with
torch.load's weights_only), with `schema_version`. Code reads back only the typed fields; `flags` (the writing run's
flags, or a converter's inputs) are kept for whoever inspects a checkpoint and are never read by code, so renaming
a flag never changes what a checkpoint means.

Versions:
- 0 (no version; written up to commit cfca0f0): the flat `args` dict, the flags plus the preset, head, tokenizer
  identity and batch arithmetic under their flag names. Read by `from_common` into the same fields
  (tests/fixtures/checkpoint_v0 is one).
- 1: this schema. Later additions have defaults (older version-1 records read as before): `lora` and `lora_base`
  (a LoRA run's adapter settings and its base checkpoint: path + manifest checksum; model/lora.py).
A version newer than `SCHEMA_VERSION` is refused with one line: its fields may mean what this code does not know.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from tinyllm_mcore.checkpoint import CheckpointError
from tinyllm_mcore.model.presets import ModelPreset

SCHEMA_VERSION = 1
KEY = "run_metadata"  # the common-state key of version >= 1
LEGACY_KEY = "args"  # version 0


@dataclass(frozen=True)
class CheckpointMetadata:
    preset: ModelPreset | None  # the architecture; None: a checkpoint that recorded none (not tinyllm-mcore's)
    model_head: str = "lm"  # "lm" or "reward": which model the weights belong to
    stage: str | None = None  # "pretrain", "sft", "reward", "dpo", "hf_to_mcore" (None: version 0)
    # the tokenizer it was trained with: the path as given, its type, its identity hash (Tokenizer.identity)
    tokenizer_model: str | None = None
    tokenizer_type: str = "auto"
    tokenizer_identity: str | None = None
    make_vocab_size_divisible_by: int = 128  # the embedding's padding (rows = vocab padded for TP x this)
    # the layout it was saved at: RNG states are per (TP, PP) rank, dp_reshardable optimizer state loads only there
    tensor_model_parallel_size: int | None = None
    pipeline_model_parallel_size: int | None = None
    use_distributed_optimizer: bool = False  # its optimizer state is the distributed optimizer's
    # the batch arithmetic of the run (for whoever reads a checkpoint's run)
    seq_length: int | None = None
    micro_batch_size: int | None = None
    global_batch_size: int | None = None
    num_microbatches: int | None = None
    data_parallel_size: int | None = None
    flags: dict = field(default_factory=dict)  # the writing run's flags, plain values: information only
    # a LoRA checkpoint holds only adapters: their settings (LoraSettings.describe) and the frozen base they adapt,
    # {"path": its iter_* directory, "manifest_checksum": sha256 of its manifest.json}; None for full checkpoints
    lora: dict | None = None
    lora_base: dict | None = None

    def to_dict(self) -> dict:
        """Plain values for the common state (saved under KEY)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        values["preset"] = dataclasses.asdict(self.preset) if self.preset is not None else None
        return {"schema_version": SCHEMA_VERSION, **values}

    @classmethod
    def from_common(cls, common: dict, where: str | Path) -> "CheckpointMetadata":
        """The metadata in a checkpoint's common state (any version up to SCHEMA_VERSION); `where` names the
        checkpoint in the one-line CheckpointError of a newer or damaged record."""
        if KEY in common:
            return cls._from_record(common[KEY], where)
        if LEGACY_KEY in common:
            return cls._from_version_0(common[LEGACY_KEY], where)
        return cls(preset=None)

    @classmethod
    def _from_record(cls, record, where) -> "CheckpointMetadata":
        version = record.get("schema_version") if isinstance(record, dict) else None
        if not isinstance(version, int) or isinstance(version, bool):
            raise CheckpointError(f"{where}: checkpoint metadata without a schema version (damaged common state?)")
        if version > SCHEMA_VERSION:
            raise CheckpointError(f"{where}: checkpoint metadata schema version {version} is newer than this "
                                  f"tinyllm-mcore reads ({SCHEMA_VERSION}): use the version that wrote it, or newer")
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in record.items() if k in names}
        return cls(**{**values, "preset": _preset(values.get("preset"), where)})

    @classmethod
    def _from_version_0(cls, args: dict, where) -> "CheckpointMetadata":
        """The flat `args` dict: flags and derived values side by side under their flag names."""
        derived = ("preset", "model_head", "tokenizer_identity", "global_batch_size", "num_microbatches",
                   "data_parallel_size")
        return cls(
            preset=_preset(args.get("preset"), where),
            # before the head was recorded, reward models were the checkpoints of runs with --init-from
            model_head=args.get("model_head") or ("reward" if "init_from" in args else "lm"),
            tokenizer_model=args.get("tokenizer_model"),
            tokenizer_type=args.get("tokenizer_type") or "auto",
            tokenizer_identity=args.get("tokenizer_identity"),
            make_vocab_size_divisible_by=args.get("make_vocab_size_divisible_by", 128),
            tensor_model_parallel_size=args.get("tensor_model_parallel_size"),
            pipeline_model_parallel_size=args.get("pipeline_model_parallel_size"),
            use_distributed_optimizer=bool(args.get("use_distributed_optimizer", False)),
            seq_length=args.get("seq_length"),
            micro_batch_size=args.get("micro_batch_size"),
            global_batch_size=args.get("global_batch_size"),
            num_microbatches=args.get("num_microbatches"),
            data_parallel_size=args.get("data_parallel_size"),
            flags={k: v for k, v in args.items() if k not in derived})


def _preset(values: dict | None, where) -> ModelPreset | None:
    if values is None:
        return None
    try:
        return ModelPreset(**values)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: unreadable model preset in its metadata ({e})") from None


def plain_flags(flags) -> dict:
    """The plain values (what torch.load's weights_only reads back) of a namespace or dict of flags."""
    items = flags.items() if isinstance(flags, dict) else vars(flags).items()
    return {k: v for k, v in items if isinstance(v, (str, int, float, bool, list, tuple, dict, type(None)))}
