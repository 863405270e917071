"""Tiny synthetic corpora and a tiny trained tokenizer for the data tests (seconds, no shared files needed)."""
from __future__ import annotations

import functools
import json
import random
import tempfile
from pathlib import Path

# A few hundred common characters, so a small BPE vocabulary covers them and still learns merges.
_HANZI = ("的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自着去之过家学对可里后小么心多天"
          "而能好都然没日于起还发成事只作当想看文无开手十用主行方又如前所本见经头面公同三已老从动两长知民样现分将外但身些"
          "与高意进把法此实回二理美点月明其种声全工己话儿者向情部正名定女问力机给等几很业最间新什打便位因重被走电四第门相"
          "次东政海口使教西再平真听世气信北少关并内加化由却代军产入先山五太水万市眼体别处总才场师书比住员九笑性通目华报"
          "立马命张活难神数件安表原车白应路期叫死常提感金何更反合放做系计或司利受光王果亲界及今京务制解各任至清物台象记")
_WORDS = ("hello", "world", "data", "model", "token", "megatron", "core", "chat")


def random_text(rng: random.Random, min_chars: int = 5, max_chars: int = 60) -> str:
    parts = []
    for _ in range(rng.randint(min_chars, max_chars)):
        r = rng.random()
        if r < 0.8:
            parts.append(rng.choice(_HANZI))
        elif r < 0.85:
            parts.append(rng.choice("，。！？、：；"))
        elif r < 0.9:
            parts.append(" " + rng.choice(_WORDS) + " ")
        elif r < 0.95:
            parts.append(str(rng.randint(0, 9999)))
        else:
            parts.append("\n")
    return "".join(parts).strip() or "空"


def write_text_jsonl(path: Path, n_docs: int, seed: int = 0, key: str = "text") -> list[str]:
    rng = random.Random(seed)
    texts = [random_text(rng) for _ in range(n_docs)]
    with open(path, "w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({key: text, "id": len(text)}, ensure_ascii=False) + "\n")
    return texts


@functools.lru_cache(maxsize=None)
def tiny_tokenizer_dir() -> Path:
    """Train once per test process (about a second) into a temp dir."""
    from tinyllm_mcore.tokenizer.training import train_tokenizer

    out = Path(tempfile.mkdtemp(prefix="tinyllm_tok_"))
    write_text_jsonl(out / "corpus.jsonl", 3000, seed=1)
    train_tokenizer(str(out / "corpus.jsonl"), out / "tok", vocab_size=1000, character_coverage=1.0,
                    num_threads=2)
    return out / "tok"


def tiny_tokenizer():
    from tinyllm_mcore.tokenizer.core import Tokenizer

    return Tokenizer.load(tiny_tokenizer_dir())
