"""The vocabulary contract of an indexed dataset: a small JSON sidecar beside ``{prefix}.bin/.idx``.

Preprocessing (and merging) writes ``{prefix}.json`` recording which tokenizer made the ids (its identity hash and
vocab size), the largest id written, the mode and the sizes of the pair, so a consumer can refuse data that does not
fit its model or tokenizer *before* training on it::

    {"format": "tinyllm-mcore-indexed-dataset", "version": 1,
     "tokenizer": {"identity": "sha256:…", "kind": "sentencepiece", "vocab_size": 20000, "path": "tok/"},
     "mode": "pretrain", "json_key": "text", "level": "document", "dtype": "uint16",
     "max_token_id": 19876, "tokens": 123456, "sequences": 1000, "documents": 1000,
     "bin_bytes": 246912, "idx_bytes": 20034, "created_by": "tools/preprocess_data.py"}

Why ``{prefix}.json`` and not a longer name: Megatron-LM's ``tools/merge_datasets.py`` takes every file of a folder as
half of a ``.bin/.idx`` pair named by ``os.path.splitext``; ``corpus_text_document.json`` maps to the existing
``corpus_text_document.bin``, so that tool still reads a folder of our datasets (``x.vocab.json`` would break it).
megatron-core's readers only open ``.bin``/``.idx``.

Data made by Megatron-LM's own tools has no sidecar: ``read_sidecar`` returns None and the caller falls back to a
per-batch id check.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from tinyllm_mcore.runtime.files import publish

FORMAT = "tinyllm-mcore-indexed-dataset"
VERSION = 1


def sidecar_path(prefix: str | os.PathLike) -> Path:
    return Path(str(prefix) + ".json")


def write_sidecar(prefix: str | os.PathLike, info: dict, *, final_prefix: str | os.PathLike | None = None) -> Path:
    """Write ``info`` (plus format/version and the pair's byte sizes) as the sidecar of ``prefix``; atomic.

    ``final_prefix``: the sizes are read from ``prefix``'s files but the sidecar is written for ``final_prefix``
    under a temporary name and returned, for the caller to rename after the pair (see ``preprocess``)."""
    record = {"format": FORMAT, "version": VERSION, **info,
              "bin_bytes": os.path.getsize(str(prefix) + ".bin"), "idx_bytes": os.path.getsize(str(prefix) + ".idx")}
    target = sidecar_path(final_prefix if final_prefix is not None else prefix)
    temp = target.with_name(target.name + f".tmp-{os.getpid()}")
    temp.write_text(json.dumps(record, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    if final_prefix is not None:
        return temp
    return publish(temp, target)


def read_sidecar(prefix: str | os.PathLike) -> dict | None:
    """The sidecar of ``prefix`` as a dict, or None when there is none (data made by Megatron-LM's tools).
    Raises ValueError naming the prefix when the file is unreadable or not ours."""
    path = sidecar_path(prefix)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{prefix}: unreadable vocabulary sidecar {path.name}: {e}") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ValueError(f"{prefix}: {path.name} is not a tinyllm-mcore dataset sidecar")
    if record.get("version", 0) > VERSION:
        raise ValueError(f"{prefix}: sidecar version {record.get('version')} is newer than this code ({VERSION})")
    return record


def check_prefix_vocab(prefix: str | os.PathLike, vocab_size: int, tokenizer_hash: str | None = None,
                       mode: str | None = None) -> dict | None:
    """Refuse ``prefix`` if its data does not fit a model/tokenizer: ids >= ``vocab_size``, a different tokenizer
    (``tokenizer_hash`` = ``Tokenizer.identity``; None skips that check), another ``mode`` (pretrain/sft/preference),
    or a ``.bin``/``.idx`` that is not the pair the sidecar describes (an interrupted or mixed copy).

    Returns the sidecar, or None when the prefix has none (then check ids per batch). Raises ValueError with one line
    naming the prefix."""
    record = read_sidecar(prefix)
    if record is None:
        return None
    for suffix, key in ((".bin", "bin_bytes"), (".idx", "idx_bytes")):
        path = str(prefix) + suffix
        if not os.path.isfile(path):
            raise ValueError(f"{prefix}: {suffix} file missing")
        if key in record and os.path.getsize(path) != record[key]:
            raise ValueError(f"{prefix}: {suffix} is {os.path.getsize(path)} bytes but its sidecar says "
                             f"{record[key]}: the pair is not the one preprocessing wrote (interrupted copy?)")
    tokenizer = record.get("tokenizer") or {}
    if mode is not None and record.get("mode") != mode:
        raise ValueError(f"{prefix}: a {record.get('mode')} dataset, expected {mode}")
    max_id = record.get("max_token_id", -1)
    if max_id is not None and max_id >= vocab_size:
        raise ValueError(f"{prefix}: token ids up to {max_id} do not fit vocab size {vocab_size} (made with a "
                         f"{tokenizer.get('vocab_size')}-token tokenizer {tokenizer.get('path', '')})")
    if tokenizer_hash is not None and tokenizer.get("identity") not in (None, tokenizer_hash):
        raise ValueError(f"{prefix}: made with another tokenizer ({tokenizer.get('path', '?')}, vocab "
                         f"{tokenizer.get('vocab_size')}, {str(tokenizer.get('identity'))[:19]}…) than this run's "
                         f"({tokenizer_hash[:19]}…)")
    return record


def tokenizer_record(tokenizer) -> dict:
    """The sidecar's ``tokenizer`` entry for a loaded ``Tokenizer``/``HFTokenizer``."""
    return {"identity": tokenizer.identity, "kind": tokenizer.kind, "vocab_size": int(tokenizer.vocab_size),
            "path": str(tokenizer.model_path)}
