"""Reading a Hugging Face model directory's tensors safely: nothing in the directory is executed.

safetensors files are memory-mapped and read one tensor at a time; ``pytorch_model.bin`` goes through
``torch.load(weights_only=True)`` (memory-mapped for the zip format). Sharded checkpoints are found through their
``*.index.json``. A file that cannot be read raises ValueError naming it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path


class HFWeights:
    """Lazy, safe access to an HF model directory's tensors: safetensors (memory-mapped, one tensor at a time) or
    ``pytorch_model.bin`` via ``torch.load(weights_only=True)`` (memory-mapped for the zip format; the legacy
    pre-1.6 format cannot be mapped and is read whole). Nothing in the directory is executed. A file that cannot be
    read raises ValueError naming it. ``safetensors_only``: a directory with only ``pytorch_model.bin`` weights (a
    pickle, even if read weights-only) is refused."""

    def __init__(self, model_dir: str | os.PathLike, *, safetensors_only: bool = False):
        self.dir = Path(model_dir)
        if not self.dir.is_dir():
            raise FileNotFoundError(f"HF model directory does not exist: {self.dir}")
        self._where: dict[str, object] = {}
        formats = (("model.safetensors.index.json", "model.safetensors"),
                   ("pytorch_model.bin.index.json", "pytorch_model.bin"))
        if safetensors_only:
            if not any((self.dir / name).is_file() for name in formats[0]):
                raise FileNotFoundError(f"no model.safetensors (or model.safetensors.index.json) in {self.dir}: only "
                                        "safetensors weights are read here (convert pytorch_model.bin with "
                                        "tinyllm-hf-to-mcore, which reads it weights-only)")
            formats = formats[:1]
        for index_name, single in formats:
            index = self.dir / index_name
            if index.is_file():
                files = sorted(set(_read_weight_map(index).values()))
                break
            if (self.dir / single).is_file():
                files = [single]
                break
        else:
            raise FileNotFoundError(f"no model.safetensors, pytorch_model.bin (or their .index.json) in {self.dir}")
        self.files = files
        for name in files:
            path = self.dir / name
            if safetensors_only and not name.endswith(".safetensors"):
                raise ValueError(f"{self.dir / formats[0][0]} lists {name}: only safetensors weights are read here")
            if not path.is_file():
                raise FileNotFoundError(f"weight file listed in the index is missing: {path}")
            if name.endswith(".safetensors"):
                handle = _open_safetensors(path)
                for key in handle.keys():
                    self._where[key] = handle
            else:
                state = _load_torch_weights(path)
                for key in state:
                    self._where[key] = state

    def names(self) -> list[str]:
        return list(self._where)

    def get(self, name: str):
        source = self._where.get(name)
        if source is None:
            return None
        return source[name] if isinstance(source, dict) else source.get_tensor(name)


def _read_weight_map(index: Path) -> dict:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{index}: not a weight index ({type(e).__name__}: {e})") from None
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index}: 'weight_map' is not an object")
    return weight_map


def _open_safetensors(path: Path):
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt")
    except Exception as e:  # safetensors' own error type: truncated, garbage or unreadable files
        raise ValueError(f"{path}: not a readable safetensors file (truncated or corrupt? {e})") from None


def _load_torch_weights(path: Path) -> dict:
    """A ``pytorch_model.bin`` state dict, read with the weights-only unpickler (no code can run)."""
    import pickle
    import re
    import zipfile

    import torch

    try:
        # mmap needs the zip format (torch >= 1.6); the seed's and older files may be the legacy format.
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        found = re.search(r"(?:unsupported|Unsupported global:) GLOBAL (\S+)", str(e))
        what = f"it references {found.group(1)}" if found else "it holds objects other than tensors"
        raise ValueError(f"{path}: refused by the weights-only loader ({what}); only tensors are read from "
                         "HF weight files") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable PyTorch weight file (truncated or corrupt? "
                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'unexpected end of file'})") \
            from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a state dict of tensors")
    return state
