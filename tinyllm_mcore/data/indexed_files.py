"""Writing, checking and merging megatron-core indexed datasets (``.bin`` + ``.idx``) with memory flat in dataset
size, without importing megatron-core (seconds of start-up: torch, TE probes) for a file format of a few fields.

The ``.idx`` layout megatron-core's ``IndexedDatasetBuilder`` writes and ``IndexedDataset`` reads (little-endian)::

    b"MMIDIDX\x00\x00"  u64 version (1)  u8 dtype code  u64 sequence count  u64 document count (+1)
    int32 sequence lengths[sequences]  int64 byte offsets of the sequences[sequences]
    int64 document indices[documents + 1]   (sequence index where each document ends, after a leading 0)

megatron-core's builder keeps every sequence length in a Python list and ``add_index`` (what Megatron-LM's merge tool
uses) appends whole indices to it; for a billion-token corpus that is gigabytes. Here:

* ``ChunkedIndexedDatasetBuilder`` — compact arrays (4 + 8 bytes per sequence/document, as the ``.idx`` itself) and
  a chunk-at-a-time append;
* ``IndexSummary`` — an index checked against its ``.bin`` and memory-mapped;
* ``merge_indexed`` — concatenates datasets by streaming: ``.bin`` files are copied, the ``.idx`` sections are written
  block by block from the inputs' memory-mapped indices.

The files are byte-identical to megatron-core's ``IndexedDatasetBuilder`` (``add_document`` / ``add_index`` +
``finalize``), and megatron-core reads them back (tests/cli/test_preprocess_data.py, tests/cli/test_merge_datasets.py).
"""
from __future__ import annotations

import json
import os
import shutil
import struct
from array import array
from pathlib import Path

import numpy as np

from tinyllm_mcore.runtime.files import publish

BLOCK = 1 << 20  # index entries per streamed block

_IDX_MAGIC = b"MMIDIDX\x00\x00"
_IDX_VERSION = 1
_IDX_HEADER_BYTES = 34  # magic (9) + version (8) + dtype code (1) + sequence count (8) + document count (8)
# megatron-core's DType codes (the byte after the version).
_DTYPE_CODES = {"uint8": 1, "int8": 2, "int16": 3, "int32": 4, "int64": 5, "float64": 6, "float32": 7, "uint16": 8}
_DTYPE_OF_CODE = {code: getattr(np, name) for name, code in _DTYPE_CODES.items()}


def token_dtype(vocab_size: int | None):
    """The id type of a dataset for this vocabulary: megatron-core's ``DType.optimal_dtype`` rule (uint16 below
    65500, else int32)."""
    return np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32


def _dtype_code(dtype) -> int:
    name = np.dtype(dtype).name
    if name not in _DTYPE_CODES:
        raise ValueError(f"indexed datasets store {', '.join(_DTYPE_CODES)} ids, not {name}")
    return _DTYPE_CODES[name]


def _write_index_header(f, dtype, sequences: int, documents: int) -> None:
    """``documents``: the document index's length (documents + 1)."""
    f.write(_IDX_MAGIC + struct.pack("<QB", _IDX_VERSION, _dtype_code(dtype)) + struct.pack("<QQ", sequences,
                                                                                              documents))


def make_builder(bin_path: str, dtype) -> "ChunkedIndexedDatasetBuilder":
    """A ChunkedIndexedDatasetBuilder writing `bin_path`."""
    return ChunkedIndexedDatasetBuilder(bin_path, dtype)


