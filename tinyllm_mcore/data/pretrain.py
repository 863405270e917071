"""Pretraining datasets: megatron-core's GPTDataset over indexed files written by tools/preprocess_data.py, blended
and split by BlendedMegatronDatasetBuilder (indexing, shuffling, blending and caching are all megatron-core's).

Samples are GPTDataset's: ``tokens``, ``labels`` (next tokens), ``loss_mask``, ``position_ids``, each of length
``seq_length``; no ``attention_mask`` (causal masking is left to the attention kernel).
"""
from __future__ import annotations

from typing import Sequence

from tinyllm_mcore.data.prefixes import checked_blend
from tinyllm_mcore.tokenizer.core import Tokenizer


def check_splits_not_empty(prefixes: Sequence[str], split_matrix, num_samples: Sequence[int]) -> None:
    """megatron-core loops forever when a split asked for samples holds no documents: fail clearly instead. The
    bounds are computed the way BlendedMegatronDatasetBuilder computes them."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    for prefix in prefixes:
        documents = len(IndexedDataset(prefix))
        for name, bounds, samples in zip(("train", "valid", "test"), split_matrix, num_samples):
            if not samples or bounds is None:
                continue
            begin, end = (int(round(b * float(documents))) for b in bounds)
            if end <= begin:
                raise ValueError(f"data prefix {prefix}: the {name} split is empty ({documents} documents, split "
                                 f"{bounds}) but {samples} {name} samples were requested; change --split or ask "
                                 f"for 0 {name} samples")


def build_pretrain_datasets(data_path: list[str] | None, split: str, seq_length: int, seed: int,
                            tokenizer: Tokenizer, num_samples: tuple[int, int, int], mock: bool = False,
                            cache_dir: str | None = None):
    """(train, valid, test) GPTDatasets (MockGPTDatasets with ``mock``); a split is None when its share of ``split``
    or its entry of ``num_samples`` is 0.

    Works with and without torch.distributed: when it is initialized, rank 0 builds (and caches, with ``cache_dir``)
    the indices first and the other ranks follow, so this must then be called on every rank.
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset

    blend = None
    if not mock:
        blend = checked_blend(data_path)  # (prefixes, weights or None), as GPTDatasetConfig takes it
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=blend,
        split=split,
        path_to_cache=cache_dir,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
    )
    # A split asked for no samples is not built (returned as None): megatron-core would otherwise index it anyway,
    # and loop forever if it happens to hold no documents.
    config.split_matrix = [bounds if samples else None for bounds, samples in zip(config.split_matrix, num_samples)]
    if not mock:
        check_splits_not_empty(blend[0], config.split_matrix, num_samples)
    dataset_class = MockGPTDataset if mock else GPTDataset
    builder = BlendedMegatronDatasetBuilder(dataset_class, list(num_samples), lambda: True, config)
    train, valid, test = builder.build()
    return train, valid, test
