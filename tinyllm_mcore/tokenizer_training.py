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

import os
from pathlib import Path
from typing import Iterator, Sequence

import sentencepiece as spm

from tinyllm_mcore.data.corpus import JSONL_SUFFIXES, PARQUET_SUFFIXES, TEXT_SUFFIXES, expand_inputs, iter_texts
from tinyllm_mcore.tokenizer import ROLE_TOKENS, Tokenizer, write_hf_tokenizer_files


def _sentences(sources: Sequence[Path], json_key: str, max_sentence_bytes: int) -> Iterator[str]:
    for text in iter_texts(sources, json_key):
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
                    hard_vocab_limit: bool = True) -> Tokenizer:
    """Train ``{output_dir}/tokenizer.model`` (+ HF tokenizer files) and return it loaded as a ``Tokenizer``."""
    sources = expand_inputs(inputs, suffixes=JSONL_SUFFIXES + TEXT_SUFFIXES + PARQUET_SUFFIXES)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    prefix = output_dir / "tokenizer"
    spm.SentencePieceTrainer.train(
        sentence_iterator=_sentences(sources, json_key, max_sentence_length),
        model_prefix=str(prefix),
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
        control_symbols=list(ROLE_TOKENS) + [t for t in extra_special_tokens if t not in ROLE_TOKENS],
        normalization_rule_name=normalization,
        remove_extra_whitespaces=normalization != "identity",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        hard_vocab_limit=hard_vocab_limit,
        num_threads=num_threads or os.cpu_count() or 1,
        minloglevel=1,
    )
    (output_dir / "tokenizer.vocab").unlink(missing_ok=True)  # the .model holds everything
    tokenizer = Tokenizer.load(output_dir / "tokenizer.model")
    write_hf_tokenizer_files(tokenizer, output_dir)
    return tokenizer
