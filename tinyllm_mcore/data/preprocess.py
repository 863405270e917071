"""Raw corpora -> megatron-core indexed datasets (``.bin`` + ``.idx``), streamed, in parallel, crash-safe.

Three modes, one pipeline (read chunks -> encode in workers -> append to ``IndexedDatasetBuilder``):

``pretrain``    one output per json key, ``{prefix}_{key}_document``; one document = one record's text (+ eod with
                ``append_eod``), one sequence per document — exactly what Megatron-LM's tools/preprocess_data.py writes.
``sft``         ``{prefix}_sft_document``; one document = one conversation, stored as its chat segments
                ``[prompt, response, prompt, response, ...]`` (see ``Tokenizer.encode_conversation``), one *sequence*
                per segment. Even sequences (0, 2, ...) are prompts (no loss), odd ones are assistant answers + eos
                (trained). Records: ``{"question", "answer", "system"?}`` or ``{"messages": [...], "system"?}``.
``preference``  ``{prefix}_preference_document``; one document = one pair, three sequences
                ``[prompt, chosen + eos, rejected + eos]``; the prompt is the chat generation prompt for
                ``{"prompt", "system"?}`` and is shared by both answers. Records: ``{"prompt", "chosen", "rejected"}``.

Memory stays flat in corpus size: at most ``max_chunks_in_flight`` chunks exist at once, and the builders keep only
the per-document index (4 + 8 bytes per sequence/document in compact arrays, as any ``.idx`` must). Outputs are
written under temporary names and renamed (``.bin`` then ``.idx``) only after everything succeeded, so an interrupted
run never leaves an ``.idx`` that looks complete. Malformed records are counted by reason, never fatal.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sys
import threading
import time
from array import array
from collections import Counter
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from tinyllm_mcore.data.corpus import Chunk, expand_inputs, iter_chunks
from tinyllm_mcore.tokenizer import Tokenizer, messages_from_record

MODES = ("pretrain", "sft", "preference")
SKIP_REASONS = ("blank_line", "bad_json", "not_object", "missing_key", "not_string", "empty_text",
                "bad_messages", "no_answer")


def output_prefixes(output_prefix: str, mode: str, json_keys: Sequence[str] = ("text",)) -> list[str]:
    """The dataset prefixes a run writes (Megatron-LM naming: ``{prefix}_{key}_document``)."""
    if mode == "pretrain":
        return [f"{output_prefix}_{key}_document" for key in json_keys]
    return [f"{output_prefix}_{mode}_document"]


@dataclass
class EncodedChunk:
    """What a worker returns: per output, flat tokens + sequence lengths + sequences per document."""
    tokens: list[np.ndarray]
    sequence_lengths: list[np.ndarray]
    sequences_per_document: list[np.ndarray]
    documents: int
    skipped: list[tuple[str, int]]  # (reason, line number)
    source: str


@dataclass
class PreprocessResult:
    prefixes: list[str]
    documents: int = 0
    tokens: int = 0
    skipped: Counter = field(default_factory=Counter)
    skipped_examples: dict = field(default_factory=dict)  # reason -> first few "file:line"
    seconds: float = 0.0

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        rate = self.documents / self.seconds if self.seconds else 0.0
        lines = [f"documents: {self.documents}", f"tokens: {self.tokens}",
                 f"skipped lines: {self.skipped_total}"]
        for reason in SKIP_REASONS:
            if self.skipped[reason]:
                lines.append(f"  {reason}: {self.skipped[reason]} (e.g. {', '.join(self.skipped_examples[reason])})")
        lines.append(f"time: {self.seconds:.1f} s ({rate:,.0f} docs/s, {self.tokens / max(self.seconds, 1e-9):,.0f} "
                     f"tokens/s)")
        lines += [f"wrote {p}.bin / .idx" for p in self.prefixes]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- encoding
class _Skip(Exception):
    def __init__(self, reason: str):
        self.reason = reason


class ChunkEncoder:
    """Turns a ``Chunk`` into an ``EncodedChunk``. Built once per worker process."""

    def __init__(self, tokenizer: str | Tokenizer, tokenizer_type: str, mode: str, json_keys: Sequence[str],
                 append_eod: bool, system: str | None):
        """``tokenizer``: a loaded Tokenizer, or a model path (what worker processes get)."""
        self.tokenizer = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer.load(tokenizer, tokenizer_type)
        self.mode, self.json_keys, self.append_eod, self.system = mode, list(json_keys), append_eod, system
        self.dtype = token_dtype(self.tokenizer.vocab_size)
        self.outputs = len(self.json_keys) if mode == "pretrain" else 1

    def __call__(self, chunk: Chunk) -> EncodedChunk:
        skipped: list[tuple[str, int]] = []
        documents: list = []  # records (pretrain) or chat segment lists (sft, preference)
        for offset, record in enumerate(self._records(chunk)):
            try:
                record = self._check(record)
                documents.append(record if self.mode == "pretrain" else self._chat_segments(record))
            except _Skip as skip:
                skipped.append((skip.reason, chunk.first_line + offset))
        if self.mode == "pretrain":
            per_output = self._encode_texts(documents)
        else:
            per_output = [self._flatten_segments(documents)]
        tokens, lengths, per_doc = zip(*per_output)
        return EncodedChunk(list(tokens), list(lengths), list(per_doc), len(per_doc[0]), skipped, chunk.source)

    def _records(self, chunk: Chunk) -> Iterator:
        if chunk.records is not None:
            yield from chunk.records
            return
        for raw in chunk.lines:
            if not raw.strip():
                yield _Skip("blank_line")
                continue
            try:
                yield json.loads(raw)
            except ValueError:  # also invalid UTF-8
                yield _Skip("bad_json")

    def _check(self, record) -> dict:
        """Validate one record for the mode; raise _Skip(reason) if unusable."""
        if isinstance(record, _Skip):
            raise record
        if not isinstance(record, dict):
            raise _Skip("not_object")
        if self.mode == "pretrain":
            required = self.json_keys
        elif self.mode == "preference":
            required = ("prompt", "chosen", "rejected")
        else:  # sft: checked in depth by messages_from_record
            return record
        for key in required:
            if key not in record:
                raise _Skip("missing_key")
        for key in required:
            if not isinstance(record[key], str):
                raise _Skip("not_string")
        for key in required:
            if not record[key].strip():
                raise _Skip("empty_text")
        return record

    def _encode_texts(self, records: list[dict]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        outputs = []
        for key in self.json_keys:
            ids = self.tokenizer.tokenize_batch([r[key] for r in records])  # one C++ call for the whole chunk
            if self.append_eod:
                for doc in ids:
                    doc.append(self.tokenizer.eod)
            lengths = np.fromiter(map(len, ids), dtype=np.int32, count=len(ids))
            flat = np.fromiter(chain.from_iterable(ids), dtype=self.dtype, count=int(lengths.sum()))
            outputs.append((flat, lengths, np.ones(len(ids), dtype=np.int32)))
        return outputs

    def _flatten_segments(self, segments_per_doc: list[list[list[int]]]):
        flat_segments = [s for doc in segments_per_doc for s in doc]
        lengths = np.fromiter(map(len, flat_segments), dtype=np.int32, count=len(flat_segments))
        flat = np.fromiter(chain.from_iterable(flat_segments), dtype=self.dtype, count=int(lengths.sum()))
        per_doc = np.fromiter(map(len, segments_per_doc), dtype=np.int32, count=len(segments_per_doc))
        return flat, lengths, per_doc

    def _chat_segments(self, record: dict) -> list[list[int]]:
        system = record.get("system", self.system)
        if system is not None and not isinstance(system, str):
            raise _Skip("not_string")
        if self.mode == "preference":
            prompt = self.tokenizer.chat_prompt_ids([{"role": "user", "content": record["prompt"]}], system)
            return [prompt,
                    self.tokenizer.tokenize(record["chosen"].strip()) + [self.tokenizer.eos],
                    self.tokenizer.tokenize(record["rejected"].strip()) + [self.tokenizer.eos]]
        try:
            messages, record_system = messages_from_record(record)
            segments = self.tokenizer.encode_conversation(messages, record_system if record_system is not None
                                                          else self.system)
        except KeyError:
            raise _Skip("missing_key")
        except (ValueError, TypeError, AttributeError):
            raise _Skip("bad_messages")
        if len(segments) % 2:  # a trailing prompt has nothing to learn from
            segments = segments[:-1]
        if not segments:
            raise _Skip("no_answer")
        return segments


def token_dtype(vocab_size: int):
    from megatron.core.datasets.indexed_dataset import DType

    return DType.optimal_dtype(vocab_size)  # uint16 below 65500, else int32


# ---------------------------------------------------------------------------------------------------- writing
def _make_builder_class():
    """IndexedDatasetBuilder with compact index arrays, a chunk-at-a-time append and a vectorised pointer pass."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder, _IndexWriter

    class _VectorisedIndexWriter(_IndexWriter):
        def _sequence_pointers(self, sequence_lengths):
            lengths = np.asarray(sequence_lengths, dtype=np.int64)
            pointers = np.zeros_like(lengths)
            np.cumsum(lengths[:-1] * DType.size(self.dtype), out=pointers[1:])
            return pointers

    class ChunkedIndexedDatasetBuilder(IndexedDatasetBuilder):
        def __init__(self, bin_path: str, dtype):
            super().__init__(bin_path, dtype=dtype)
            self.sequence_lengths = array("i")  # 4 bytes per sequence instead of a Python int each
            self.document_indices = array("q", [0])

        def add_chunk(self, tokens: np.ndarray, sequence_lengths: np.ndarray, sequences_per_document: np.ndarray):
            self.data_file.write(tokens.astype(self.dtype, copy=False).tobytes(order="C"))
            self.sequence_lengths.frombytes(sequence_lengths.astype(np.int32).tobytes())
            ends = self.document_indices[-1] + np.cumsum(sequences_per_document, dtype=np.int64)
            self.document_indices.frombytes(ends.tobytes())

        def finalize(self, idx_path: str) -> None:
            self.data_file.close()
            with _VectorisedIndexWriter(idx_path, self.dtype) as writer:
                writer.write(self.sequence_lengths, self.sequence_modes, self.document_indices)

    return ChunkedIndexedDatasetBuilder


