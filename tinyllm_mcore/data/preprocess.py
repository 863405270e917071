"""Raw corpora -> megatron-core indexed datasets (``.bin`` + ``.idx`` + vocabulary sidecar), streamed, in parallel,
crash-safe.

Three modes, one pipeline (read chunks -> encode in workers -> append to builders):

``pretrain``    one output per json key, ``{prefix}_{key}_{level}`` — level ``document``, or ``sentence`` with
                ``split_sentences`` — with exactly the files Megatron-LM's tools/preprocess_data.py writes for the
                same input: a document per line, a sequence per sentence (one per document without splitting),
                sentences that tokenize to nothing dropped, eod (``append_eod``) after a document's last sentence,
                a text that tokenizes to nothing written as an empty document (no sequences).
``sft``         ``{prefix}_sft_document``; one document = one conversation, stored as its chat segments
                ``[prompt, response, prompt, response, ...]`` (see ``Tokenizer.encode_conversation``), one *sequence*
                per segment. Even sequences (0, 2, ...) are prompts (no loss), odd ones are assistant answers + eos
                (trained). Records: ``{"question", "answer", "system"?}`` or ``{"messages": [...], "system"?}``.
``preference``  ``{prefix}_preference_document``; one document = one pair, three sequences
                ``[prompt, chosen + eos, rejected + eos]``; the prompt is the chat generation prompt for
                ``{"prompt", "system"?}`` and is shared by both answers. Records: ``{"prompt", "chosen", "rejected"}``.

Where Megatron-LM's tool would stop (a line that is not a JSON object, a key missing or not a string), this one goes
on and counts: a line with none of the keys usable is skipped; with several ``json_keys``, a key missing from a line
that has the others is written as an *empty document* in that key's output and counted, so document ``i`` of every
output still comes from the same line. A run that would write no tokens for some output fails (nothing written).
A line that is not valid UTF-8 (or holds a JSON escape of half a surrogate pair) is dropped and counted as
``invalid_utf8``; with ``strict_utf8`` the first one is an error naming its file and line.

Workers (``workers > 1``, ``_WorkerPool``) never make the run wait without a deadline: a worker that dies, or holds a
chunk longer than ``worker_timeout_s``, is a ``WorkerError`` (one line; nothing written).

``partitions`` (Megatron-LM's ``--partitions``): Megatron-LM deals input lines round-robin into that many parts,
processes them and concatenates the parts, so the output is ordered part 0 (lines 0, N, 2N, ...), part 1, ...; with
``keep_sequential_samples`` the parts are consecutive runs of lines and the output keeps the input order. The same
files come out here from one reading pass: each document goes to its part's temporary builder, and the parts are
merged (streaming) at the end. The temporary parts live beside the output, not beside the input, and are removed.

Memory stays flat in corpus size: at most ``max_chunks_in_flight`` chunks exist at once, and the builders keep only
the per-document index. Outputs are atomic: everything is written under temporary names (``*.tmp-<pid>``) and
renamed (``.bin``, ``.idx``, then the sidecar) only after everything succeeded, so a failure, Ctrl-C, SIGTERM or a
full disk leaves the previous dataset at that prefix as it was and no temporary files.
"""
from __future__ import annotations

import glob
import json
import multiprocessing
import os
import pickle
import re
import select
import signal
import struct
import sys
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from tinyllm_mcore.data.corpus import Chunk, expand_inputs, iter_chunks
from tinyllm_mcore.data.indexed_files import (IndexSummary, check_output_prefix, make_builder, merge_indexed,
                                               token_dtype)
from tinyllm_mcore.data.sentences import SentenceSplitter, split_document
from tinyllm_mcore.data.vocab_contract import tokenizer_record, write_sidecar
from tinyllm_mcore.runtime.files import publish
from tinyllm_mcore.tokenizer.core import HFTokenizer, Tokenizer, messages_from_record

MODES = ("pretrain", "sft", "preference")
SKIP_REASONS = ("blank_line", "invalid_utf8", "bad_json", "not_object", "missing_key", "not_string", "empty_text",
                "bad_messages", "no_answer")
# A JSON escape of half a surrogate pair ("\ud800"): valid JSON, but no character (cannot be written as UTF-8).
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
# json's C scanner: what json.loads runs, without its Python layers around it per line. A line it does not take
# whole (leading whitespace, a byte order mark, bad JSON) goes through json.loads as before.
_SCAN_JSON = json.JSONDecoder().scan_once
_JSON_WHITESPACE = " \t\n\r"


class Terminated(Exception):
    """SIGTERM arrived; raised in the main process so the run cleans up like after Ctrl-C."""


def output_prefixes(output_prefix: str, mode: str, json_keys: Sequence[str] = ("text",),
                    level: str = "document") -> list[str]:
    """The dataset prefixes a run writes (Megatron-LM naming: ``{prefix}_{key}_{level}``)."""
    if mode == "pretrain":
        return [f"{output_prefix}_{key}_{level}" for key in json_keys]
    return [f"{output_prefix}_{mode}_document"]