class ChunkedIndexedDatasetBuilder:
    """Writes one ``.bin`` as chunks arrive (``add_chunk``) and its ``.idx`` at ``finalize``."""

    def __init__(self, bin_path: str, dtype):
        self.bin_path, self.dtype = bin_path, dtype
        self.itemsize = np.dtype(dtype).itemsize
        _dtype_code(dtype)  # an unsupported dtype fails before anything is written
        self.data_file = open(bin_path, "wb")
        self.sequence_lengths = array("i")  # 4 bytes per sequence instead of a Python int each
        self.document_indices = array("q", [0])
        self.tokens = 0
        self.max_token_id = -1

    def add_chunk(self, tokens: np.ndarray, sequence_lengths: np.ndarray, sequences_per_document: np.ndarray):
        if tokens.size:
            self.max_token_id = max(self.max_token_id, int(tokens.max()))
        self.tokens += int(tokens.size)
        self.data_file.write(tokens.astype(self.dtype, copy=False).tobytes(order="C"))
        self.sequence_lengths.frombytes(sequence_lengths.astype(np.int32, copy=False).tobytes())
        ends = self.document_indices[-1] + np.cumsum(sequences_per_document, dtype=np.int64)
        self.document_indices.frombytes(ends.tobytes())

    @property
    def documents(self) -> int:
        return len(self.document_indices) - 1

    def finalize(self, idx_path: str) -> None:
        self.data_file.close()
        lengths = np.frombuffer(self.sequence_lengths, dtype=np.int32)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(lengths[:-1].astype(np.int64) * self.itemsize, out=pointers[1:])
        with open(idx_path, "wb") as f:
            _write_index_header(f, self.dtype, len(lengths), len(self.document_indices))
            f.write(lengths.tobytes())
            f.write(pointers.tobytes())
            f.write(np.frombuffer(self.document_indices, dtype=np.int64).tobytes())

    def discard(self) -> None:
        self.data_file.close()


def check_output_prefix(prefix: str | os.PathLike, flag: str = "--output-prefix") -> None:
    """A dataset prefix must name files (``some_dir/name``): ``some_dir/`` or an existing directory would write
    ``some_dir/_text_document.bin`` (or ``some_dir/.bin``) unnoticed. Raises ValueError naming ``flag``."""
    text = os.fspath(prefix)
    separators = tuple(s for s in (os.sep, os.altsep, "/") if s)
    if not text or text.endswith(separators) or os.path.basename(text) in ("", ".", "..") or os.path.isdir(text):
        where = text.rstrip("".join(separators)) or "."
        raise ValueError(f"{flag} {text!r} is a directory: it must be a file prefix like "
                         f"{os.path.join(where, 'name')}")


