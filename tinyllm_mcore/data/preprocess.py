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
import re
import signal
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from tinyllm_mcore.data.corpus import Chunk, expand_inputs, iter_chunks
from tinyllm_mcore.data.indexed_files import IndexSummary, make_builder, merge_indexed
from tinyllm_mcore.data.sentences import SentenceSplitter, split_document
from tinyllm_mcore.data.vocab_contract import tokenizer_record, write_sidecar
from tinyllm_mcore.tokenizer.core import HFTokenizer, Tokenizer, messages_from_record

MODES = ("pretrain", "sft", "preference")
SKIP_REASONS = ("blank_line", "bad_json", "not_object", "missing_key", "not_string", "empty_text",
                "bad_messages", "no_answer")


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
        lines = [f"documents: {self.documents}", f"tokens: {self.tokens}",
                 f"skipped lines: {self.skipped_total}"]
        for reason in SKIP_REASONS:
            if self.skipped[reason]:
                lines.append(f"  {reason}: {self.skipped[reason]} (e.g. {', '.join(self.skipped_examples[reason])})")
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
                 splitter: SentenceSplitter | None = None):
        """``tokenizer``: a loaded tokenizer, or a model path. ``splitter``: split pretrain documents into sentences."""
        self.tokenizer = tokenizer if not isinstance(tokenizer, (str, os.PathLike)) else \
            Tokenizer.load(tokenizer, tokenizer_type)
        self.mode, self.json_keys, self.append_eod, self.system = mode, list(json_keys), append_eod, system
        self.splitter = splitter
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

    # ------------------------------------------------------------------ pretrain
    def _encode_documents(self, chunk: Chunk) -> EncodedChunk:
        skipped, key_issues, lines = [], [], []
        texts: dict[str, list[str | None]] = {key: [] for key in self.json_keys}
        for offset, record in enumerate(self._records(chunk)):
            line = chunk.first_line + offset
            if isinstance(record, _Skip):
                skipped.append((record.reason, line))
                continue
            if not isinstance(record, dict):
                skipped.append(("not_object", line))
                continue
            issues = [(key, "missing_key" if key not in record else "not_string") for key in self.json_keys
                      if not isinstance(record.get(key), str)]
            if len(issues) == len(self.json_keys):  # nothing usable in this line
                skipped.append((issues[0][1], line))
                continue
            key_issues += [(key, reason, line) for key, reason in issues]
            lines.append(chunk.index + offset)
            for key in self.json_keys:
                value = record.get(key)
                texts[key].append(value if isinstance(value, str) else None)
        per_output = [self._encode_texts(texts[key]) for key in self.json_keys]
        tokens, lengths, per_doc = zip(*per_output)
        return EncodedChunk(list(tokens), list(lengths), list(per_doc), len(lines), skipped, chunk.source,
                            np.asarray(lines, dtype=np.int64), key_issues)

    def _encode_texts(self, texts: list[str | None]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Documents -> (flat tokens, sequence lengths, sequences per document), as Megatron-LM's encoder: every
        sentence tokenized on its own, empty ones dropped, eod after the last."""
        if self.splitter is not None:
            sentences = [split_document(self.splitter, t) if t is not None else [] for t in texts]
        else:
            sentences = [[t] if t is not None else [] for t in texts]
        encoded = iter(self.tokenizer.tokenize_batch([s for doc in sentences for s in doc]))  # one batch call
        kept: list[list[int]] = []
        per_doc = np.zeros(len(texts), dtype=np.int32)
        for d, doc in enumerate(sentences):
            start = len(kept)
            kept += [ids for ids in (next(encoded) for _ in doc) if ids]
            if self.append_eod and len(kept) > start:
                kept[-1] = list(kept[-1]) + [self.tokenizer.eod]
            per_doc[d] = len(kept) - start
        lengths = np.fromiter(map(len, kept), dtype=np.int32, count=len(kept))
        flat = np.fromiter(chain.from_iterable(kept), dtype=self.dtype, count=int(lengths.sum()))
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


def token_dtype(vocab_size: int):
    from megatron.core.datasets.indexed_dataset import DType

    return DType.optimal_dtype(vocab_size)  # uint16 below 65500, else int32


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
                os.replace(prefix + ".bin" + self.tag, temp_prefix + ".bin")  # name it as a prefix for the sidecar
                os.replace(prefix + ".idx" + self.tag, temp_prefix + ".idx")
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
            os.replace(temp_prefix + ".bin", prefix + ".bin")
            os.replace(temp_prefix + ".idx", prefix + ".idx")
            os.replace(sidecar, prefix + ".json")

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


# ---------------------------------------------------------------------------------------------------- driver
_worker_encoder: ChunkEncoder | None = None


def _init_worker(encoder: ChunkEncoder):
    global _worker_encoder
    # Ctrl-C and SIGTERM are handled once, by the main process, which then terminates the pool (SIGTERM keeps its
    # default action here so that works, and a worker killed that way exits without a traceback).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _worker_encoder = encoder


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


def _shut_down(pool, timeout_s: float = 20.0) -> None:
    """Pool.terminate(), bounded. A worker killed by the same signal as this process (SIGTERM to the process group)
    can die holding the task queue's lock, and terminate() then waits on that lock forever (seen as a preprocess
    that never exited). The workers are gone either way: kill what is left and stop waiting."""
    stopper = threading.Thread(target=pool.terminate, daemon=True)
    stopper.start()
    stopper.join(timeout_s)
    if stopper.is_alive():
        for worker in pool._pool:
            worker.kill()
        pool._terminate.cancel()  # multiprocessing's exit hook would run the same blocked terminate() again
        return
    pool.join()


def _raise_terminated(signum, frame):
    raise Terminated("terminated by SIGTERM")


def preprocess(inputs: str | Sequence[str], output_prefix: str, tokenizer_model: str | None,
               tokenizer_type: str = "auto", json_keys: Sequence[str] = ("text",), append_eod: bool = False,
               mode: str = "pretrain", workers: int = 1, chunk_size: int = 512, system: str | None = None,
               max_chunks_in_flight: int | None = None, log_interval: int = 1000, progress: bool = True,
               split_sentences: bool = False, keep_newlines: bool = False, lang: str = "english",
               partitions: int = 1, keep_sequential_samples: bool = False, vocab_file: str | None = None,
               merge_file: str | None = None) -> PreprocessResult:
    """Tokenize ``inputs`` into indexed datasets (see the module docstring). Raises FileNotFoundError / ValueError /
    OSError with one-line messages for bad paths, arguments, data that yields nothing, or a failed write
    (the previous dataset at the prefix is then unchanged); ``Terminated`` on SIGTERM."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
    if split_sentences and mode != "pretrain":
        raise ValueError("--split-sentences applies to pretraining documents, not --mode " + mode)
    if partitions < 1:
        raise ValueError(f"--partitions must be >= 1, got {partitions}")
    if len(set(json_keys)) != len(json_keys):
        raise ValueError(f"--json-keys has a key twice: {' '.join(json_keys)}")
    sources = expand_inputs(inputs)
    tokenizer = Tokenizer.load(tokenizer_model, tokenizer_type, vocab_file=vocab_file, merge_file=merge_file)
    splitter = SentenceSplitter(lang, keep_newlines) if split_sentences else None
    encoder = ChunkEncoder(tokenizer, tokenizer_type, mode, json_keys, append_eod, system, splitter)
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
    pool = in_flight = outputs = bar = None
    lines_read = 0
    try:
        outputs = _AtomicOutputs(result.prefixes, encoder.dtype, round_robin)
        chunks = iter_chunks(sources, chunk_size, list(json_keys) if mode == "pretrain" else None)
        if workers <= 1:
            encoded_chunks = map(encoder, chunks)
        else:
            in_flight = _InFlightLimit(max_chunks_in_flight or 4 * workers)
            context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
            pool = context.Pool(workers, initializer=_init_worker, initargs=(encoder,))
            encoded_chunks = pool.imap(_encode_in_worker, in_flight.feed(chunks))
        # The bar's monitor thread starts only now: forking workers while another thread may hold a lock (stderr's,
        # tqdm's) can leave a worker waiting on it forever.
        bar = _progress_bar(progress, log_interval)
        for encoded in encoded_chunks:  # in input order: the output is deterministic
            outputs.add(encoded)
            _count(result, encoded)
            if mode == "pretrain":
                for prefix, per_doc in zip(result.prefixes, encoded.sequences_per_document):
                    result.empty_documents[prefix] += int((per_doc == 0).sum())
            lines_read += encoded.documents + len(encoded.skipped)
            if in_flight is not None:
                in_flight.chunk_written()
            bar.update(encoded.documents + len(encoded.skipped))
            bar.set_postfix_str(_rates(result, start), refresh=False)
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
        if pool is not None:
            in_flight.close()
            _shut_down(pool)
        if bar is not None:
            bar.close()
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)
    result.seconds = time.perf_counter() - start
    return result


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
    from tqdm import tqdm

    return tqdm(unit=" lines", disable=not enabled, miniters=log_interval, mininterval=1.0, dynamic_ncols=True)
