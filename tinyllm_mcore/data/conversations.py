"""Tokenized chat data for the SFT and preference datasets, from either source:

* an indexed prefix written by ``tools/preprocess_data.py --mode sft|preference`` (``{prefix}_sft_document`` /
  ``{prefix}_preference_document``; tokenized once, memory-mapped), or
* a jsonl file, tokenized here at construction with the very same encoder (fine for small sets).

Either way a conversation is a document made of segments (``tinyllm_mcore/data/preprocess.py`` documents the layout)
and malformed records are counted by reason in ``skipped``, never dropped silently.
"""
from __future__ import annotations

import logging
import os
from collections import Counter

import numpy as np

from tinyllm_mcore.data.corpus import expand_inputs, iter_chunks
from tinyllm_mcore.data.prefixes import check_prefix, is_prefix
from tinyllm_mcore.data.preprocess import ChunkEncoder
from tinyllm_mcore.tokenizer.core import Tokenizer

logger = logging.getLogger(__name__)


class ConversationStore:
    """Documents of token segments: ``segments(i)`` -> list of int64 arrays; ``lengths`` = tokens per document."""

    def __init__(self, tokens, sequence_lengths: np.ndarray, document_indices: np.ndarray, skipped: Counter,
                 source: str):
        self._tokens = tokens  # flat np array, or an IndexedDataset (read sequence by sequence)
        self.sequence_lengths = np.asarray(sequence_lengths, dtype=np.int64)
        self.document_indices = np.asarray(document_indices, dtype=np.int64)
        self._sequence_starts = np.concatenate([[0], np.cumsum(self.sequence_lengths)[:-1]]).astype(np.int64)
        self.skipped = skipped
        self.source = source
        starts = self.document_indices[:-1]
        nonempty = starts < self.document_indices[1:]
        self.lengths = np.zeros(len(starts), dtype=np.int64)
        if len(self.sequence_lengths):
            self.lengths[nonempty] = np.add.reduceat(self.sequence_lengths, starts[nonempty])

    def __len__(self) -> int:
        return len(self.document_indices) - 1

    def segments(self, doc: int) -> list[np.ndarray]:
        first, last = self.document_indices[doc], self.document_indices[doc + 1]
        if isinstance(self._tokens, np.ndarray):
            return [self._tokens[self._sequence_starts[j]:self._sequence_starts[j] + self.sequence_lengths[j]]
                    .astype(np.int64) for j in range(first, last)]
        return [np.asarray(self._tokens[int(j)], dtype=np.int64) for j in range(first, last)]


def load_conversations(source: str | os.PathLike, tokenizer: Tokenizer, mode: str,
                       system: str | None = None) -> ConversationStore:
    """``source``: an indexed prefix (``.idx``/``.bin`` beside it) or jsonl file(s). ``mode``: sft | preference."""
    source = str(source)
    if is_prefix(source):
        return _load_indexed(source, tokenizer, mode)

    encoder = ChunkEncoder(tokenizer, "auto", mode, ["text"], False, system)
    tokens, lengths, per_doc, skipped = [], [], [], Counter()
    for chunk in iter_chunks(expand_inputs(source), chunk_size=1024):
        encoded = encoder(chunk)
        tokens.append(encoded.tokens[0])
        lengths.append(encoded.sequence_lengths[0])
        per_doc.append(encoded.sequences_per_document[0])
        skipped.update(reason for reason, _ in encoded.skipped)
    per_doc = np.concatenate(per_doc) if per_doc else np.zeros(0, dtype=np.int64)
    document_indices = np.concatenate([[0], np.cumsum(per_doc)])
    store = ConversationStore(np.concatenate(tokens) if tokens else np.zeros(0, np.int64),
                              np.concatenate(lengths) if lengths else np.zeros(0, np.int64),
                              document_indices, skipped, source)
    if skipped:
        logger.warning("%s: skipped %d malformed records: %s", source, sum(skipped.values()), dict(skipped))
    return store


# How many sequences a document of each mode holds (tools/preprocess_data.py's layouts, docs/data.md).
_LAYOUTS = {"sft": "an even number (prompt, answer, ...)", "preference": "3 (prompt, chosen, rejected)"}


def _load_indexed(prefix: str, tokenizer: Tokenizer, mode: str) -> ConversationStore:
    """A ``--mode sft|preference`` prefix, refused with one line when it is empty, of another mode or unreadable."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from tinyllm_mcore.data.vocab_contract import check_prefix_vocab, read_sidecar

    check_prefix(prefix, f"--{mode}-data")
    # The sidecar (when preprocessing wrote one) names the mode and the tokenizer; the layout check below also
    # catches data without one.
    written_as = (read_sidecar(prefix) or {}).get("mode", mode)
    if written_as != mode:
        where = "--data-path" if written_as == "pretrain" else f"--{written_as}-data"
        raise ValueError(f"data prefix {prefix} is a --mode {written_as} dataset, not --mode {mode}: give it as "
                         f"{where}")
    check_prefix_vocab(prefix, tokenizer.vocab_size, getattr(tokenizer, "identity", None), mode)
    if os.path.getsize(prefix + ".bin") == 0:  # megatron cannot memory-map an empty file
        raise ValueError(f"data prefix {prefix}: empty dataset (0 tokens); re-run preprocessing with records that "
                         "have an answer")
    try:
        indexed = IndexedDataset(prefix)
    except Exception as e:  # a truncated or foreign .idx: megatron's reader asserts or fails in numpy
        raise ValueError(f"data prefix {prefix}: unreadable .idx/.bin pair ({type(e).__name__}: {e})") from None
    per_document = np.diff(indexed.document_indices)
    if mode == "sft":
        wrong = (per_document < 2) | (per_document % 2 == 1)
    else:
        wrong = per_document != 3
    if wrong.any():
        other = {"sft": "preference", "preference": "sft"}[mode]
        looks_other = (per_document == 3).all() if other == "preference" else \
            ((per_document >= 2) & (per_document % 2 == 0)).all()
        first = int(np.flatnonzero(wrong)[0])
        hint = f": a --mode {other} prefix? Give it as --{other}-data" if looks_other else ""
        raise ValueError(f"data prefix {prefix} is not a --mode {mode} dataset: document {first} has "
                         f"{per_document[first]} sequences, {mode} documents have {_LAYOUTS[mode]}{hint}")
    return ConversationStore(indexed, indexed.sequence_lengths, indexed.document_indices, Counter(), prefix)