@dataclass
class EncodedChunk:
    """What a worker returns: per output, flat tokens + sequence lengths + sequences per document."""
    tokens: list[np.ndarray]
    sequence_lengths: list[np.ndarray]
    sequences_per_document: list[np.ndarray]
    documents: int
    skipped: list[tuple[str, int]]  # lines not written: (reason, line number)
    source: str
    document_lines: np.ndarray = None  # input line index (0-based, over all inputs) of each document
    key_issues: list[tuple[str, str, int]] = field(default_factory=list)  # (key, reason, line): an empty document


@dataclass
class PreprocessResult:
    prefixes: list[str]
    documents: int = 0
    tokens: int = 0
    skipped: Counter = field(default_factory=Counter)
    skipped_examples: dict = field(default_factory=dict)  # reason -> first few "file:line"
    key_issues: Counter = field(default_factory=Counter)  # (key, reason) -> lines written as an empty document
    key_issue_examples: dict = field(default_factory=dict)
    empty_documents: Counter = field(default_factory=Counter)  # prefix -> documents without any sequence
    seconds: float = 0.0

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        rate = self.documents / self.seconds if self.seconds else 0.0
        invalid = self.skipped["invalid_utf8"]
        lines = [f"documents: {self.documents}", f"tokens: {self.tokens}",
                 f"skipped lines: {self.skipped_total}" + (f" ({invalid} dropped as invalid UTF-8)" if invalid else "")]
        for reason in SKIP_REASONS:
            if self.skipped[reason]:
                lines.append(f"  {reason}: {self.skipped[reason]} (e.g. {', '.join(self.skipped_examples[reason])})"
                             + (" dropped, not written (--strict-utf8: stop at the first instead)"
                                if reason == "invalid_utf8" else ""))
        for (key, reason), count in sorted(self.key_issues.items()):
            lines.append(f"key {key!r} {reason} in {count} written lines (empty document in its output; e.g. "
                         f"{', '.join(self.key_issue_examples[key, reason])})")
        for prefix, count in sorted(self.empty_documents.items()):
            if count:
                lines.append(f"empty documents in {prefix}: {count}")
        lines.append(f"time: {self.seconds:.1f} s ({rate:,.0f} docs/s, {self.tokens / max(self.seconds, 1e-9):,.0f} "
                     f"tokens/s)")
        lines += [f"wrote {p}.bin / .idx / .json" for p in self.prefixes]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- encoding
class _Skip(Exception):
    def __init__(self, reason: str):
        self.reason = reason