class _AtomicOutputs:
    """Builders writing ``{prefix}.bin/.idx.tmp-<pid>``; ``commit()`` renames them into place (.idx last)."""

    def __init__(self, prefixes: list[str], dtype):
        builder_class = _make_builder_class()
        self.prefixes = prefixes
        self.tag = f".tmp-{os.getpid()}"
        for prefix in prefixes:
            Path(prefix).parent.mkdir(parents=True, exist_ok=True)
            for suffix in (".idx", ".bin"):  # an old complete pair must not survive a failed overwrite
                Path(prefix + suffix).unlink(missing_ok=True)
        self.builders = [builder_class(p + ".bin" + self.tag, dtype) for p in prefixes]

    def commit(self):
        for prefix, builder in zip(self.prefixes, self.builders):
            builder.finalize(prefix + ".idx" + self.tag)
        for prefix in self.prefixes:
            os.replace(prefix + ".bin" + self.tag, prefix + ".bin")
        for prefix in self.prefixes:
            os.replace(prefix + ".idx" + self.tag, prefix + ".idx")

    def discard(self):
        for prefix, builder in zip(self.prefixes, self.builders):
            builder.data_file.close()
            for suffix in (".bin", ".idx"):
                Path(prefix + suffix + self.tag).unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------- driver
