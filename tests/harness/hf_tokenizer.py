"""A byte-level BPE Hugging Face tokenizer folder trained here with the `tokenizers` library (about a second), for the
HuggingFaceTokenizer / GPT2BPETokenizer paths: ``tokenizer.json`` + ``tokenizer_config.json`` (eos ``<|endoftext|>``),
optionally with the chat role markers as special tokens."""
from __future__ import annotations

import functools
import json
import random
import tempfile
from pathlib import Path

from tests.harness.text_data import random_text

ROLE_MARKERS = ["<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]


@functools.lru_cache(maxsize=None)
def tiny_hf_tokenizer_dir(with_roles: bool = True) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    rng = random.Random(7)
    texts = [random_text(rng) for _ in range(2000)] + ["Hello world. This is English text, isn't it?"] * 20
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>"] + (ROLE_MARKERS if with_roles else [])
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=600, special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    out = Path(tempfile.mkdtemp(prefix="tinyllm_hftok_")) / ("hf_roles" if with_roles else "hf_plain")
    out.mkdir()
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>",
         "additional_special_tokens": ROLE_MARKERS if with_roles else []}), encoding="utf-8")
    tok.model.save(str(out))  # vocab.json + merges.txt: the GPT2BPETokenizer files of the same BPE
    return out
