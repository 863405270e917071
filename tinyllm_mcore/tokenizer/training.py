"""Train a SentencePiece BPE tokenizer the way the seed did, from a streamed corpus.

The seed trained ``chinese_spm_20000`` with: BPE, vocab 20000, character_coverage 0.9995, split_digits,
byte_fallback, allow_whitespace_only_pieces, max_sentence_length 24000. Differences, on purpose:

* The corpus is streamed into SentencePiece (``sentence_iterator``) and SentencePiece keeps a uniform reservoir sample
  of ``input_sentence_size`` sentences, so a corpus of any size trains in bounded memory.
* Documents are fed line by line (what the seed's .txt input amounted to); "\\n" is covered by byte fallback.
* The chat role markers are reserved as control pieces (single ids, never produced from plain text).
* Normalization is ``identity`` without whitespace squashing by default, so decode(encode(text)) == text and the
  "\\n" of the chat format survives (the seed's default nmt_nfkc rewrote full-width punctuation and newlines).
"""
from __future__ import annotations

import gzip
import json
import os
import re
import tempfile
import zlib
from collections import Counter
from pathlib import Path
from typing import Iterator, Sequence

import sentencepiece as spm

from tinyllm_mcore.data.corpus import JSONL_SUFFIXES, PARQUET_SUFFIXES, TEXT_SUFFIXES, expand_inputs, iter_chunks
from tinyllm_mcore.tokenizer.core import ROLE_TOKENS, Tokenizer
from tinyllm_mcore.tokenizer.hf_folder import write_tokenizer_folder

SPECIAL_PIECES = 3  # <unk> <s> </s>
BYTE_PIECES = 256  # byte fallback


def _texts(sources: Sequence[Path], json_key: str, skipped: Counter, examples: dict) -> Iterator[str]:
    """Every non-empty text of ``sources`` (jsonl/parquet/HF records' ``json_key``, each line of a .txt file);
    unusable records are counted by reason in ``skipped`` (first "file:line" per reason in ``examples``)."""
    def skip(reason: str, where: str) -> None:
        skipped[reason] += 1
        examples.setdefault(reason, where)

    for source in sources:
        if source.name.endswith(TEXT_SUFFIXES):
            yield from _text_lines(source, skip)
            continue
        for chunk in iter_chunks([source], 1024, columns=[json_key]):
            items = chunk.records if chunk.records is not None else chunk.lines
            for offset, item in enumerate(items):
                where = f"{chunk.source}:{chunk.first_line + offset}"
                if chunk.records is None:
                    if not item.strip():
                        continue
                    try:
                        item = json.loads(item)
                    except ValueError:  # also invalid UTF-8
                        skip("bad_json", where)
                        continue
                if not isinstance(item, dict):
                    skip("not_object", where)
                elif json_key not in item:
                    skip("missing_key", where)
                elif not isinstance(item[json_key], str):
                    skip("not_string", where)
                elif not item[json_key].strip():
                    skip("empty_text", where)
                else:
                    yield item[json_key]


def _text_lines(source: Path, skip) -> Iterator[str]:
    opener = gzip.open if source.name.endswith(".gz") else open
    try:
        with opener(source, "rb") as f:
            for number, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:  # never train on U+FFFD replacements
                    skip("invalid_utf8", f"{source}:{number}")
                    continue
                if line.strip():
                    yield line.rstrip("\n")
    except (EOFError, OSError, zlib.error) as e:  # a truncated .gz or an I/O error
        raise ValueError(f"reading {source}: {e or type(e).__name__}") from None