_worker_encoder: ChunkEncoder | None = None


def _init_worker(*encoder_args):
    global _worker_encoder
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is handled once, by the main process
    _worker_encoder = ChunkEncoder(*encoder_args)


def _encode_in_worker(chunk: Chunk) -> EncodedChunk:
    return _worker_encoder(chunk)


class _InFlightLimit:
    """Pool.imap reads its input as fast as it can; ``feed`` makes it wait for a free slot, so at most ``slots``
    chunks are read but not yet written (memory stays flat). ``close`` unblocks it for shutdown."""

    def __init__(self, slots: int):
        self._slots = threading.Semaphore(slots)
        self._closed = False

    def feed(self, items: Iterable) -> Iterator:
        for item in items:
            self._slots.acquire()
            if self._closed:
                return
            yield item

    def chunk_written(self):
        self._slots.release()

    def close(self):
        self._closed = True
        self._slots.release()


def preprocess(inputs: str | Sequence[str], output_prefix: str, tokenizer_model: str,
               tokenizer_type: str = "auto", json_keys: Sequence[str] = ("text",), append_eod: bool = False,
               mode: str = "pretrain", workers: int = 1, chunk_size: int = 512, system: str | None = None,
               max_chunks_in_flight: int | None = None, log_interval: int = 1000,
               progress: bool = True) -> PreprocessResult:
    """Tokenize ``inputs`` into indexed datasets. Raises FileNotFoundError/ValueError for bad paths or arguments."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
    sources = expand_inputs(inputs)
    encoder_args = (str(tokenizer_model), tokenizer_type, mode, list(json_keys), append_eod, system)
    encoder = ChunkEncoder(*encoder_args)  # also validates the tokenizer before any worker starts
    columns = list(json_keys) if mode == "pretrain" else None
    result = PreprocessResult(output_prefixes(output_prefix, mode, json_keys))
    outputs = _AtomicOutputs(result.prefixes, encoder.dtype)
    bar = _progress_bar(progress, log_interval)
    start = time.perf_counter()
    pool = in_flight = None
    try:
        chunks = iter_chunks(sources, chunk_size, columns)
        if workers <= 1:
            encoded_chunks = map(encoder, chunks)
            in_flight = None
        else:
            in_flight = _InFlightLimit(max_chunks_in_flight or 4 * workers)
            context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
            pool = context.Pool(workers, initializer=_init_worker, initargs=encoder_args)
            encoded_chunks = pool.imap(_encode_in_worker, in_flight.feed(chunks))
        for encoded in encoded_chunks:  # in input order: the output is deterministic
            for builder, tokens, lengths, per_doc in zip(outputs.builders, encoded.tokens,
                                                         encoded.sequence_lengths, encoded.sequences_per_document):
                builder.add_chunk(tokens, lengths, per_doc)
            _count(result, encoded)
            if in_flight is not None:
                in_flight.chunk_written()
            bar.update(encoded.documents + len(encoded.skipped))
            bar.set_postfix_str(_rates(result, start), refresh=False)
        outputs.commit()
    except BaseException:  # KeyboardInterrupt included: never leave partial outputs behind
        outputs.discard()
        raise
    finally:
        if pool is not None:
            in_flight.close()
            pool.terminate()
            pool.join()
        bar.close()
    result.seconds = time.perf_counter() - start
    return result


def _count(result: PreprocessResult, encoded: EncodedChunk):
    result.documents += encoded.documents
    result.tokens += sum(int(t.size) for t in encoded.tokens)
    for reason, line in encoded.skipped:
        result.skipped[reason] += 1
        examples = result.skipped_examples.setdefault(reason, [])
        if len(examples) < 3:
            examples.append(f"{encoded.source}:{line}")


def _rates(result: PreprocessResult, start: float) -> str:
    elapsed = max(time.perf_counter() - start, 1e-9)
    return f"{result.documents / elapsed:,.0f} docs/s, {result.tokens / elapsed:,.0f} tokens/s"


def _progress_bar(enabled: bool, log_interval: int):
    from tqdm import tqdm

    return tqdm(unit=" lines", disable=not enabled, miniters=log_interval, mininterval=1.0, dynamic_ncols=True)