class IndexSummary:
    """An ``.idx`` checked against its ``.bin`` and opened memory-mapped (``sequence_lengths``, ``document_indices``):
    a truncated or mismatched file is one ValueError naming it and the sizes, before anything reads past its end."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        idx_path, bin_path = prefix + ".idx", prefix + ".bin"
        for path in (idx_path, bin_path):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{prefix}: {os.path.basename(path)} not found")
        with open(idx_path, "rb") as f:
            header = f.read(_IDX_HEADER_BYTES)
        if not header.startswith(_IDX_MAGIC):
            raise ValueError(f"{idx_path}: not a megatron indexed dataset index (no MMIDIDX header)")
        actual_idx = os.path.getsize(idx_path)
        if len(header) < _IDX_HEADER_BYTES:
            raise ValueError(f"{idx_path} is {actual_idx} bytes, shorter than the {_IDX_HEADER_BYTES}-byte header "
                             f"of an index: truncated")
        sequence_count, document_count = struct.unpack("<QQ", header[18:34])
        expected_idx = _IDX_HEADER_BYTES + sequence_count * 12 + document_count * 8
        if actual_idx < expected_idx:
            raise ValueError(f"{idx_path} is {actual_idx} bytes, shorter than the {expected_idx} bytes its header "
                             f"describes ({sequence_count} sequences, {document_count - 1} documents): truncated")
        if actual_idx not in (expected_idx, expected_idx + sequence_count):  # + int8 modes when multimodal
            raise ValueError(f"{idx_path} is {actual_idx} bytes, its header promises {expected_idx}")
        if actual_idx != expected_idx:
            raise ValueError(f"{prefix}: multimodal datasets (sequence modes) are not supported")
        version, code = struct.unpack_from("<QB", header, len(_IDX_MAGIC))
        if version != _IDX_VERSION or code not in _DTYPE_OF_CODE:
            raise ValueError(f"{idx_path}: not a megatron indexed dataset index (version {version}, dtype code "
                             f"{code}; expected version {_IDX_VERSION} and one of {sorted(_DTYPE_OF_CODE)})")
        index = np.memmap(idx_path, dtype=np.uint8, mode="r")
        offset = _IDX_HEADER_BYTES
        self.sequence_lengths = np.frombuffer(index, dtype=np.int32, count=sequence_count, offset=offset)
        offset += sequence_count * 12  # the lengths, then the byte offsets (recomputed when merging)
        self.document_indices = np.frombuffer(index, dtype=np.int64, count=document_count, offset=offset)
        self.dtype = _DTYPE_OF_CODE[code]
        self.itemsize = np.dtype(self.dtype).itemsize
        self.tokens = int(self.sequence_lengths.sum(dtype=np.int64))
        expected_bin, actual_bin = self.tokens * self.itemsize, os.path.getsize(bin_path)
        if actual_bin != expected_bin:
            relation = "shorter" if actual_bin < expected_bin else "longer"
            raise ValueError(f"{bin_path} is {actual_bin} bytes, {relation} than the {expected_bin} bytes its .idx "
                             f"describes ({self.tokens} tokens of {self.itemsize} bytes): "
                             f"{'truncated, or ' if relation == 'shorter' else ''}the pair does not match")
        self.sequences = sequence_count
        self.documents = document_count - 1


def check_indexed_pair(prefix: str | os.PathLike) -> "IndexSummary":
    """Check ``prefix.bin``/``prefix.idx`` before reading them (megatron's reader fails past the end of a truncated
    ``.bin`` with numpy's "offset must be non-negative and no greater than buffer length"): FileNotFoundError /
    ValueError with one line naming the file and its expected and actual sizes. Cheap: reads the header and the
    memory-mapped sequence lengths, not the tokens."""
    return IndexSummary(os.fspath(prefix))


def merge_indexed(inputs: list[IndexSummary], bin_path: str, idx_path: str, block: int = BLOCK) -> None:
    """Concatenate ``inputs`` (same dtype) into ``bin_path``/``idx_path``, streaming ``block`` index entries at a
    time."""
    dtype = inputs[0].dtype
    with open(bin_path, "wb") as out:
        for item in inputs:
            with open(item.prefix + ".bin", "rb") as f:
                shutil.copyfileobj(f, out)
    total_sequences = sum(i.sequences for i in inputs)
    total_documents = 1 + sum(i.documents for i in inputs)
    with open(idx_path, "wb") as f:
        _write_index_header(f, dtype, total_sequences, total_documents)
        for item in inputs:
            lengths = item.sequence_lengths
            for start in range(0, len(lengths), block):
                f.write(np.asarray(lengths[start:start + block], dtype=np.int32).tobytes())
        byte_offset = 0
        itemsize = np.dtype(dtype).itemsize
        for item in inputs:
            lengths = item.sequence_lengths
            for start in range(0, len(lengths), block):
                sizes = lengths[start:start + block].astype(np.int64) * itemsize
                ends = np.cumsum(sizes) + byte_offset
                f.write((ends - sizes).tobytes())
                if len(sizes):
                    byte_offset = int(ends[-1])
        f.write(np.zeros(1, dtype=np.int64).tobytes())
        sequence_offset = 0
        for item in inputs:
            ends = item.document_indices[1:]
            for start in range(0, len(ends), block):
                f.write((ends[start:start + block].astype(np.int64) + sequence_offset).tobytes())
            sequence_offset += item.sequences


def dataset_prefixes_in(folder: str) -> list[str]:
    """The ``.bin``/``.idx`` pairs of a folder, as Megatron-LM's merge tool takes them: sorted by prefix name.
    Sidecars and other files are ignored; half a pair is an error."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--input {folder}: not a directory")
    names = {}
    for name in os.listdir(folder):
        stem, ext = os.path.splitext(name)
        if ext in (".bin", ".idx") and os.path.isfile(os.path.join(folder, name)):
            names.setdefault(stem, set()).add(ext)
    for stem, exts in sorted(names.items()):
        if exts != {".bin", ".idx"}:
            missing = ({".bin", ".idx"} - exts).pop()
            raise FileNotFoundError(f"{os.path.join(folder, stem)}: {missing} file not found (half a pair)")
    if not names:
        raise FileNotFoundError(f"--input {folder}: no .bin/.idx pairs")
    return [os.path.join(folder, stem) for stem in sorted(names)]


