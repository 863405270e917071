"""Preference pairs for DPO and reward models: ``{"prompt", "chosen", "rejected", "system"?}`` jsonl, or a prefix
written by ``tools/preprocess_data.py --mode preference``.

Both answers follow the same chat prompt. A sample holds the SFT sample keys (see ``tinyllm_mcore/data/sft_samples.py``) with
a leading dimension 2 — index 0 the chosen, 1 the rejected sequence — so a pair always stays in one micro-batch.
``loss_mask`` covers the answer tokens and their eos only, which is what DPO's log-probability sums and the reward
model's last-token pick need. Too-long pairs are truncated (answers cut from the end) or dropped (``overflow``);
pairs whose prompt leaves no room for an answer are dropped. Degenerate pairs — chosen and rejected the same tokens
(``dropped_identical``), or the same once truncated to ``seq_length`` (``dropped_identical_after_truncation``) — are
dropped: their DPO gradient is pure noise (the margin is 0 whatever the weights) and they could only count as
ties. All of it is counted in ``stats``. (DPO's ``rewards/accuracy`` counts a tie, margin exactly 0, as not
accurate: at the first step, with policy = reference, it is therefore 0.)
"""
from __future__ import annotations

import logging
from collections import Counter
from typing import Sequence

import numpy as np
import torch

from tinyllm_mcore.data.conversations import ConversationStore, load_conversations
from tinyllm_mcore.data.sft_samples import OVERFLOW_POLICIES, build_split_datasets, empty_sample, fill_sample_row, shuffled_range
from tinyllm_mcore.tokenizer.core import Tokenizer

logger = logging.getLogger(__name__)
CHOSEN, REJECTED = 0, 1


class PreferenceDataset(torch.utils.data.Dataset):
    """``source``: jsonl, a ``--mode preference`` prefix or a loaded ``ConversationStore``; ``split_range`` selects a
    fraction of the pairs after the seeded shuffle (as in ``SFTDataset``)."""

    def __init__(self, source: str | ConversationStore, tokenizer: Tokenizer, seq_length: int,
                 overflow: str = "truncate", system: str | None = None, seed: int | None = 1234,
                 split_range: tuple[float, float] = (0.0, 1.0)):
        if overflow not in OVERFLOW_POLICIES:
            raise ValueError(f"overflow must be one of {OVERFLOW_POLICIES}, got {overflow!r}")
        self.tokenizer, self.seq_length = tokenizer, seq_length
        self.pairs = source if isinstance(source, ConversationStore) else \
            load_conversations(source, tokenizer, "preference", system)
        source = self.pairs.source
        self.stats = Counter({f"skipped_{reason}": n for reason, n in self.pairs.skipped.items()})
        order = shuffled_range(len(self.pairs), seed, split_range)
        self.stats["pairs"] = len(order)

        lengths = self.pairs.sequence_lengths.reshape(-1, 3)[order]  # prompt, chosen, rejected per pair
        longest = lengths[:, 0] + lengths[:, 1:].max(axis=1)
        too_long = longest > seq_length
        no_room = lengths[:, 0] >= seq_length  # not one answer token would fit
        if overflow == "drop":
            keep = ~too_long
            self.stats["dropped_too_long"] = int(too_long.sum())
        else:
            keep = ~no_room
            self.stats["truncated"] = int((too_long & ~no_room).sum())
            self.stats["dropped_prompt_too_long"] = int(no_room.sum())
        identical, identical_after_truncation = self._identical_pairs(order[keep], lengths[keep], seq_length)
        self.stats["dropped_identical"] = int(identical.sum())
        self.stats["dropped_identical_after_truncation"] = int(identical_after_truncation.sum())
        self.indices = order[keep][~(identical | identical_after_truncation)]
        self.stats["samples"] = len(self.indices)
        if not len(self.indices):
            raise ValueError(f"{source}: no usable preference pair ({self.summary()})")
        log = logger.warning if any(v and k.startswith(("skipped", "dropped", "truncated")) for k, v in self.stats.items()) \
            else logger.info
        log("preference data %s: %s", source, self.summary())

    def _identical_pairs(self, pairs: np.ndarray, lengths: np.ndarray, seq_length: int):
        """(identical, identical only after truncation) flags for ``pairs``; tokens are read only for pairs whose
        two answers have the same length as trained (the only ones that can be equal)."""
        room = seq_length - lengths[:, 0]
        kept_chosen, kept_rejected = np.minimum(lengths[:, 1], room), np.minimum(lengths[:, 2], room)
        identical = np.zeros(len(pairs), dtype=bool)
        after_truncation = np.zeros(len(pairs), dtype=bool)
        for i in np.flatnonzero(kept_chosen == kept_rejected):
            _, chosen, rejected = self.pairs.segments(int(pairs[i]))
            if np.array_equal(chosen, rejected):
                identical[i] = True
            elif np.array_equal(chosen[:room[i]], rejected[:room[i]]):
                after_truncation[i] = True
        return identical, after_truncation

    def summary(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in sorted(self.stats.items()) if v)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, idx: int) -> dict:
        prompt, chosen, rejected = self.pairs.segments(self.indices[idx])
        pair = empty_sample(self.seq_length, self.tokenizer.pad, leading=(2,))
        for which, answer in ((CHOSEN, chosen), (REJECTED, rejected)):
            ids = np.concatenate([prompt, answer])[:self.seq_length]
            trainable = np.concatenate([np.zeros(len(prompt), np.float32), np.ones(len(answer), np.float32)])
            row = {key: value[which] for key, value in pair.items()}  # views into the pair tensors
            fill_sample_row(row, 0, ids, trainable[:self.seq_length], segment_id=1)
        return pair


def build_preference_datasets(paths: str | Sequence[str], tokenizer: Tokenizer, seq_length: int,
                              split: str = "969,30,1", seed: int = 1234, overflow: str = "truncate",
                              system: str | None = None):
    """(train, valid, test) preference datasets over jsonl files and/or ``--mode preference`` prefixes."""
    return build_split_datasets(PreferenceDataset, paths, tokenizer, "preference", split, seed, system,
                                seq_length=seq_length, overflow=overflow)


def preference_datasets(ctx):
    """--preference-data (jsonl or indexed prefixes) split into train/valid/test pair datasets."""
    args = ctx.args
    if not args.preference_data:
        raise ValueError("give --preference-data FILE.jsonl or indexed PREFIX")
    if ctx.tokenizer is None:
        raise ValueError(f"{ctx.stage_name} needs --tokenizer-model (the chat format's role markers come from the "
                         "tokenizer)")
    return build_preference_datasets(args.preference_data, tokenizer=ctx.tokenizer, seq_length=args.seq_length,
                                     split=args.split, seed=args.seed)