class ChunkEncoder:
    """Turns a ``Chunk`` into an ``EncodedChunk``. Built once, in the main process; workers inherit or unpickle it."""

    def __init__(self, tokenizer: str | Tokenizer | HFTokenizer, tokenizer_type: str, mode: str,
                 json_keys: Sequence[str], append_eod: bool, system: str | None,
                 splitter: SentenceSplitter | None = None, strict_utf8: bool = False, encode_threads: int = -1):
        """``tokenizer``: a loaded tokenizer, or a model path. ``splitter``: split pretrain documents into sentences.
        A line that is not UTF-8 is skipped as ``invalid_utf8``, or with ``strict_utf8`` a ValueError naming it.
        ``encode_threads``: SentencePiece threads per batch (-1: one per CPU; with worker processes, fewer)."""
        self.encode_threads = encode_threads
        self.tokenizer = tokenizer if not isinstance(tokenizer, (str, os.PathLike)) else \
            Tokenizer.load(tokenizer, tokenizer_type)
        self.mode, self.json_keys, self.append_eod, self.system = mode, list(json_keys), append_eod, system
        self.splitter, self.strict_utf8 = splitter, strict_utf8
        self.dtype = token_dtype(self.tokenizer.vocab_size)
        self.outputs = len(self.json_keys) if mode == "pretrain" else 1
        if mode != "pretrain":
            self.tokenizer.require_chat_tokens()  # one clear line now, not every record skipped later
        if append_eod and self.tokenizer.eod is None:
            raise ValueError(f"--append-eod: tokenizer {self.tokenizer.model_path} has no eos/eod token")

    def __call__(self, chunk: Chunk) -> EncodedChunk:
        if self.mode == "pretrain":
            return self._encode_documents(chunk)
        skipped: list[tuple[str, int]] = []
        documents, lines = [], []  # chat segment lists
        for offset, record in enumerate(self._records(chunk)):
            try:
                documents.append(self._chat_segments(self._check(record)))
                lines.append(chunk.index + offset)
            except _Skip as skip:
                skipped.append((skip.reason, chunk.first_line + offset))
        tokens, lengths, per_doc = self._flatten_segments(documents)
        return EncodedChunk([tokens], [lengths], [per_doc], len(per_doc), skipped, chunk.source,
                            np.asarray(lines, dtype=np.int64))

    def _records(self, chunk: Chunk) -> list:
        """The chunk's records, or a ``_Skip`` in place of each line that is not one."""
        if chunk.records is not None:
            return chunk.records
        records = []
        append, scan, whitespace = records.append, _SCAN_JSON, _JSON_WHITESPACE
        for offset, raw in enumerate(chunk.lines):
            try:
                text = raw.decode("utf-8")  # strict (JSON is UTF-8); json.loads(bytes) would let surrogates in
            except UnicodeDecodeError as e:
                append(self._invalid_utf8(chunk, offset, f"byte 0x{raw[e.start]:02x} at byte {e.start + 1}: "
                                                         f"{e.reason}"))
                continue
            try:
                record, end = scan(text, 0)
                if end != len(text) and text[end:].strip(whitespace):
                    raise ValueError("extra data")
            except (StopIteration, ValueError):
                record = _parse_line(raw, text)
                if isinstance(record, _Skip):
                    append(record)
                    continue
            if "\\u" in text and _SURROGATE_ESCAPE.search(text) and not _utf8_encodable(record):
                append(self._invalid_utf8(chunk, offset, "a \\uD800-\\uDFFF escape without its pair"))
                continue
            append(record)
        return records

    def _invalid_utf8(self, chunk: Chunk, offset: int, detail: str) -> "_Skip":
        if self.strict_utf8:
            raise ValueError(f"{chunk.source}:{chunk.first_line + offset}: not valid UTF-8 ({detail}); "
                             f"--strict-utf8 stops at the first such line, nothing written")
        return _Skip("invalid_utf8")

    # ------------------------------------------------------------------ pretrain
    def _encode_documents(self, chunk: Chunk) -> EncodedChunk:
        skipped, key_issues, lines = [], [], []
        first_line, index = chunk.first_line, chunk.index
        records = self._records(chunk)
        if len(self.json_keys) == 1:  # the common case, one check per line
            key, texts = self.json_keys[0], []
            for offset, record in enumerate(records):
                value = record.get(key) if isinstance(record, dict) else None
                if isinstance(value, str):
                    texts.append(value)
                    lines.append(index + offset)
                else:
                    skipped.append((_unusable(record, key), first_line + offset))
            per_output = [self._encode_texts(texts)]
        else:
            columns: dict[str, list[str | None]] = {key: [] for key in self.json_keys}
            for offset, record in enumerate(records):
                line = first_line + offset
                if not isinstance(record, dict):
                    skipped.append((_unusable(record, self.json_keys[0]), line))
                    continue
                issues = [(key, _unusable(record, key)) for key in self.json_keys
                          if not isinstance(record.get(key), str)]
                if len(issues) == len(self.json_keys):  # nothing usable in this line
                    skipped.append((issues[0][1], line))
                    continue
                key_issues += [(key, reason, line) for key, reason in issues]
                lines.append(index + offset)
                for key in self.json_keys:
                    value = record.get(key)
                    columns[key].append(value if isinstance(value, str) else None)
            per_output = [self._encode_texts(columns[key]) for key in self.json_keys]
        tokens, lengths, per_doc = zip(*per_output)
        return EncodedChunk(list(tokens), list(lengths), list(per_doc), len(lines), skipped, chunk.source,
                            np.asarray(lines, dtype=np.int64), key_issues)

    def _encode_texts(self, texts: list[str | None]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Documents (None: none) -> (flat tokens, sequence lengths, sequences per document), as Megatron-LM's
        encoder: every sentence tokenized on its own, empty ones dropped, eod after a document's last one. One batch
        call into the tokenizer; the rest is array arithmetic, not a Python step per document."""
        if self.splitter is not None:
            split = [split_document(self.splitter, t) if t is not None else [] for t in texts]
            sentences = [s for doc in split for s in doc]
            document_of = np.repeat(np.arange(len(texts)), [len(doc) for doc in split])
        elif any(t is None for t in texts):
            sentences = [t for t in texts if t is not None]
            document_of = np.flatnonzero([t is not None for t in texts])
        else:
            sentences, document_of = texts, None  # one sentence per document
        encoded = self.tokenizer.tokenize_batch(sentences, num_threads=self.encode_threads)
        raw_lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
        flat = np.fromiter(chain.from_iterable(encoded), dtype=self.dtype, count=int(raw_lengths.sum()))
        kept = raw_lengths > 0
        lengths = raw_lengths[kept].astype(np.int32)
        if document_of is None:
            per_doc = kept.astype(np.int32)
        else:
            per_doc = np.bincount(document_of[kept], minlength=len(texts)).astype(np.int32)
        if self.append_eod and lengths.size:
            last = np.cumsum(per_doc[per_doc > 0]) - 1  # each document's last kept sentence, among the kept ones
            eod_at = np.cumsum(lengths)[last]  # where its tokens end in ``flat``
            lengths[last] += 1
            flat = np.insert(flat, eod_at, self.tokenizer.eod)
        return flat, lengths, per_doc

    # ------------------------------------------------------------------ sft / preference
    def _check(self, record) -> dict:
        """Validate one chat record for the mode; raise _Skip(reason) if unusable."""
        if isinstance(record, _Skip):
            raise record
        if not isinstance(record, dict):
            raise _Skip("not_object")
        if self.mode == "sft":  # checked in depth by messages_from_record
            return record
        required = ("prompt", "chosen", "rejected")
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

    def _flatten_segments(self, segments_per_doc: list[list[list[int]]]):
        flat_segments = [s for doc in segments_per_doc for s in doc]
        lengths = np.fromiter(map(len, flat_segments), dtype=np.int32, count=len(flat_segments))
        flat = np.fromiter(chain.from_iterable(flat_segments), dtype=self.dtype, count=int(lengths.sum()))
        per_doc = np.fromiter(map(len, segments_per_doc), dtype=np.int32, count=len(segments_per_doc))
        return flat, lengths, per_doc

    def _chat_segments(self, record: dict) -> list[list[int]]:
        tok = self.tokenizer
        system = record.get("system", self.system)
        if system is not None and not isinstance(system, str):
            raise _Skip("not_string")
        if self.mode == "preference":
            prompt = tok.chat_prompt_ids([{"role": "user", "content": record["prompt"]}], system)
            return [prompt,
                    tok.tokenize_content(record["chosen"].strip()) + [tok.eos],
                    tok.tokenize_content(record["rejected"].strip()) + [tok.eos]]
        try:
            messages, record_system = messages_from_record(record)
            segments = tok.encode_conversation(messages, record_system if record_system is not None
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


def _parse_line(raw: bytes, text: str):
    """A line the fast path did not take whole, parsed as json.loads does: the record, or a ``_Skip``."""
    if not raw.strip():
        return _Skip("blank_line")
    try:
        return json.loads(text[1:] if text.startswith("\ufeff") else text)  # a byte order mark is allowed
    except ValueError:
        return _Skip("bad_json")


def _unusable(record, key: str) -> str:
    """Why ``record`` gives no text for ``key``: a skip reason."""
    if isinstance(record, _Skip):
        return record.reason
    if not isinstance(record, dict):
        return "not_object"
    return "missing_key" if key not in record else "not_string"


def _utf8_encodable(record) -> bool:
    try:
        json.dumps(record, ensure_ascii=False).encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


# ---------------------------------------------------------------------------------------------------- writing
class _AtomicOutputs:
    """One builder per output prefix (or one per output and partition), all writing ``*.tmp-<pid>`` files beside the
    output; ``commit()`` merges partitions and renames .bin, .idx, then the sidecar into place."""

    def __init__(self, prefixes: list[str], dtype, partitions: int = 1):
        self.prefixes, self.dtype, self.partitions = prefixes, dtype, partitions
        self.tag = f".tmp-{os.getpid()}"
        for prefix in prefixes:
            Path(prefix).parent.mkdir(parents=True, exist_ok=True)
            _remove_stale_temporaries(prefix)
        self.builders = []  # [output][partition]
        try:
            for prefix in prefixes:
                if partitions == 1:
                    self.builders.append([make_builder(prefix + ".bin" + self.tag, dtype)])
                else:
                    self.builders.append([make_builder(self._part(prefix, p) + ".bin", dtype)
                                          for p in range(partitions)])
        except BaseException:
            self.discard()
            raise

    def _part(self, prefix: str, p: int) -> str:
        return f"{prefix}{self.tag}-part{p}"

    def add(self, encoded: EncodedChunk):
        for parts, tokens, lengths, per_doc in zip(self.builders, encoded.tokens, encoded.sequence_lengths,
                                                   encoded.sequences_per_document):
            if self.partitions == 1:
                parts[0].add_chunk(tokens, lengths, per_doc)
                continue
            part_of_document = encoded.document_lines % self.partitions  # Megatron-LM's round-robin deal
            sequence_part = np.repeat(part_of_document, per_doc)
            token_part = np.repeat(sequence_part, lengths)
            for p, builder in enumerate(parts):
                if (part_of_document == p).any():
                    builder.add_chunk(tokens[token_part == p], lengths[sequence_part == p],
                                      per_doc[part_of_document == p])

    def totals(self, output: int) -> dict:
        parts = self.builders[output]
        return {"max_token_id": max(b.max_token_id for b in parts), "tokens": sum(b.tokens for b in parts),
                "sequences": sum(len(b.sequence_lengths) for b in parts),
                "documents": sum(b.documents for b in parts)}

    def commit(self, sidecar_info: list[dict]):
        staged = []
        for prefix, parts, info in zip(self.prefixes, self.builders, sidecar_info):
            temp_prefix = prefix + self.tag
            if self.partitions == 1:
                parts[0].finalize(prefix + ".idx" + self.tag)
                publish(prefix + ".bin" + self.tag, temp_prefix + ".bin")  # name it as a prefix for the sidecar
                publish(prefix + ".idx" + self.tag, temp_prefix + ".idx")
            else:
                for p, builder in enumerate(parts):
                    builder.finalize(self._part(prefix, p) + ".idx")
                merge_indexed([IndexSummary(self._part(prefix, p)) for p in range(self.partitions)],
                              temp_prefix + ".bin", temp_prefix + ".idx")
                for p in range(self.partitions):
                    for suffix in (".bin", ".idx"):
                        os.unlink(self._part(prefix, p) + suffix)
            staged.append((prefix, temp_prefix, write_sidecar(temp_prefix, info, final_prefix=prefix)))
        for prefix, temp_prefix, sidecar in staged:  # the .json last: a complete sidecar describes a complete pair
            publish(temp_prefix + ".bin", prefix + ".bin")
            publish(temp_prefix + ".idx", prefix + ".idx")
            publish(sidecar, prefix + ".json")

    def discard(self):
        for parts in self.builders:
            for builder in parts:
                builder.discard()
        for prefix in self.prefixes:
            for path in glob.glob(glob.escape(prefix) + "*" + self.tag + "*"):
                Path(path).unlink(missing_ok=True)


def _remove_stale_temporaries(prefix: str):
    """Temporaries of an earlier run at this prefix that was killed (SIGKILL, power loss): their process is gone."""
    for path in glob.glob(glob.escape(prefix) + "*.tmp-*"):
        match = re.search(r"\.tmp-(\d+)", path[len(prefix):])
        if not match or int(match.group(1)) == os.getpid():
            continue
        try:
            os.kill(int(match.group(1)), 0)
        except ProcessLookupError:
            Path(path).unlink(missing_ok=True)
        except PermissionError:  # alive, another user's
            pass


# ---------------------------------------------------------------------------------------------------- workers
DEFAULT_WORKER_TIMEOUT_S = 600.0  # a worker holding one chunk this long without a result is taken as stuck
_STOP_TIMEOUT_S = 10.0  # idle workers told to exit get this long; then they are killed
_POLL_S = 1.0  # a wait wakes at least this often to check the deadlines (a dead worker wakes it at once)
_FRAME = struct.Struct("<Q")  # every message on a worker pipe: its pickled size, then the pickle
_PIPE_BYTES = 1 << 20  # asked for per pipe (Linux), so a whole chunk usually fits and writes do not stall


class WorkerError(RuntimeError):
    """A worker process died, or gave no result within the deadline: the run fails with one line (nothing written,
    the workers stopped) instead of waiting forever."""


def _start_method() -> str:
    """``fork`` (fast; the loaded tokenizer is inherited) when the forking thread is this process's only Python
    thread; ``spawn`` otherwise, and off Linux. A fork copies every lock other threads hold (stderr's, logging's, a
    progress bar's) as it is at that moment, and a worker that then takes one waits forever."""
    if sys.platform.startswith("linux") and threading.active_count() == 1:
        return "fork"
    return "spawn"


def _read_exact(fd: int, n: int) -> bytes | None:
    """``n`` bytes from a blocking pipe, or None at end of file (the writer is gone)."""
    parts = []
    while n:
        part = os.read(fd, min(n, _PIPE_BYTES))
        if not part:
            return None
        parts.append(part)
        n -= len(part)
    return b"".join(parts)


def _worker_main(encoder: ChunkEncoder, tasks, results, inherited: Sequence = ()) -> None:
    """A worker: reads ``(seq, chunk)`` messages, answers ``(seq, encoded, error)``, until its task pipe ends."""
    # Ctrl-C and SIGTERM are handled once, by the main process, which then stops the workers (SIGTERM keeps its
    # default action here so that works, and a worker killed that way exits without a traceback). Both signals were
    # blocked across the fork, so none can reach a handler inherited from the main process first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    for conn in inherited:  # a forked worker's copies of the main process's pipe ends
        conn.close()
    task_fd, result_fd = tasks.fileno(), results.fileno()
    while True:
        header = _read_exact(task_fd, _FRAME.size)
        payload = header and _read_exact(task_fd, _FRAME.unpack(header)[0])
        if not payload:
            return  # the main process closed the pipe (done) or is gone
        seq, chunk = pickle.loads(payload)
        try:
            reply = (seq, encoder(chunk), None)
        except Exception as e:  # re-raised by the main process, in input order
            reply = (seq, None, _portable_error(e))
        data = pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL)
        view = memoryview(_FRAME.pack(len(data)) + data)
        try:
            while view:
                view = view[os.write(result_fd, view):]
        except OSError:  # BrokenPipeError: the main process is gone
            return


def _portable_error(error: Exception) -> Exception:
    """``error`` if it survives pickling (with the worker's traceback as a note, shown when it is a bug), else a
    RuntimeError carrying its text."""
    import traceback

    text = "".join(traceback.format_exception(error)).rstrip()
    try:
        error.add_note(f"(raised in a preprocess worker process)\n{text}")
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}\n{text}")