def merge_datasets(prefixes: list[str], output_prefix: str, created_by: str = "tools/merge_datasets.py",
                   log=print) -> dict:
    """Concatenate indexed datasets, in the given order, into ``output_prefix`` (.bin/.idx, + the sidecar when every
    input has one); streaming and atomic. Refuses inputs of different dtypes, tokenizers or modes (ValueError, one
    line naming two of them). Returns the output's totals."""
    from tinyllm_mcore.data.vocab_contract import read_sidecar, write_sidecar

    if not prefixes:
        raise ValueError("nothing to merge")
    check_output_prefix(output_prefix)
    inputs = [IndexSummary(p) for p in prefixes]
    sidecars = [read_sidecar(p) for p in prefixes]
    for item in inputs[1:]:
        if item.dtype != inputs[0].dtype:
            raise ValueError(f"{item.prefix} stores {item.dtype.__name__} ids but {inputs[0].prefix} "
                             f"{inputs[0].dtype.__name__}: different vocabularies cannot be merged")
    known = [(p, s) for p, s in zip(prefixes, sidecars) if s is not None]
    for field, what in ((lambda s: (s.get("tokenizer") or {}).get("identity"), "tokenizers"),
                        (lambda s: s.get("mode"), "modes")):
        for prefix, sidecar in known[1:]:
            if field(sidecar) != field(known[0][1]):
                raise ValueError(f"{prefix} and {known[0][0]} were made with different {what} "
                                 f"({field(sidecar)} vs {field(known[0][1])}): refusing to merge")
    Path(output_prefix).parent.mkdir(parents=True, exist_ok=True)
    temp = f"{output_prefix}.tmp-{os.getpid()}"
    try:
        merge_indexed(inputs, temp + ".bin", temp + ".idx")
        totals = {"tokens": sum(i.tokens for i in inputs), "sequences": sum(i.sequences for i in inputs),
                  "documents": sum(i.documents for i in inputs)}
        sidecar_temp = None
        if len(known) == len(prefixes):
            first = known[0][1]

            def same(key):
                values = {json.dumps(s.get(key), sort_keys=True) for _, s in known}
                return first.get(key) if len(values) == 1 else None

            info = {"tokenizer": first.get("tokenizer"), "mode": first.get("mode"), "json_key": same("json_key"),
                    "level": same("level"), "dtype": first.get("dtype"),
                    "max_token_id": max(s.get("max_token_id", -1) for _, s in known), **totals,
                    "append_eod": same("append_eod"), "created_by": created_by}
            sidecar_temp = write_sidecar(temp, info, final_prefix=output_prefix)
        elif known:
            log(f"note: {len(prefixes) - len(known)} of {len(prefixes)} inputs have no vocabulary sidecar (made by "
                f"Megatron-LM's tools?): tokenizers not verified, no sidecar written")
        publish(temp + ".bin", output_prefix + ".bin")
        publish(temp + ".idx", output_prefix + ".idx")
        if sidecar_temp is not None:
            publish(sidecar_temp, output_prefix + ".json")
        elif os.path.exists(output_prefix + ".json"):
            os.unlink(output_prefix + ".json")  # an older sidecar would describe other data
    except BaseException:
        for suffix in (".bin", ".idx"):
            if os.path.exists(temp + suffix):
                os.unlink(temp + suffix)
        stale = output_prefix + ".json" + f".tmp-{os.getpid()}"
        if os.path.exists(stale):
            os.unlink(stale)
        raise
    return totals
