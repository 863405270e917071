"""Writing a Hugging Face model directory: weights (safetensors), config.json, generation_config.json, tokenizer,
and last ``manifest.json``: each file's size and CRC-32, as a checkpoint's (checkpoint/safety.py), so a damaged
export is caught before use (--load-hf verifies it; transformers ignores the file).

The directory loads with plain ``AutoModelForCausalLM`` / ``AutoTokenizer`` (no trust_remote_code). The caller
writes into a staged directory (output.staged_output_dir), so the folder appears only when complete.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from torch import Tensor

from tinyllm_mcore.checkpoint.safety import write_manifest
from tinyllm_mcore.runtime.files import publish
from tinyllm_mcore.tokenizer.hf_folder import write_json, write_tokenizer_folder


def write_safetensors(tensors: Iterable[tuple[str, Tensor]], out_dir: str | os.PathLike,
                      max_shard_bytes: int = 2 * 1024**3) -> list[Path]:
    """Stream (name, tensor) pairs into ``model.safetensors``, or shards + ``model.safetensors.index.json`` when the
    total exceeds ``max_shard_bytes``; at most one shard of tensors is held at a time."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    shards: list[tuple[Path, list[str]]] = []
    total = 0
    pending: dict = {}
    pending_bytes = 0

    def flush():
        nonlocal pending, pending_bytes
        if pending:
            path = out / f"model-{len(shards) + 1:05d}.safetensors"
            save_file(pending, str(path), metadata={"format": "pt"})
            shards.append((path, list(pending)))
            pending, pending_bytes = {}, 0

    for name, t in tensors:
        size = t.numel() * t.element_size()
        if pending and pending_bytes + size > max_shard_bytes:
            flush()
        pending[name] = t.contiguous()
        pending_bytes += size
        total += size
    flush()
    if len(shards) == 1:
        final = out / "model.safetensors"
        publish(shards[0][0], final)
        return [final]
    n = len(shards)
    files, weight_map = [], {}
    for i, (path, names) in enumerate(shards, 1):
        final = out / f"model-{i:05d}-of-{n:05d}.safetensors"
        publish(path, final)
        files.append(final)
        weight_map.update({k: final.name for k in names})
    files.append(write_json(out / "model.safetensors.index.json",
                            {"metadata": {"total_size": total}, "weight_map": weight_map}))
    return files


def write_hf_folder(out_dir: Path, tensors: Iterable[tuple[str, Tensor]], config: dict, generation: dict, *,
                    tokenizer=None, prompt_prefix: bool = True, max_shard_bytes: int = 2 * 1024**3) -> list[Path]:
    """Weights (streamed), config.json, generation_config.json and, given a tokenizer, its files (through the one
    tokenizer-folder writer, tokenizer_files) into ``out_dir``, then the manifest of them; returns the files
    written."""
    write_safetensors(tensors, out_dir, max_shard_bytes=max_shard_bytes)
    write_json(out_dir / "config.json", config)
    write_json(out_dir / "generation_config.json", generation)
    if tokenizer is not None:
        write_tokenizer_folder(tokenizer, out_dir, model_max_length=config["max_position_embeddings"],
                               prompt_prefix=prompt_prefix)
    write_manifest(out_dir)
    return sorted(p for p in out_dir.iterdir() if p.is_file())
