"""Text -> ids for evaluation, from the project's Tokenizer or from a Hugging Face tokenizer.

Plain prompts are encoded as a Hugging Face user (and lm-evaluation-harness) encodes them: the tokenizer's default
special tokens first — the prompt prefix the model was trained with (``[gMASK] sop`` for the seed's ChatGLM3
tokenizer, ``<s>`` for our SentencePiece models), which the HF export's tokenizer puts in front of ``tokenizer(text)``
— then the text's SentencePiece pieces. ``add_prefix=False`` drops the prefix in both.
"""
from __future__ import annotations

from typing import Protocol, Sequence


class Encoder(Protocol):
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def encode_plain(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def chat_prompt_ids(self, messages: list[dict]) -> list[int]: ...

    def stop_ids(self) -> list[int]: ...


class SentencePieceEncoder:
    """The project's `tinyllm_mcore.tokenizer.core.Tokenizer`."""

    def __init__(self, tokenizer, add_prefix: bool = True):
        self.tokenizer = tokenizer
        self.prefix = list(tokenizer.chat_prefix_ids) if add_prefix else []
        self.eos_id = tokenizer.eos

    def encode(self, text: str) -> list[int]:
        return self.prefix + self.tokenizer.tokenize(text)

    def encode_plain(self, text: str) -> list[int]:
        """A document as pretraining encoded it (no prefix)."""
        return self.tokenizer.tokenize(text)

    def decode(self, ids):
        return self.tokenizer.detokenize(ids, skip_special_tokens=True)

    def chat_prompt_ids(self, messages):
        return self.tokenizer.chat_prompt_ids(messages)

    def stop_ids(self):
        from tinyllm_mcore.inference.generate import chat_stop_ids

        return chat_stop_ids(self.tokenizer)


class HFEncoder:
    """A transformers tokenizer (AutoTokenizer on an export), used the way lm-evaluation-harness uses it."""

    def __init__(self, tokenizer, add_prefix: bool = True):
        self.tokenizer = tokenizer
        self.add_prefix = add_prefix
        self.eos_id = tokenizer.eos_token_id

    @classmethod
    def from_pretrained(cls, path: str, add_prefix: bool = True):
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(path), add_prefix)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=self.add_prefix)

    def encode_plain(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids):
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def chat_prompt_ids(self, messages):
        if not self.tokenizer.chat_template:
            raise ValueError("the tokenizer has no chat template: gen mode needs a chat model's tokenizer")
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)

    def stop_ids(self):
        ids = [self.eos_id]
        for role in ("<|user|>", "<|observation|>", "<|system|>"):
            i = self.tokenizer.convert_tokens_to_ids(role)
            if i is not None and i != self.tokenizer.unk_token_id:
                ids.append(i)
        return ids
