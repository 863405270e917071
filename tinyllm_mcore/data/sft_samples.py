"""SFT dataset: chat conversations -> fixed-length samples, loss only on assistant answers, optionally packed.

Sample (each tensor of length ``seq_length``)::

    tokens        int64    conversation ids, padded with the tokenizer's pad id
    labels        int64    labels[i] = tokens[i + 1] within the same conversation; 0 at each conversation's last
                           position and on padding
    loss_mask     float32  1 where labels[i] is an answer token or the eos closing it, else 0 (system, user, role
                           markers, padding)
    position_ids  int64    0, 1, 2, ... restarting at every packed conversation
    segment_ids   int64    1..n: which packed conversation a position belongs to; 0 = padding

With packing, whole conversations are placed one after another (next-fit, in a seeded shuffled order) until the next
one does not fit. ``packed_attention_mask(segment_ids)`` then gives the block-diagonal causal mask, so packed
conversations never see each other and per-conversation losses equal their unpacked values.

Conversations longer than ``seq_length`` are truncated (``overflow="truncate"``) or dropped (``"drop"``); both are
counted in ``stats``, as are conversations left with no answer token and malformed records. A conversation with an
empty (or whitespace-only) answer is skipped and counted (``skipped_empty_answer``): it would teach "eos at once".
"""
from __future__ import annotations

import logging
import os
from collections import Counter
from typing import Sequence

import numpy as np
import torch

from tinyllm_mcore.data.conversations import ConversationStore, load_conversations
from tinyllm_mcore.tokenizer.core import Tokenizer

logger = logging.getLogger(__name__)
OVERFLOW_POLICIES = ("truncate", "drop")


def packed_attention_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """[b, s] segment ids -> [b, 1, s, s] bool attention mask, megatron's convention: True = masked out.

    A position attends to itself and earlier positions of its own segment only; padding keys (segment 0) are masked.
    Padding queries keep only their own diagonal, so no softmax row is fully masked (a fully masked row gives NaN in
    most kernels, and NaN * 0 loss is still NaN).
    """
    seq = segment_ids.shape[-1]
    same_segment = segment_ids[:, :, None] == segment_ids[:, None, :]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=segment_ids.device).tril()
    real_query = (segment_ids != 0)[:, :, None]
    allowed = same_segment & causal & real_query
    allowed |= torch.eye(seq, dtype=torch.bool, device=segment_ids.device)
    return ~allowed[:, None]


def trainable_flags(segments: list[np.ndarray]) -> np.ndarray:
    """Per token: 1 inside answer segments (odd segments), 0 inside prompt segments."""
    return np.concatenate([np.full(len(s), i % 2, dtype=np.float32) for i, s in enumerate(segments)])


def fill_sample_row(row: dict, start: int, ids: np.ndarray, trainable: np.ndarray, segment_id: int) -> None:
    """Write one conversation at ``row[...][start:]``: ids, next-token labels, loss mask, positions, segment."""
    n = len(ids)
    row["tokens"][start:start + n] = torch.from_numpy(ids)
    row["labels"][start:start + n - 1] = torch.from_numpy(ids[1:])
    row["loss_mask"][start:start + n - 1] = torch.from_numpy(trainable[1:])
    row["position_ids"][start:start + n] = torch.arange(n)
    row["segment_ids"][start:start + n] = segment_id


def empty_sample(seq_length: int, pad_id: int, leading: tuple = ()) -> dict:
    shape = leading + (seq_length,)
    return {"tokens": torch.full(shape, pad_id, dtype=torch.int64),
            "labels": torch.zeros(shape, dtype=torch.int64),
            "loss_mask": torch.zeros(shape, dtype=torch.float32),
            "position_ids": torch.zeros(shape, dtype=torch.int64),
            "segment_ids": torch.zeros(shape, dtype=torch.int64)}


