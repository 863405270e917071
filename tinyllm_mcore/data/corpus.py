"""Reading raw corpora as a stream: jsonl, jsonl.gz, txt, parquet files, folders or globs of them, and local HF
``datasets`` directories (``save_to_disk``). Nothing here loads a whole corpus into memory.

Records come out in chunks (``Chunk``) so that the expensive part — JSON parsing and tokenization — can run in worker
processes: jsonl chunks carry raw line bytes (parsed by the worker), columnar sources carry already-decoded dicts.
"""
from __future__ import annotations

import glob
import gzip
import io
import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
TEXT_SUFFIXES = (".txt", ".txt.gz")
PARQUET_SUFFIXES = (".parquet",)
HF_DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


@dataclass
class Chunk:
    """A run of consecutive records of one source. ``lines`` (raw jsonl bytes) or ``records`` (dicts) is set."""
    source: str
    first_line: int  # 1-based line / row number of the first item in its source, for error reports
    lines: list[bytes] | None = None
    records: list[dict] | None = None
    index: int = 0  # 0-based position of the first item among all items of all sources (partitioning)

    def __len__(self) -> int:
        return len(self.lines if self.lines is not None else self.records)


def _is_hf_dataset_dir(path: Path) -> bool:
    return path.is_dir() and any((path / m).is_file() for m in HF_DATASET_MARKERS)


def _is_corpus_file(path: Path, suffixes: Sequence[str]) -> bool:
    return path.is_file() and path.name.endswith(tuple(suffixes))


def expand_inputs(inputs: str | os.PathLike | Sequence[str | os.PathLike],
                  suffixes: Sequence[str] = JSONL_SUFFIXES + PARQUET_SUFFIXES) -> list[Path]:
    """Files, folders (searched recursively for ``suffixes``), globs and HF dataset dirs -> sorted list of sources.
    Raises FileNotFoundError with a one-line message naming what matched nothing."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    sources: list[Path] = []
    for item in inputs:
        item = str(item)
        matches = sorted(glob.glob(item, recursive=True)) if glob.has_magic(item) else [item]
        found = []
        for match in map(Path, matches):
            if _is_hf_dataset_dir(match):
                found.append(match)
            elif match.is_dir():
                found += sorted(p for p in match.rglob("*") if _is_corpus_file(p, suffixes))
            elif match.is_file():
                found.append(match)
        if not found:
            what = "no such file or directory" if not matches or not Path(matches[0]).exists() else \
                f"no {'/'.join(suffixes)} files"
            raise FileNotFoundError(f"input {item}: {what}")
        sources += found
    return sources


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def iter_chunks(sources: Sequence[Path], chunk_size: int, columns: Sequence[str] | None = None) -> Iterator[Chunk]:
    """Stream every source as chunks of at most ``chunk_size`` records. ``columns`` limits what columnar sources
    read (parquet / HF datasets). A source that cannot be read to its end (truncated .gz, I/O error) raises
    ValueError naming it."""
    index = 0
    for source in sources:
        if _is_hf_dataset_dir(source):
            chunks = _hf_dataset_chunks(source, chunk_size, columns)
        elif source.name.endswith(PARQUET_SUFFIXES):
            chunks = _parquet_chunks(source, chunk_size, columns)
        else:
            chunks = _jsonl_chunks(source, chunk_size)
        try:
            for chunk in chunks:
                chunk.index = index
                index += len(chunk)
                yield chunk
        except (EOFError, OSError, zlib.error) as e:
            raise ValueError(f"reading {source}: {e}") from None


def _jsonl_chunks(path: Path, chunk_size: int) -> Iterator[Chunk]:
    with _open_binary(path) as f:
        lines, first = [], 1
        for number, line in enumerate(f, start=1):
            lines.append(line)
            if len(lines) == chunk_size:
                yield Chunk(str(path), first, lines=lines)
                lines, first = [], number + 1
        if lines:
            yield Chunk(str(path), first, lines=lines)


def _parquet_chunks(path: Path, chunk_size: int, columns: Sequence[str] | None) -> Iterator[Chunk]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    present = [c for c in columns if c in parquet.schema_arrow.names] if columns else None
    first = 1
    for batch in parquet.iter_batches(batch_size=chunk_size, columns=present):
        records = batch.to_pylist()
        yield Chunk(str(path), first, records=records)
        first += len(records)


def _hf_dataset_chunks(path: Path, chunk_size: int, columns: Sequence[str] | None) -> Iterator[Chunk]:
    import datasets  # memory-maps the arrow files: rows are read batch by batch

    loaded = datasets.load_from_disk(str(path))
    splits = loaded.items() if isinstance(loaded, datasets.DatasetDict) else [(None, loaded)]
    for split, dataset in splits:
        name = f"{path}[{split}]" if split else str(path)
        if columns:
            dataset = dataset.select_columns([c for c in columns if c in dataset.column_names])
        for start in range(0, len(dataset), chunk_size):
            batch = dataset[start:start + chunk_size]  # column -> values
            keys = list(batch)
            records = [dict(zip(keys, row)) for row in zip(*(batch[k] for k in keys))] if keys else \
                [{} for _ in range(min(chunk_size, len(dataset) - start))]
            yield Chunk(name, start + 1, records=records)


def iter_texts(sources: Sequence[Path], json_key: str = "text", chunk_size: int = 1024) -> Iterator[str]:
    """Every non-empty text in ``sources``: jsonl/parquet/HF records' ``json_key``, or each line of a .txt file.
    Malformed records are skipped (tokenizer training only samples; preprocess_data counts them instead)."""
    for source in sources:
        if source.name.endswith(TEXT_SUFFIXES):
            with io.TextIOWrapper(_open_binary(source), encoding="utf-8", errors="replace") as f:
                for line in f:
                    if line.strip():
                        yield line.rstrip("\n")
            continue
        for chunk in iter_chunks([source], chunk_size, columns=[json_key]):
            records = chunk.records
            if records is None:
                records = []
                for line in chunk.lines:
                    try:
                        records.append(json.loads(line))
                    except ValueError:
                        continue
            for record in records:
                text = record.get(json_key) if isinstance(record, dict) else None
                if isinstance(text, str) and text.strip():
                    yield text
