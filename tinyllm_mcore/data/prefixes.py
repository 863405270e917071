"""The one parse and check of data prefixes: megatron's `--data-path` blend and the .bin/.idx pair of an indexed prefix.

A prefix names the pair `PREFIX.bin` (tokens) + `PREFIX.idx` (the index) that tools/preprocess_data.py writes as
`{output_prefix}_{key}_document`. Pretraining's `--data-path` is a blend of prefixes: `p1 p2 ...` (weighted by their
sizes, as megatron does) or `w1 p1 w2 p2 ...`; SFT's `--sft-data` and the preference stages' `--preference-data`
take prefixes or jsonl files. Every bad input is one line naming the flag and the file (or word) at fault; this
module reads no file contents and imports no megatron, so stages check their paths before any heavy work.
"""
from __future__ import annotations

import glob
import math
import os
from typing import Sequence

SUFFIXES = (".bin", ".idx")


def parse_blend(data_path: Sequence[str] | None, flag: str = "--data-path") -> tuple[list[str], list[float] | None]:
    """`p1 p2 ...` -> ([p1, p2, ...], None); `w1 p1 w2 p2 ...` -> ([p1, p2, ...], [w1, w2, ...]): megatron's
    `get_blend_from_list` result. The form is weighted when the first word is a number; then every prefix needs a
    positive weight before it, and an unweighted list holds no numbers."""
    words = list(data_path or ())
    if not words:
        raise ValueError(f"{flag}: no data prefix given")
    if _number(words[0]) is None:
        for word in words:
            if _number(word) is not None:
                raise ValueError(f"{flag}: {word!r} looks like a weight, but {words[0]!r} has none: give every "
                                 "prefix a weight before it ('w1 p1 w2 p2 ...') or none ('p1 p2 ...')")
        return words, None
    if len(words) % 2:
        raise ValueError(f"{flag} {' '.join(words)}: a weighted blend is 'weight prefix' pairs, and {len(words)} "
                         "words are not pairs")
    weights, prefixes = [], []
    for weight, prefix in zip(words[0::2], words[1::2]):
        value = _number(weight)
        if value is None:
            raise ValueError(f"{flag}: {weight!r} stands where the weight of {prefix!r} belongs ('w1 p1 w2 p2 ...')")
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{flag}: the weight of {prefix} is {weight}; weights must be positive numbers")
        if _number(prefix) is not None:
            raise ValueError(f"{flag}: {prefix!r} stands where a prefix belongs (after the weight {weight})")
        weights.append(value)
        prefixes.append(prefix)
    return prefixes, weights


def check_prefix(prefix: str, flag: str) -> None:
    """`prefix` is an indexed prefix: PREFIX.bin and PREFIX.idx both exist."""
    for suffix in SUFFIXES:
        if prefix.endswith(suffix) and os.path.isfile(prefix):
            raise ValueError(f"{flag} {prefix}: give the prefix without {suffix} "
                                    f"({prefix[:-len(suffix)]})")
    missing = [suffix for suffix in SUFFIXES if not os.path.isfile(prefix + suffix)]
    if missing:
        # a common slip: the --output-prefix given to preprocess_data instead of the prefix it wrote
        written = sorted(name[:-len(".idx")] for name in glob.glob(glob.escape(prefix) + "_*_document.idx"))
        hint = f"did you mean {' or '.join(written)}?" if written else \
            "tools/preprocess_data.py writes {output_prefix}_{key}_document.bin and .idx"
        raise FileNotFoundError(f"{flag} {prefix}: {prefix}{' and '.join(missing)} not found ({hint})")


def checked_blend(data_path: Sequence[str] | None, flag: str = "--data-path") -> tuple[list[str], list[float] | None]:
    """parse_blend, then check_prefix on every prefix (in order: the first bad one is named)."""
    prefixes, weights = parse_blend(data_path, flag)
    for prefix in prefixes:
        check_prefix(prefix, flag)
    return prefixes, weights


def is_prefix(source: str) -> bool:
    """`source` names an indexed prefix (its .bin or .idx exists), not a jsonl file."""
    return any(os.path.isfile(source + suffix) for suffix in SUFFIXES)


def _number(word: str) -> float | None:
    try:
        return float(word)
    except ValueError:
        return None