class SFTDataset(torch.utils.data.Dataset):
    """``source``: jsonl (``{"question", "answer", "system"?}`` or ``{"messages": [...]}``), a prefix written by
    ``tools/preprocess_data.py --mode sft``, or an already loaded ``ConversationStore``. ``split_range`` selects a
    fraction of the conversations after the seeded shuffle (disjoint train/valid/test with the same seed)."""

    def __init__(self, source: str | ConversationStore, tokenizer: Tokenizer, seq_length: int, pack: bool = True,
                 overflow: str = "truncate", seed: int | None = 1234, system: str | None = None,
                 split_range: tuple[float, float] = (0.0, 1.0)):
        if overflow not in OVERFLOW_POLICIES:
            raise ValueError(f"overflow must be one of {OVERFLOW_POLICIES}, got {overflow!r}")
        self.tokenizer, self.seq_length, self.pack, self.overflow = tokenizer, seq_length, pack, overflow
        self.conversations = source if isinstance(source, ConversationStore) else \
            load_conversations(source, tokenizer, "sft", system)
        source = self.conversations.source
        self.stats = Counter({f"skipped_{reason}": n for reason, n in self.conversations.skipped.items()})
        order = shuffled_range(len(self.conversations), seed, split_range)
        self.stats["conversations"] = len(order)
        empty_answer = documents_with_empty_answer(self.conversations)[order]
        self.stats["skipped_empty_answer"] = int(empty_answer.sum())
        order = order[~empty_answer]

        usable = self._select_conversations(order)
        self.lengths = np.minimum(self.conversations.lengths[usable], seq_length)
        self.samples = _next_fit(usable, self.lengths, seq_length) if pack else [[int(c)] for c in usable]
        self.stats["samples"] = len(self.samples)
        if not self.samples:
            raise ValueError(f"{source}: no usable SFT conversation ({self.summary()})")
        log = logger.warning if any(v and k.startswith(("skipped", "dropped", "truncated")) for k, v in self.stats.items()) \
            else logger.info
        log("SFT data %s: %s", source, self.summary())

    def _select_conversations(self, order: np.ndarray) -> np.ndarray:
        """The conversations of ``order`` that survive the overflow policy."""
        too_long = self.conversations.lengths[order] > self.seq_length
        if self.overflow == "drop":
            self.stats["dropped_too_long"] = int(too_long.sum())
            return order[~too_long]
        self.stats["truncated"] = int(too_long.sum())
        keep = np.ones(len(order), dtype=bool)
        for i in np.flatnonzero(too_long):  # truncation may cut away every answer token
            segments = self.conversations.segments(order[i])
            if not trainable_flags(segments)[1:self.seq_length].any():
                keep[i] = False
        self.stats["dropped_no_answer_after_truncation"] = int((~keep).sum())
        return order[keep]

    def summary(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in sorted(self.stats.items()) if v)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, idx: int) -> dict:
        sample = empty_sample(self.seq_length, self.tokenizer.pad)
        start = 0
        for segment_id, conversation in enumerate(self.samples[idx], start=1):
            segments = self.conversations.segments(conversation)
            ids = np.concatenate(segments)[:self.seq_length]
            trainable = trainable_flags(segments)[:self.seq_length]
            fill_sample_row(sample, start, ids, trainable, segment_id)
            start += len(ids)
        return sample


def documents_with_empty_answer(store: ConversationStore) -> np.ndarray:
    """Per conversation: True if one of its answers (odd sequences) is the closing eos alone."""
    lengths = store.sequence_lengths
    per_document = np.diff(store.document_indices)
    position = np.arange(len(lengths)) - np.repeat(store.document_indices[:-1], per_document)
    empty = np.flatnonzero((position % 2 == 1) & (lengths <= 1))
    flags = np.zeros(len(store), dtype=bool)
    flags[np.searchsorted(store.document_indices, empty, side="right") - 1] = True
    return flags


def _next_fit(conversations: np.ndarray, lengths: np.ndarray, seq_length: int) -> list[list[int]]:
    samples, current, used = [], [], 0
    for conversation, length in zip(conversations.tolist(), lengths.tolist()):
        if current and used + length > seq_length:
            samples.append(current)
            current, used = [], 0
        current.append(conversation)
        used += length
    if current:
        samples.append(current)
    return samples


def shuffled_range(count: int, seed: int | None, split_range: tuple[float, float]) -> np.ndarray:
    """Indices ``0..count-1`` permuted with ``seed`` (kept in order when None), then the ``split_range`` slice."""
    order = np.arange(count) if seed is None else np.random.default_rng(seed).permutation(count)
    begin, end = (int(round(fraction * count)) for fraction in split_range)
    return order[begin:end]


def split_ranges(split: str) -> list[tuple[float, float] | None]:
    """Megatron's ``--split "969,30,1"`` -> [(0, .969), (.969, .999), (.999, 1)], None for a zero share
    (megatron-core's own parser)."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix, parse_and_normalize_split)

    return convert_split_vector_to_split_matrix(parse_and_normalize_split(split))


def build_split_datasets(dataset_class, paths: str | Sequence[str], tokenizer: Tokenizer, mode: str, split: str,
                         seed: int, system: str | None, **dataset_kwargs):
    """(train, valid, test) of ``dataset_class`` over ``paths``: each source split by ``split`` after a seeded
    shuffle, sources concatenated. Empty valid/test splits are None; an empty train split is an error."""
    from tinyllm_mcore.data.conversations import load_conversations

    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    stores = [load_conversations(p, tokenizer, mode, system) for p in paths]
    datasets = []
    for name, split_range in zip(("train", "valid", "test"), split_ranges(split)):
        parts = [dataset_class(store, tokenizer, seed=seed, split_range=split_range, **dataset_kwargs)
                 for store in stores if split_range and shuffled_range(len(store), seed, split_range).size]
        if not parts and name == "train":
            raise ValueError(f"the train split of {', '.join(map(str, paths))} is empty (--split {split})")
        datasets.append(None if not parts else parts[0] if len(parts) == 1 else torch.utils.data.ConcatDataset(parts))
    return tuple(datasets)


def build_sft_datasets(paths: str | Sequence[str], tokenizer: Tokenizer, seq_length: int, split: str = "969,30,1",
                       seed: int = 1234, pack: bool = True, overflow: str = "truncate", system: str | None = None):
    """(train, valid, test) SFT datasets over jsonl files and/or ``--mode sft`` prefixes, split by ``split``."""
    return build_split_datasets(SFTDataset, paths, tokenizer, "sft", split, seed, system, seq_length=seq_length,
                                pack=pack, overflow=overflow)
