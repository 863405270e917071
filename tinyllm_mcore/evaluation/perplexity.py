"""Held-out loss and perplexity on megatron indexed data (``--data-path`` prefixes) or jsonl text.

Documents are concatenated into one token stream (jsonl texts get eod appended, as ``tools/preprocess_data.py
--append-eod`` does) and cut into consecutive windows of ``seq_length + 1`` tokens, each predicting its last
``seq_length`` tokens — the samples GPTDataset trains on, without shuffling. The loss is the mean next-token
cross-entropy over every predicted token, over the logical vocabulary (what the HF export computes).
"""
from __future__ import annotations

import json
import math
import time
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from tinyllm_mcore.evaluation.backends import CausalLM, pad_rows


def indexed_documents(prefixes: Sequence[str]) -> Iterator[np.ndarray]:
    """Token arrays of every sequence in megatron IndexedDatasets (``prefix.bin`` / ``prefix.idx``)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from tinyllm_mcore.data.prefixes import check_prefix

    for prefix in prefixes:  # all of them before the first is read
        check_prefix(prefix, "--data-path")
    for prefix in prefixes:
        dataset = IndexedDataset(prefix)
        for i in range(len(dataset)):
            yield np.asarray(dataset[i])


def jsonl_documents(paths: Sequence[str], encode, eod: int, json_key: str = "text",
                    skipped: dict | None = None) -> Iterator[list[int]]:
    """Encoded texts of jsonl files (+ eod); lines that are not JSON objects with a string ``json_key`` are skipped
    and counted in ``skipped``."""
    skipped = skipped if skipped is not None else {}
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    text = record[json_key]
                    if not isinstance(text, str):
                        raise TypeError
                except (json.JSONDecodeError, KeyError, TypeError):
                    skipped["bad line"] = skipped.get("bad line", 0) + 1
                    continue
                yield list(encode(text)) + [eod]


def windows(documents: Iterable[Sequence[int]], seq_length: int, max_tokens: int | None = None) -> Iterator[list[int]]:
    """Consecutive windows of seq_length + 1 tokens over the concatenated documents (the last may be shorter)."""
    buffer: list[int] = []
    predicted = 0
    for doc in documents:
        buffer.extend(int(t) for t in doc)
        while len(buffer) >= seq_length + 1:
            if max_tokens is not None and predicted >= max_tokens:
                return
            yield buffer[: seq_length + 1]
            predicted += seq_length
            buffer = buffer[seq_length:]
    if len(buffer) >= 2 and (max_tokens is None or predicted < max_tokens):
        yield buffer


def evaluate_perplexity(lm: CausalLM, documents: Iterable[Sequence[int]], *, seq_length: int | None = None,
                        batch_size: int = 4, max_tokens: int | None = None) -> dict:
    seq_length = min(seq_length or lm.max_length, lm.max_length)
    start = time.perf_counter()
    nll_sum, count, n_windows = 0.0, 0, 0
    batch: list[list[int]] = []

    def flush():
        nonlocal nll_sum, count
        rows = [w[:-1] for w in batch]
        tokens = pad_rows(rows)
        positions = torch.arange(tokens.size(1)).unsqueeze(0).expand(len(rows), -1)
        logits = lm.logits_at(tokens, positions)
        for b, w in enumerate(batch):
            n = len(w) - 1
            targets = torch.as_tensor(w[1:], dtype=torch.long)
            nll_sum += float(torch.nn.functional.cross_entropy(logits[b, :n], targets, reduction="sum"))
            count += n
        batch.clear()

    for window in windows(documents, seq_length, max_tokens):
        batch.append(window)
        n_windows += 1
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    if count == 0:
        raise ValueError("no tokens to evaluate (empty data?)")
    loss = nll_sum / count
    seconds = time.perf_counter() - start
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": count, "windows": n_windows,
            "seq_length": seq_length, "seconds": seconds, "tokens_per_second": count / seconds if seconds else None}
