"""Sentence splitting for ``preprocess_data.py --split-sentences`` (Megatron-LM's flag; ``--lang`` picks the splitter).

``--lang chinese`` (also ``zh``): the rule-based splitter below, right for Chinese text (Megatron-LM only has
nltk's punkt, which does not know Chinese punctuation). A sentence ends after

* a run of 。！？；… or their full-width / half-width forms (｡ ．), or
* a run of ASCII ``. ! ? ;`` followed (after any closing quotes) by whitespace, the end of the text or a non-ASCII
  character (so ``3.14``, ``a.com/x?y=1`` and ``e.g.x`` stay whole, ``Hello. 你好`` and ``"好."然后`` split), or
* a line break (titles, list items and paragraphs end without punctuation in Chinese text),

and closing quotes and brackets right after the terminator (”’」』）》〉】〕"' ) ] ］ } ｝) stay with their sentence:
``“你好！”他说。`` → ``“你好！”`` + ``他说。``.

Any other ``--lang`` (``english`` — Megatron-LM's default —, ``german``, …) is an nltk punkt model, used when nltk and
its ``punkt_tab`` data for that language are installed (``python -m nltk.downloader punkt_tab``); otherwise
preprocessing stops with one line saying so.

Whitespace: without ``--keep-newlines`` sentences are stripped (the whitespace between them is dropped, as punkt
does); with it, the whitespace after a sentence — newlines included — stays at its end, so the sentences joined give
the text back.
"""
from __future__ import annotations

import re

CHINESE_LANGS = ("chinese", "zh")

_CLOSERS = "”’」』）)》〉】〕\"'\\]］｝}"
_BOUNDARY = re.compile(
    r"(?:[。！？；｡．…]+|[!?;.]+(?=[" + _CLOSERS + r"]*(?:\s|$|[^\x00-\x7f])))"  # terminators
    r"[" + _CLOSERS + r"]*"                                                       # + closing quotes
    r"|\n")                                                                     # or a line break


def split_chinese(text: str, keep_newlines: bool = False) -> list[str]:
    """``text`` -> sentences (see the module docstring)."""
    pieces, start = [], 0
    for match in _BOUNDARY.finditer(text):
        end = match.end()
        if keep_newlines:  # whitespace after the end belongs to this sentence
            while end < len(text) and text[end].isspace():
                end += 1
        if end > start:
            pieces.append(text[start:end])
            start = end
    if start < len(text):
        pieces.append(text[start:])
    if keep_newlines:
        return pieces
    return [s for s in (p.strip() for p in pieces) if s]


class SentenceSplitter:
    """``split(text) -> list[str]`` for a ``--lang``. Raises ValueError (one line) when the language needs nltk data
    that is not installed."""

    def __init__(self, lang: str = "english", keep_newlines: bool = False):
        self.lang, self.keep_newlines = lang, keep_newlines
        self._punkt = None
        if lang.lower() not in CHINESE_LANGS:
            self._punkt = _load_punkt(lang)

    def split(self, text: str) -> list[str]:
        if self._punkt is None:
            return split_chinese(text, self.keep_newlines)
        if not self.keep_newlines:
            return self._punkt.tokenize(text)
        # Keep what lies between sentences (newlines) at the end of the sentence before it.
        spans = list(self._punkt.span_tokenize(text))
        return [text[start:(spans[i + 1][0] if i + 1 < len(spans) else len(text))]
                for i, (start, _) in enumerate(spans)]

    def __reduce__(self):  # rebuilt in worker processes (punkt objects are large)
        return (SentenceSplitter, (self.lang, self.keep_newlines))


def _load_punkt(lang: str):
    try:
        from nltk.tokenize.punkt import PunktTokenizer
    except ImportError:
        raise ValueError(f"--split-sentences --lang {lang} needs nltk (pip install nltk), or use --lang chinese")
    try:
        return PunktTokenizer(lang)
    except (LookupError, OSError, ValueError):
        raise ValueError(f"--split-sentences --lang {lang}: nltk's punkt_tab data for {lang!r} is not installed "
                         "(python -m nltk.downloader punkt_tab), or use --lang chinese")


# Megatron-LM cuts a text into 1,000,000-character pieces before splitting it (a sentence spanning a cut becomes
# two); done the same way so outputs stay identical on very long documents.
MAX_SPLIT_CHARS = 1_000_000


def split_document(splitter: SentenceSplitter, text: str) -> list[str]:
    return [s for i in range(0, len(text), MAX_SPLIT_CHARS) for s in splitter.split(text[i:i + MAX_SPLIT_CHARS])]
