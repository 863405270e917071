"""Hugging Face model directory -> megatron-core dist checkpoint loadable at a chosen TP/PP.

Accepts our own exports (Llama with zero o_proj bias; Qwen2-MoE for MoE models), Qwen2, Qwen2-MoE (every layer MoE),
Llama (with or without attention bias) and the seed's released ``tinyllm`` layout (Qwen2 weight names; fp16
``pytorch_model.bin`` or safetensors) — remote code is never run: only config.json and the tensors are read. Tensors
stream from the (memory-mapped) HF files into the whole model, which checkpoint.io writes as
``SAVE/iter_0000000`` + ``latest_checkpointed_iteration.txt``; load it with ``--load SAVE --finetune``
(pretrain/SFT/DPO) or ``inference.open.open_checkpoint``. Weights are stored in fp32 (the trainer's master dtype).
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from tinyllm_mcore.convert.hf_config import HFFacts, preset_from_hf_config, read_hf_config
from tinyllm_mcore.convert.hf_weights import HFWeights
from tinyllm_mcore.convert.mapping import HFOnly, MappingError, check_finite, hf_to_megatron, mapping_table
from tinyllm_mcore.convert.mcore_model import single_process_megatron, whole_model
from tinyllm_mcore.convert.output import staged_output_dir
from tinyllm_mcore.model.presets import ModelPreset, padded_vocab_size

# Buffers some HF checkpoints carry that are recomputed from the config.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _check_tensor_names(table, names: set[str], facts, hf_dir: Path) -> None:
    """Every HF tensor belongs to the table and every required one is there: one line naming a few if not."""
    expected = {n for e in table for n in e.hf}
    unknown = [n for n in names if n not in expected and not n.endswith(_IGNORED_SUFFIXES)
               and not (facts.tied and n == "lm_head.weight")]
    if unknown:
        raise MappingError(f"{len(unknown)} tensors do not belong to a {facts.model_type} model of this config, "
                           f"e.g. {sorted(unknown)[:3]}")
    optional = set()
    for e in table:  # HF-only tensors; q/k/v biases of a Llama without attention bias (zeros)
        if isinstance(e.transform, HFOnly) or (e.absent_means_zero and not facts.attention_bias):
            optional.update(e.hf)
    missing = [n for e in table for n in e.hf if n not in names and n not in optional]
    if missing:
        raise MappingError(f"{len(missing)} tensors are missing from {hf_dir}, e.g. {missing[:3]}")


@dataclass(frozen=True)
class HFSource:
    """An HF model directory opened for import: its config read as JSON, the preset it describes, its tensor names
    checked against the mapping table. Nothing in the directory is executed (hf_weights.py)."""
    path: Path
    preset: ModelPreset
    facts: HFFacts
    weights: HFWeights

    @classmethod
    def open(cls, hf_dir: str | os.PathLike, *, safetensors_only: bool = False) -> "HFSource":
        """Raises MappingError / ValueError / FileNotFoundError with one line naming what does not fit."""
        path = Path(hf_dir)
        preset, facts = preset_from_hf_config(read_hf_config(path))
        weights = HFWeights(path, safetensors_only=safetensors_only)
        _check_tensor_names(_table(preset, preset.vocab_size, facts), set(weights.names()), facts, path)
        return cls(path=path, preset=preset, facts=facts, weights=weights)

    def megatron_tensors(self, padded_vocab: int, *, names: set[str] | None = None,
                         allow_non_finite: bool = False) -> Iterator[tuple[str, torch.Tensor, list[str]]]:
        """(whole-model local-spec name, global tensor with ``padded_vocab`` rows, HF names it is made of), one tensor
        at a time, through the mapping table; only those in ``names`` when given (every HF-only tensor is still
        checked). NaN/inf tensors are refused unless ``allow_non_finite``."""
        def read_hf(name: str):
            t = self.weights.get(name)
            return t if t is None or allow_non_finite else check_finite(name, t, str(self.path))

        table = _table(self.preset, padded_vocab, self.facts)
        if names is not None:
            table = [e for e in table if e.megatron is None or e.megatron in names]
        return hf_to_megatron(table, read_hf)


def _table(preset: ModelPreset, padded_vocab: int, facts: HFFacts):
    return mapping_table(preset, padded_vocab, tied=facts.tied, o_proj_bias=True)


def convert_hf_to_mcore(load: str | os.PathLike, save: str | os.PathLike, tensor_model_parallel_size: int = 1,
                        pipeline_model_parallel_size: int = 1, make_vocab_size_divisible_by: int = 128,
                        log=print, allow_non_finite: bool = False) -> Path:
    """Convert; return the written iteration directory. Raises ValueError/FileNotFoundError with one-line messages.

    Tensors with NaN/inf values are refused unless ``allow_non_finite``. The output appears only when complete: a new
    ``save`` root (or, inside an existing root, the ``iter_0000000`` directory) is written under a temporary name
    and renamed at the end, so a failure leaves nothing behind."""
    from tinyllm_mcore.runtime.distributed import check_parallel_layout
    from tinyllm_mcore.checkpoint.io import iteration_dir, publish_checkpoint, write_model_checkpoint
    from tinyllm_mcore.checkpoint.metadata import CheckpointMetadata

    t0 = time.perf_counter()
    hf_dir = Path(load)
    preset, facts = preset_from_hf_config(read_hf_config(hf_dir))
    tp, pp = tensor_model_parallel_size, pipeline_model_parallel_size
    check_parallel_layout(tp * pp, tp, pp, preset.num_attention_heads, preset.num_layers,
                          num_query_groups=preset.num_query_groups)
    source = HFSource.open(hf_dir)
    padded = padded_vocab_size(preset.vocab_size, tp, make_vocab_size_divisible_by)

    save_root = Path(save)
    if save_root.exists() and not save_root.is_dir():
        raise ValueError(f"--save {save_root} exists and is not a directory")
    # Stage the whole root when it is new; inside an existing root (other checkpoints may live there) only the
    # iteration directory, whose tracker moves last.
    new_root = not save_root.exists()
    path = iteration_dir(save_root, 0)
    log(f"[hf_to_mcore] {hf_dir} ({facts.model_type}, {preset.name}: h={preset.hidden_size} L={preset.num_layers} "
        f"heads={preset.num_attention_heads}/{preset.kv_heads} ffn={preset.ffn_hidden_size} vocab={preset.vocab_size}"
        f" -> {padded} padded for TP{tp}) -> {path} for TP{tp} PP{pp}")

    with single_process_megatron(), staged_output_dir(save_root if new_root else path) as staged:
        model = whole_model(preset, padded)
        params = model.state_dict(keep_vars=True)
        with torch.no_grad():
            for name, tensor, sources in source.megatron_tensors(padded, allow_non_finite=allow_non_finite):
                params[name].copy_(tensor)
                log(f"  {' + '.join(sources)} -> {name} {tuple(tensor.shape)}")
        metadata = CheckpointMetadata(
            preset=preset, stage="hf_to_mcore", make_vocab_size_divisible_by=make_vocab_size_divisible_by,
            tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
            flags={"load": str(hf_dir.resolve()), "hf_model_type": facts.model_type})
        with _quiet_writer_errors():  # a failed write is reported once, as one line, by staged_output_dir / run_cli
            write_model_checkpoint(iteration_dir(staged, 0) if new_root else staged, model, metadata=metadata,
                                   tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
        if new_root:
            publish_checkpoint(staged, 0)
    if not new_root:
        publish_checkpoint(save_root, 0)
    log(f"[hf_to_mcore] wrote {path} in {time.perf_counter() - t0:.1f} s")
    return path


@contextlib.contextmanager
def _quiet_writer_errors():
    """megatron's checkpoint writer logs a worker's failure before raising it; the raise is what we report."""
    writer_log = logging.getLogger("megatron.core.dist_checkpointing.strategies.filesystem_async")
    level = writer_log.level
    writer_log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        writer_log.setLevel(level)