def _sentences(texts: Iterator[str], max_sentence_bytes: int) -> Iterator[str]:
    for text in texts:
        for line in text.split("\n"):
            # SentencePiece drops over-long sentences; cut them instead so long lines still contribute.
            while line:
                piece, line = line[:max_sentence_bytes // 4], line[max_sentence_bytes // 4:]
                if piece.strip():
                    yield piece


def train_tokenizer(inputs: str | Sequence[str], output_dir: str | os.PathLike, vocab_size: int = 20000,
                    json_key: str = "text", input_sentence_size: int = 2_000_000,
                    character_coverage: float = 0.9995, max_sentence_length: int = 24000,
                    extra_special_tokens: Sequence[str] = (), normalization: str = "identity",
                    num_threads: int | None = None, seed_sentencepiece_size: int = 1_000_000,
                    hard_vocab_limit: bool = True, skipped: Counter | None = None) -> Tokenizer:
    """Train ``{output_dir}/tokenizer.model`` (+ HF tokenizer files) and return it loaded as a ``Tokenizer``.

    Unusable records are counted by reason into ``skipped`` (when given). Bad input raises ValueError with one line.
    The files are written to a temporary folder and moved into ``output_dir`` only when training succeeded."""
    control = list(ROLE_TOKENS) + [t for t in extra_special_tokens if t not in ROLE_TOKENS]
    fixed = SPECIAL_PIECES + len(control) + BYTE_PIECES
    if vocab_size <= fixed:
        raise ValueError(f"--vocab-size {vocab_size} is too small: the special, role and byte-fallback pieces alone "
                         f"take {fixed}")
    sources = expand_inputs(inputs, suffixes=JSONL_SUFFIXES + TEXT_SUFFIXES + PARQUET_SUFFIXES)
    skipped = Counter() if skipped is None else skipped
    examples: dict[str, str] = {}
    sentences = _sentences(_texts(sources, json_key, skipped, examples), max_sentence_length)
    reading_error: list[Exception] = []  # SentencePiece wraps what the iterator raises into its own message

    def remember_errors(it: Iterator[str]) -> Iterator[str]:
        try:
            yield from it
        except ValueError as e:
            reading_error.append(e)
            raise

    sentences = remember_errors(sentences)
    first = next(sentences, None)  # SentencePiece reports an empty corpus as an INTERNAL check failure
    if first is None:
        detail = ", ".join(f"{n} {reason} (e.g. {examples[reason]})" for reason, n in sorted(skipped.items()))
        raise ValueError(f"no text to train on in {', '.join(map(str, sources))}"
                         f"{' (skipped: ' + detail + ')' if detail else ''}")

    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"--output-dir {output_dir} exists and is not a directory")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    # SentencePiece writes its model into a scratch folder; write_tokenizer_folder then puts it and the Hugging Face
    # files into output_dir in one step (whatever else output_dir holds stays).
    with tempfile.TemporaryDirectory(prefix=f".{output_dir.name}.train-", dir=output_dir.parent) as scratch:
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=_chain_first(first, sentences),
                model_prefix=str(Path(scratch) / "tokenizer"),
                model_type="bpe",
                vocab_size=vocab_size,
                character_coverage=character_coverage,
                split_digits=True,
                byte_fallback=True,
                allow_whitespace_only_pieces=True,
                unk_surface=r" \342\201\207 ",
                max_sentence_length=max_sentence_length,
                input_sentence_size=input_sentence_size,
                shuffle_input_sentence=True,
                seed_sentencepiece_size=seed_sentencepiece_size,
                control_symbols=control,
                normalization_rule_name=normalization,
                remove_extra_whitespaces=normalization != "identity",
                unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                hard_vocab_limit=hard_vocab_limit,
                num_threads=num_threads or os.cpu_count() or 1,
                minloglevel=2,
            )
        except RuntimeError as e:  # "INTERNAL: src/x.cc(744) [check] message": keep the message
            if reading_error:
                raise reading_error[0] from None
            message = re.sub(r"^\w+: \S+\(\d+\) \[.*?\] ?", "", str(e).strip()) or str(e).strip()
            raise ValueError(f"SentencePiece cannot train on {', '.join(map(str, sources))}: {message}") from None
        write_tokenizer_folder(Tokenizer.load(Path(scratch) / "tokenizer.model"), output_dir)
    return Tokenizer.load(output_dir / "tokenizer.model")


def _chain_first(first: str, rest: Iterator[str]) -> Iterator[str]:
    yield first
    yield from rest