class _Worker:
    def __init__(self, process, task_conn, result_conn):
        self.process, self.task_conn, self.result_conn = process, task_conn, result_conn
        self.outgoing = bytearray()  # framed tasks not yet in the pipe
        self.incoming = bytearray()  # result bytes not yet a whole frame
        self.queued: deque = deque()  # (seq, "file:line") of the tasks sent to it, oldest (the one it works on) first
        self.busy_since = 0.0  # when it started on the oldest queued task

    def doing(self) -> str:
        return f"while encoding {self.queued[0][1]}" if self.queued else "while idle"


class _WorkerPool:
    """``workers`` processes encoding chunks; ``imap`` gives the results in input order.

    Built to never wait forever: each worker has its own two pipes (no queue lock shared between processes that a
    dying worker could take with it), workers are started once, from the calling thread, with SIGINT and SIGTERM
    blocked until their own handlers are set, and never silently replaced (a task a dead worker held would never
    be answered); the main process waits only in poll() with a timeout, so a worker that dies is seen at once and
    one that holds a chunk longer than ``timeout_s`` is a WorkerError, like a failed start. ``close`` bounds the
    workers' exit; ``kill`` ends them at once (errors, Ctrl-C, SIGTERM)."""

    def __init__(self, encoder: ChunkEncoder, workers: int, max_in_flight: int,
                 timeout_s: float = DEFAULT_WORKER_TIMEOUT_S):
        self.timeout_s = timeout_s
        self.max_in_flight = max(max_in_flight, workers)
        self.per_worker = -(-self.max_in_flight // workers)
        self.method = _start_method()
        context = multiprocessing.get_context(self.method)
        self.workers: list[_Worker] = []
        inherited = []  # this process's ends of the pipes so far
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            for i in range(workers):
                task_r, task_w = context.Pipe(duplex=False)
                result_r, result_w = context.Pipe(duplex=False)
                # A forked worker closes its copies of this process's pipe ends (its own and earlier workers'):
                # while it holds one, the end of its task pipe never comes.
                process = context.Process(target=_worker_main, name=f"preprocess-worker-{i}", daemon=True,
                                          args=(encoder, task_r, result_w,
                                                inherited + [task_w, result_r] if self.method == "fork" else []))
                self.workers.append(_Worker(process, task_w, result_r))
                try:
                    process.start()
                finally:
                    task_r.close()
                    result_w.close()
                for conn in (task_w, result_r):
                    os.set_blocking(conn.fileno(), False)
                    _grow_pipe(conn.fileno())
                inherited += [task_w, result_r]
        except BaseException:
            self.kill()
            raise
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)

    # ------------------------------------------------------------------ results
    def imap(self, chunks: Iterable[Chunk]) -> Iterator[EncodedChunk]:
        """Encoded ``chunks``, in order; at most ``max_in_flight`` read but not yet handed back (memory stays flat).
        A worker's exception is raised here, at its chunk's turn."""
        chunks = iter(chunks)
        done: dict[int, tuple] = {}
        sent = given = 0
        exhausted = False
        while True:
            while not exhausted and sent - given < self.max_in_flight:
                worker = min(self.workers, key=lambda w: len(w.queued))
                if len(worker.queued) >= self.per_worker:
                    break
                chunk = next(chunks, None)
                if chunk is None:
                    exhausted = True
                    break
                self._send(worker, sent, chunk)
                sent += 1
            if given in done:
                encoded, error = done.pop(given)
                given += 1
                if error is not None:
                    raise error
                yield encoded
            elif exhausted and given == sent:
                return
            else:
                self._wait(done)

    def _send(self, worker: _Worker, seq: int, chunk: Chunk):
        data = pickle.dumps((seq, chunk), protocol=pickle.HIGHEST_PROTOCOL)
        if not worker.queued:
            worker.busy_since = time.monotonic()
        worker.queued.append((seq, f"{chunk.source}:{chunk.first_line}"))
        worker.outgoing += _FRAME.pack(len(data))
        worker.outgoing += data
        self._flush(worker)

    def _flush(self, worker: _Worker):
        try:
            while worker.outgoing:
                written = os.write(worker.task_conn.fileno(), worker.outgoing[:_PIPE_BYTES])
                del worker.outgoing[:written]
        except BlockingIOError:
            pass  # the pipe is full: the rest goes when poll() says it can
        except OSError:  # BrokenPipeError: the worker is gone
            self._died(worker)

    def _wait(self, done: dict):
        """Until a result arrives (into ``done``), a worker exits, or a poll interval passes; then the deadline."""
        poller = select.poll()
        by_fd = {}
        for worker in self.workers:
            result_fd, sentinel = worker.result_conn.fileno(), worker.process.sentinel
            poller.register(result_fd, select.POLLIN)
            poller.register(sentinel, select.POLLIN)
            by_fd[result_fd] = by_fd[sentinel] = worker
            if worker.outgoing:
                poller.register(worker.task_conn.fileno(), select.POLLOUT)
                by_fd[worker.task_conn.fileno()] = worker
        exited = []
        for fd, _ in poller.poll(_POLL_S * 1000):
            worker = by_fd[fd]
            if fd == worker.result_conn.fileno():
                self._receive(worker, done)
            elif fd == worker.process.sentinel:
                exited.append(worker)
            else:
                self._flush(worker)
        for worker in exited:  # its last result (if any) was read above
            self._receive(worker, done)
            self._died(worker)
        now = time.monotonic()
        for worker in self.workers:
            if worker.queued and now - worker.busy_since > self.timeout_s:
                raise WorkerError(f"worker process {worker.process.pid} has been encoding {worker.queued[0][1]} for "
                                  f"{now - worker.busy_since:.0f} s without a result (--worker-timeout "
                                  f"{self.timeout_s:g}): it is stuck, or a record there is enormous; nothing "
                                  f"written")

    def _receive(self, worker: _Worker, done: dict):
        fd = worker.result_conn.fileno()
        while True:
            try:
                data = os.read(fd, _PIPE_BYTES)
            except BlockingIOError:
                break
            if not data:  # end of file: the worker is gone
                self._died(worker)
            worker.incoming += data
        while len(worker.incoming) >= _FRAME.size:
            size = _FRAME.unpack_from(worker.incoming)[0]
            if len(worker.incoming) < _FRAME.size + size:
                break
            seq, encoded, error = pickle.loads(worker.incoming[_FRAME.size:_FRAME.size + size])
            del worker.incoming[:_FRAME.size + size]
            worker.queued.popleft()
            worker.busy_since = time.monotonic()
            done[seq] = (encoded, error)

    def _died(self, worker: _Worker):
        worker.process.join(1.0)  # end of file can come a moment before the exit status
        code = worker.process.exitcode
        if code is None:
            how = "closed its pipe"
        elif code < 0:
            name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
            how = f"killed by {name}" + (": out of memory?" if -code == signal.SIGKILL else "")
        else:
            how = f"exit status {code}"
        raise WorkerError(f"worker process {worker.process.pid} died ({how}) {worker.doing()}; nothing written")

    # ------------------------------------------------------------------ shutdown
    def close(self, timeout_s: float = _STOP_TIMEOUT_S):
        """Every result is in: close the task pipes (a worker exits at their end), wait ``timeout_s`` at most for
        the exits, kill what is left."""
        for worker in self.workers:
            worker.task_conn.close()
        deadline = time.monotonic() + timeout_s
        for worker in self.workers:
            if worker.process.pid is not None:
                worker.process.join(max(0.0, deadline - time.monotonic()))
        self.kill()

    def kill(self):
        """End every worker now (SIGKILL: they write no files) and reap it, each wait bounded."""
        for worker in self.workers:
            if worker.process.pid is not None and worker.process.exitcode is None:
                worker.process.kill()
        for worker in self.workers:
            if worker.process.pid is not None:
                worker.process.join(5.0)
            worker.task_conn.close()
            worker.result_conn.close()


def _grow_pipe(fd: int):
    try:
        import fcntl

        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, _PIPE_BYTES)
    except (ImportError, AttributeError, OSError):  # not Linux, or over /proc/sys/fs/pipe-max-size: keep the default
        pass


def _raise_terminated(signum, frame):
    raise Terminated("terminated by SIGTERM")


def preprocess(inputs: str | Sequence[str], output_prefix: str, tokenizer_model: str | None,
               tokenizer_type: str = "auto", json_keys: Sequence[str] = ("text",), append_eod: bool = False,
               mode: str = "pretrain", workers: int = 1, chunk_size: int = 512, system: str | None = None,
               max_chunks_in_flight: int | None = None, log_interval: int = 1000, progress: bool = True,
               split_sentences: bool = False, keep_newlines: bool = False, lang: str = "english",
               partitions: int = 1, keep_sequential_samples: bool = False, vocab_file: str | None = None,
               merge_file: str | None = None, strict_utf8: bool = False,
               worker_timeout_s: float = DEFAULT_WORKER_TIMEOUT_S) -> PreprocessResult:
    """Tokenize ``inputs`` into indexed datasets (see the module docstring). Raises FileNotFoundError / ValueError /
    OSError with one-line messages for bad paths, arguments, data that yields nothing, or a failed write
    (the previous dataset at the prefix is then unchanged); ``WorkerError`` when a worker process dies or holds a
    chunk longer than ``worker_timeout_s``; ``Terminated`` on SIGTERM.

    Lines that are not valid UTF-8 are dropped and counted (``invalid_utf8``); with ``strict_utf8`` the first one
    is a ValueError naming its file and line."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
    if split_sentences and mode != "pretrain":
        raise ValueError("--split-sentences applies to pretraining documents, not --mode " + mode)
    if partitions < 1:
        raise ValueError(f"--partitions must be >= 1, got {partitions}")
    if len(set(json_keys)) != len(json_keys):
        raise ValueError(f"--json-keys has a key twice: {' '.join(json_keys)}")
    if not worker_timeout_s > 0:
        raise ValueError(f"--worker-timeout must be > 0 seconds, got {worker_timeout_s}")
    check_output_prefix(output_prefix)
    sources = expand_inputs(inputs)
    tokenizer = Tokenizer.load(tokenizer_model, tokenizer_type, vocab_file=vocab_file, merge_file=merge_file)
    splitter = SentenceSplitter(lang, keep_newlines) if split_sentences else None
    encoder = ChunkEncoder(tokenizer, tokenizer_type, mode, json_keys, append_eod, system, splitter, strict_utf8,
                           encode_threads=_encode_threads(workers))
    level = "sentence" if split_sentences else "document"
    result = PreprocessResult(output_prefixes(output_prefix, mode, json_keys, level))
    # Sequential partitions concatenate back to the input order: one part gives the same files.
    round_robin = partitions if not keep_sequential_samples else 1
    if workers > 1 and isinstance(tokenizer, HFTokenizer):
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the pool is the parallelism; quiet fork warning
    previous_sigterm = None
    if threading.current_thread() is threading.main_thread():
        previous_sigterm = signal.signal(signal.SIGTERM, _raise_terminated)
    start = time.perf_counter()
    pool = outputs = bar = None
    lines_read = 0
    try:
        chunks = iter_chunks(sources, chunk_size, list(json_keys) if mode == "pretrain" else None)
        if workers <= 1:
            encoded_chunks = map(encoder, chunks)
        else:  # started before the outputs are opened: a forked worker holds no copy of them
            pool = _WorkerPool(encoder, workers, max_chunks_in_flight or 4 * workers, worker_timeout_s)
            encoded_chunks = pool.imap(chunks)
        outputs = _AtomicOutputs(result.prefixes, encoder.dtype, round_robin)
        # The bar comes after the workers (and has no monitor thread): they were forked while this was the only thread.
        bar = _progress_bar(progress, log_interval)
        for encoded in encoded_chunks:  # in input order: the output is deterministic
            outputs.add(encoded)
            _count(result, encoded)
            if mode == "pretrain":
                for prefix, per_doc in zip(result.prefixes, encoded.sequences_per_document):
                    result.empty_documents[prefix] += int((per_doc == 0).sum())
            lines_read += encoded.documents + len(encoded.skipped)
            bar.update(encoded.documents + len(encoded.skipped))
            bar.set_postfix_str(_rates(result, start), refresh=False)
        if pool is not None:  # every result is in: the workers exit (bounded) before the parts are merged
            pool.close()
            pool = None
        sidecars = []
        for i, prefix in enumerate(result.prefixes):
            totals = outputs.totals(i)
            if totals["tokens"] == 0:
                raise ValueError(_nothing_written(result, mode, json_keys, i, lines_read, sources))
            sidecars.append({"tokenizer": tokenizer_record(tokenizer), "mode": mode,
                             "json_key": json_keys[i] if mode == "pretrain" else None, "level": level,
                             "dtype": np.dtype(encoder.dtype).name, **totals, "append_eod": append_eod,
                             "created_by": "tools/preprocess_data.py"})
        outputs.commit(sidecars)
    except OSError as e:
        if outputs is not None:
            outputs.discard()
        if e.filename is None and e.errno is not None:  # a failed write (disk full): say which output
            raise OSError(e.errno, f"writing {output_prefix}_*: {e.strerror or e}; nothing written, the previous "
                                   f"dataset (if any) is unchanged") from None
        raise
    except BaseException:  # KeyboardInterrupt, Terminated included: never leave partial outputs behind
        if outputs is not None:
            outputs.discard()
        raise
    finally:
        if pool is not None:  # an error, Ctrl-C or SIGTERM: the workers are ended now
            pool.kill()
        if bar is not None:
            bar.close()
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)
    result.seconds = time.perf_counter() - start
    return result


def _encode_threads(workers: int) -> int:
    """SentencePiece threads per batch: the CPUs this process may use, shared among the worker processes (more
    threads than CPUs only make them wait on each other)."""
    if workers <= 1:
        return -1
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, cpus // workers)


def _nothing_written(result: PreprocessResult, mode: str, json_keys: Sequence[str], output: int, lines_read: int,
                     sources: list) -> str:
    what = f"--json-keys {json_keys[output]}" if mode == "pretrain" else f"--mode {mode}"
    source = str(sources[0]) if len(sources) == 1 else f"{len(sources)} inputs"
    if lines_read == 0:
        return f"{source}: no records to read; nothing written"
    reasons = Counter({r: c for r, c in result.skipped.items() if c})
    if mode == "pretrain":
        for (key, reason), count in result.key_issues.items():
            if key == json_keys[output]:
                reasons[reason] += count
    detail = ", ".join(f"{reason} {count}" for reason, count in reasons.most_common()) or "every text is empty"
    return f"{source}: no tokens for {what} in {lines_read} records ({detail}); nothing written"


def _count(result: PreprocessResult, encoded: EncodedChunk):
    result.documents += encoded.documents
    result.tokens += sum(int(t.size) for t in encoded.tokens)
    for reason, line in encoded.skipped:
        result.skipped[reason] += 1
        examples = result.skipped_examples.setdefault(reason, [])
        if len(examples) < 3:
            examples.append(f"{encoded.source}:{line}")
    for key, reason, line in encoded.key_issues:
        result.key_issues[key, reason] += 1
        examples = result.key_issue_examples.setdefault((key, reason), [])
        if len(examples) < 3:
            examples.append(f"{encoded.source}:{line}")


def _rates(result: PreprocessResult, start: float) -> str:
    elapsed = max(time.perf_counter() - start, 1e-9)
    return f"{result.documents / elapsed:,.0f} docs/s, {result.tokens / elapsed:,.0f} tokens/s"


def _progress_bar(enabled: bool, log_interval: int):
    """A tqdm bar without tqdm's monitor thread (tqdm starts one even for a disabled bar, and it outlives the bar: the
    next run in this process would then fork its workers beside it, or fall back to spawn)."""
    from tqdm import tqdm

    class Bar(tqdm):
        monitor_interval = 0

    return Bar(unit=" lines", disable=not enabled, miniters=log_interval, mininterval=1.0, dynamic_ncols=True)
