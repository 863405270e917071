"""The one tokenizer of the project: a SentencePiece model plus the seed's special tokens and chat format.

Three kinds of tokenizer directory/model load here (`Tokenizer.load(path)` detects which):

* ``sentencepiece`` — a model written by ``tools/train_tokenizer.py``. The role markers are control pieces inside the
  model itself, so the model file alone is enough.
* ``chatglm3`` — the seed's actual tokenizer: ChatGLM3's ``tokenizer.model`` (64789 pieces) with the nine tokens the
  seed appends after it, in this order: ``[MASK] [gMASK] [sMASK] sop eop <|system|> <|user|> <|assistant|>
  <|observation|>`` (ids 64789..64797, vocab 64798). eos 2, pad 0 (= unk, as in the seed).
* ``added_tokens`` — the seed's merged LLaMA-style tokenizer: a SentencePiece model plus ``added_tokens.json``
  (``{"<|system|>": 49953, ...}``) beside it (vocab 49958).
* ``huggingface`` — a local Hugging Face tokenizer folder (``tokenizer.json``, with ``tokenizer_config.json`` naming its
  eos/bos/pad), Megatron-LM's ``--tokenizer-type HuggingFaceTokenizer``; or GPT-2 style ``vocab.json`` + ``merges.txt``
  (``GPT2BPETokenizer``, eod ``<|endoftext|>``). Loaded by transformers' ``AutoTokenizer``; text is encoded as
  Megatron-LM's ``HuggingFaceTokenizer`` does (no special tokens added, but special-token strings inside the text are
  matched), so preprocessed files equal Megatron-LM's. Chat (SFT/DPO) needs the role markers as single tokens; chat
  *content* is encoded with special-token matching off, so a literal "<|user|>" in a message stays text.

Plain text (pretraining documents) is encoded by SentencePiece only: a literal "<|user|>" inside a document stays text.
Special tokens enter a sequence only through the chat encoder below, by id.

Chat format (the seed's, with the role markers as single ids — the seed's HF tokenizer split ``<|system|>`` into text
pieces, a bug not reproduced here)::

    <prefix> <|system|> "\\n{system}\\n" <|user|> "\\n{question}\\n" <|assistant|> "\\n"  {answer} <eos>
                                         <|user|> "\\n{question2}\\n" <|assistant|> "\\n" {answer2} <eos> ...

Every quoted chunk is encoded by SentencePiece on its own, which is what the seed's HF tokenizer did around the tokens it
knew as added tokens (so ``<|user|>`` + "\\n介绍一下中国。\\n" gives exactly the seed's ids). ``<prefix>`` is what the
seed's ``add_special_tokens=True`` put first: ``[gMASK] sop`` for ChatGLM3, ``<s>`` for the LLaMA-style tokenizers.
Texts are stripped as in the seed. The default system text is the seed's ``你是由wdndev开发的个人助手。``.

The format is defined once, as data: ``CHAT_TURNS`` (one ``ChatTurn`` per role) and ``DEFAULT_SYSTEM``.
``encode_conversation`` below reads it, and so does ``tokenizer_files.chat_template``, which generates the Jinja chat
template of the Hugging Face tokenizer folders from it; the two cannot drift apart.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import sentencepiece as spm

DEFAULT_SYSTEM = "你是由wdndev开发的个人助手。"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")


@dataclass(frozen=True)
class ChatTurn:
    """How one role's message is written: its role marker (a single id), then ``opening + content + closing`` as one
    SentencePiece chunk (content stripped). An answer (``is_answer``) is split instead: ``opening`` closes the
    prompt as a chunk of its own, and ``content + closing`` is the response chunk, followed by eos — the tokens the
    model is trained to produce."""
    marker: str
    opening: str
    closing: str
    is_answer: bool = False


# The chat format, the one definition (module docstring). Order: system first (only as the first message); the rest
# may follow in any order.
CHAT_TURNS = {
    "system": ChatTurn("<|system|>", "\n", "\n"),
    "user": ChatTurn("<|user|>", "\n", "\n"),
    "observation": ChatTurn("<|observation|>", "\n", "\n"),
    "assistant": ChatTurn("<|assistant|>", "\n", "", is_answer=True),
}
# The turn whose opening, left open, asks the model to answer (the generation prompt).
ANSWER_ROLE = "assistant"

# What the seed appends after ChatGLM3's 64789 SentencePiece pieces, in id order.
CHATGLM3_APPENDED_TOKENS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop") + ROLE_TOKENS
CHATGLM3_BASE_VOCAB = 64789

KINDS = ("sentencepiece", "chatglm3", "added_tokens", "huggingface")
# Megatron-LM's --tokenizer-type names that mean "a SentencePiece model": resolved by detection.
_TYPE_ALIASES = {"auto": "auto", "SentencePieceTokenizer": "auto", "GPTSentencePieceTokenizer": "auto",
                 "Llama2Tokenizer": "auto", "HuggingFaceTokenizer": "huggingface", "GPT2BPETokenizer": "gpt2bpe"}
# The rest of Megatron-LM's --tokenizer-type choices: named so the error can say they are known but not supported.
UNSUPPORTED_MEGATRON_TYPES = ("BertWordPieceLowerCase", "BertWordPieceCase", "TikTokenizer", "MultimodalTokenizer",
                              "NullTokenizer", "NullMultimodalTokenizer", "SFTTokenizer")
SUPPORTED_TYPES = ("auto", *KINDS, *(t for t in _TYPE_ALIASES if t != "auto"))


class ChatFormat:
    """The chat encoder shared by every tokenizer kind. Needs ``chat_prefix_ids``, ``eos``, ``token_to_id``,
    ``tokenize_content`` and ``chat_support_error`` from the class it is mixed into."""

    def require_chat_tokens(self) -> None:
        """Raise ValueError (one line, saying how to fix it) when this tokenizer cannot encode the chat format."""
        problem = self.chat_support_error()
        if problem:
            raise ValueError(problem)

    def chat_support_error(self) -> str | None:
        return None

    def encode_conversation(self, messages: Sequence[dict], system: str | None = None) -> list[list[int]]:
        """Chat messages -> alternating segments ``[prompt, response, prompt, response, ...]``.

        Prompt segments carry no loss; each response segment is an assistant answer followed by eos (the trained
        tokens). If the last message is not an assistant's, the last segment is a prompt ending in
        ``<|assistant|> "\\n"`` (a generation prompt). ``messages`` are ``{"role", "content"}`` dicts with roles
        system (first only), user, assistant, observation; ``system`` replaces the default system text ("" omits the
        system block); a leading system message wins over both. The format: ``CHAT_TURNS``.
        """
        self.require_chat_tokens()
        messages = list(messages)
        if messages and messages[0].get("role") == "system":
            system = messages.pop(0)["content"]
        if system is None:
            system = DEFAULT_SYSTEM

        segments: list[list[int]] = []
        prompt = list(self.chat_prefix_ids)
        if system.strip():
            prompt += self._turn_ids("system", system)[0]
        for message in messages:
            role, content = message.get("role"), message.get("content")
            if not isinstance(content, str):
                raise ValueError(f"message content must be a string, got {type(content).__name__}")
            if role not in CHAT_TURNS or role == "system":
                raise ValueError(f"unknown chat role {role!r} (system only first; user, assistant, observation)")
            opening, response = self._turn_ids(role, content)
            prompt += opening
            if CHAT_TURNS[role].is_answer:
                segments += [prompt, response]
                prompt = []
        if prompt:  # ends with a user turn: leave the model to answer
            segments.append(prompt + self.generation_prompt_ids())
        return segments

    def chat_prompt_ids(self, messages: Sequence[dict], system: str | None = None) -> list[int]:
        """Ids to feed a model that should answer the last user message (chat, eval, generate)."""
        return [i for segment in self.encode_conversation(messages, system) for i in segment]

    def generation_prompt_ids(self) -> list[int]:
        """What asks the model to answer: the answer turn's marker and opening."""
        turn = CHAT_TURNS[ANSWER_ROLE]
        return [self.token_to_id(turn.marker)] + self.tokenize_content(turn.opening)

    def _turn_ids(self, role: str, content: str) -> tuple[list[int], list[int]]:
        """One message -> (prompt ids, response ids); the response is empty unless the role's turn is an answer."""
        turn = CHAT_TURNS[role]
        marker, text = [self.token_to_id(turn.marker)], content.strip()
        if turn.is_answer:
            return marker + self.tokenize_content(turn.opening), self.tokenize_content(text + turn.closing) + [self.eos]
        return marker + self.tokenize_content(turn.opening + text + turn.closing), []


class Tokenizer(ChatFormat):
    """SentencePiece + special tokens. Duck-types what megatron-core's datasets use (``eod``, ``pad``, ``eos``, ``bos``,
    ``vocab_size``, ``tokenize``, ``detokenize``, ``unique_identifiers``) and adds the chat encoder."""

    def __init__(self, model_path: str | os.PathLike, kind: str, special_tokens: dict[str, int],
                 chat_prefix_tokens: Sequence[str]):
        self.model_path = str(model_path)
        self.kind = kind
        self.sp = _load_sentencepiece(self.model_path)
        self.special_tokens = dict(special_tokens)  # text -> id, for tokens outside plain-text encoding
        self._special_by_id = {i: t for t, i in self.special_tokens.items()}
        self.chat_prefix_ids = [self.token_to_id(t) for t in chat_prefix_tokens]
        self.vocab_size = max([self.sp.get_piece_size() - 1, *self.special_tokens.values()]) + 1
        with open(self.model_path, "rb") as f:
            model_bytes = f.read()
        model_sha = hashlib.sha256(model_bytes).hexdigest()[:16]
        # What decides the ids: the model file and the special tokens added around it (the vocabulary sidecar of
        # preprocessed data and checkpoints record it).
        self.identity = _identity(kind, [model_bytes], self.special_tokens)
        # megatron-core hashes this (via GPTDatasetConfig) into its dataset cache names.
        self.unique_identifiers = OrderedDict(
            [("class", type(self).__name__), ("kind", kind), ("model_sha256", model_sha),
             ("vocab_size", self.vocab_size), ("special_tokens", json.dumps(self.special_tokens, sort_keys=True))])

    # ---------------------------------------------------------------- loading
    @classmethod
    def load(cls, path: str | os.PathLike | None, tokenizer_type: str = "auto", *, vocab_file: str | None = None,
             merge_file: str | None = None) -> "Tokenizer | HFTokenizer":
        """Load a tokenizer: a ``tokenizer.model`` file or a directory holding one (SentencePiece kinds), a directory
        with ``tokenizer.json`` (Hugging Face; detected when it has no ``tokenizer.model``, or asked for with
        ``HuggingFaceTokenizer``), or ``GPT2BPETokenizer`` with ``vocab_file`` + ``merge_file``."""
        if tokenizer_type in UNSUPPORTED_MEGATRON_TYPES:
            raise ValueError(f"--tokenizer-type {tokenizer_type} is not supported here; use SentencePieceTokenizer, "
                             "HuggingFaceTokenizer (a local folder with tokenizer.json) or GPT2BPETokenizer")
        kind = _TYPE_ALIASES.get(tokenizer_type, tokenizer_type)
        if kind not in KINDS + ("auto", "gpt2bpe"):
            raise ValueError(f"unknown tokenizer type {tokenizer_type!r}; use one of {', '.join(SUPPORTED_TYPES)}")
        if kind == "gpt2bpe" or (kind in ("auto", "huggingface") and path is None and vocab_file):
            return HFTokenizer.from_gpt2_files(path, vocab_file, merge_file)
        if path is None:
            raise ValueError("--tokenizer-model is required for this --tokenizer-type")
        path = Path(path)
        if kind == "huggingface" or (kind == "auto" and path.is_dir() and not (path / "tokenizer.model").is_file()
                                     and (path / "tokenizer.json").is_file()):
            return HFTokenizer(path)
        model_path = path / "tokenizer.model" if path.is_dir() else path
        if not model_path.is_file():
            raise FileNotFoundError(f"tokenizer model not found: {model_path}")
        added_tokens_file = model_path.parent / "added_tokens.json"
        if kind == "auto":
            kind = _detect_kind(model_path, added_tokens_file)

        if kind == "chatglm3":
            special = {t: CHATGLM3_BASE_VOCAB + i for i, t in enumerate(CHATGLM3_APPENDED_TOKENS)}
            return cls(model_path, kind, special, chat_prefix_tokens=("[gMASK]", "sop"))
        if kind == "added_tokens":
            try:
                with open(added_tokens_file, encoding="utf-8") as f:
                    special = {str(t): int(i) for t, i in json.load(f).items()}
            except (ValueError, TypeError, AttributeError) as e:  # bad JSON, not an object, a non-integer id
                raise ValueError(f"{added_tokens_file}: not a {{token: id}} JSON object "
                                 f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
            return cls(model_path, kind, special, chat_prefix_tokens=("<s>",))
        # Our own models: the role markers are control pieces of the model.
        sp = _load_sentencepiece(model_path)
        special = {t: sp.piece_to_id(t) for t in ROLE_TOKENS if _has_piece(sp, t)}
        return cls(model_path, kind, special, chat_prefix_tokens=("<s>",))

    # Pickle the model bytes rather than a path: DataLoader workers may run where the path does not exist.
    def __getstate__(self):
        state = self.__dict__.copy()
        state["sp"] = self.sp.serialized_model_proto()
        return state

    def __setstate__(self, state):
        proto = state.pop("sp")
        self.__dict__.update(state)
        self.sp = spm.SentencePieceProcessor(model_proto=proto)

    # ---------------------------------------------------------------- ids megatron-core and the loop use
    @property
    def eos(self) -> int:
        return self.sp.eos_id()

    @property
    def eod(self) -> int:
        """End of document, appended by preprocess --append-eod: the seed used eos."""
        return self.sp.eos_id()

    @property
    def bos(self) -> int:
        return self.sp.bos_id()

    @property
    def pad(self) -> int:
        """The seed padded with unk (id 0)."""
        return self.sp.unk_id()

    @property
    def unk(self) -> int:
        return self.sp.unk_id()

    def chat_support_error(self) -> str | None:
        missing = [t for t in ROLE_TOKENS[:3] if t not in self.special_tokens]
        if missing:
            return (f"tokenizer {self.model_path} has no single-id chat role markers {', '.join(missing)}: train one "
                    f"with tools/train_tokenizer.py (it reserves them) or use the seed's tokenizer")
        return None

    def token_to_id(self, token: str) -> int:
        if token in self.special_tokens:
            return self.special_tokens[token]
        if _has_piece(self.sp, token):
            return self.sp.piece_to_id(token)
        raise KeyError(f"{token!r} is not a token of this {self.kind} tokenizer")

    def id_to_token(self, token_id: int) -> str:
        if token_id in self._special_by_id:
            return self._special_by_id[token_id]
        return self.sp.id_to_piece(int(token_id))

    # ---------------------------------------------------------------- text
    def tokenize(self, text: str) -> list[int]:
        """Plain text -> ids (no special-token parsing, no bos/eos)."""
        return self.sp.encode(text)

    def tokenize_batch(self, texts: list[str], num_threads: int = -1) -> list[list[int]]:
        """``tokenize`` of each text, in one call; ``num_threads`` SentencePiece threads (-1: one per CPU)."""
        return self.sp.encode(texts, num_threads=num_threads)

    def tokenize_content(self, text: str) -> list[int]:
        """Chat message text -> ids. SentencePiece never produces special ids from text, so this is ``tokenize``."""
        return self.sp.encode(text)

    def detokenize(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """ids -> text. Special tokens are written as their text (unless skipped); bos/eos/pad vanish as in
        SentencePiece."""
        text, run = [], []
        for i in ids:
            i = int(i)
            if i in self._special_by_id:
                text.append(self.sp.decode(run))
                run = []
                if not skip_special_tokens:
                    text.append(self._special_by_id[i])
            else:
                run.append(i)
        text.append(self.sp.decode(run))
        return "".join(text)


def _has_piece(sp: spm.SentencePieceProcessor, piece: str) -> bool:
    i = sp.piece_to_id(piece)
    return i != sp.unk_id() or piece == sp.id_to_piece(sp.unk_id())


def _load_sentencepiece(model_path: str | os.PathLike) -> spm.SentencePieceProcessor:
    """A SentencePiece model file, or ValueError (one line naming it) when it cannot be parsed: sentencepiece raises
    a bare RuntimeError ("could not parse ModelProto") for a truncated or foreign file."""
    try:
        return spm.SentencePieceProcessor(model_file=str(model_path))
    except (RuntimeError, OSError) as e:
        size = os.path.getsize(model_path) if os.path.isfile(model_path) else 0
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"tokenizer model {model_path} ({size} bytes) is not a loadable SentencePiece model "
                         f"(truncated or not a tokenizer.model?): {detail}") from None


def _detect_kind(model_path: Path, added_tokens_file: Path) -> str:
    if added_tokens_file.is_file():
        return "added_tokens"
    sp = _load_sentencepiece(model_path)
    if all(_has_piece(sp, t) for t in ROLE_TOKENS[:3]):
        return "sentencepiece"
    if sp.get_piece_size() == CHATGLM3_BASE_VOCAB:
        return "chatglm3"
    raise ValueError(f"{model_path}: a SentencePiece model without chat role pieces, added_tokens.json or ChatGLM3's "
                     f"size; pass --tokenizer-type explicitly ({', '.join(KINDS)})")


class HFTokenizer(ChatFormat):
    """A local Hugging Face tokenizer (transformers' ``AutoTokenizer``; nothing is downloaded, no remote code) with
    the same interface as ``Tokenizer``. Plain text is encoded as Megatron-LM's ``HuggingFaceTokenizer`` does:
    without adding special tokens, special-token strings in the text matched. eod = eos (``tokenizer_config.json``'s
    ``eos_token``); pad falls back to eos when the tokenizer has none (padded positions carry no loss)."""

    kind = "huggingface"

    def __init__(self, folder: str | os.PathLike, *, _backend=None, _files: Sequence[Path] = ()):
        self.model_path = str(folder)
        if _backend is None:
            folder = Path(folder)
            if not (folder / "tokenizer.json").is_file():
                raise FileNotFoundError(f"no tokenizer.json in {folder} (HuggingFaceTokenizer needs a local folder "
                                        "with tokenizer.json)")
            from transformers import AutoTokenizer

            try:
                _backend = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
            except Exception as e:  # transformers raises many types for a bad folder
                raise ValueError(f"{folder}: not a loadable Hugging Face tokenizer: {str(e).splitlines()[0]}")
            _files = sorted(p for p in folder.iterdir() if p.name in HF_TOKENIZER_FILES)
        self.hf = _backend
        self.files = [Path(f) for f in _files]  # what an HF export copies unchanged
        vocab = self.hf.get_vocab()
        self.vocab_size = max(vocab.values()) + 1
        self.special_tokens = {t: vocab[t] for t in ROLE_TOKENS if t in vocab}
        self._special_ids = set(self.hf.all_special_ids) | set(self.special_tokens.values())
        self.chat_prefix_ids = [self.bos] if self.bos is not None else []
        self.identity = _identity(self.kind, [self.hf.backend_tokenizer.to_str().encode()],
                                  {"eos": self.hf.eos_token_id, "bos": self.hf.bos_token_id,
                                   "pad": self.hf.pad_token_id})
        self.unique_identifiers = OrderedDict([("class", type(self).__name__), ("kind", self.kind),
                                               ("identity", self.identity), ("vocab_size", self.vocab_size)])
        self._content_encoder = None

    @classmethod
    def from_gpt2_files(cls, folder: str | os.PathLike | None, vocab_file: str | None, merge_file: str | None):
        """Megatron-LM's GPT2BPETokenizer: GPT-2 byte-level BPE from ``vocab.json`` + ``merges.txt`` (given, or found
        in ``folder``), eod ``<|endoftext|>``."""
        from tokenizers import Tokenizer as TokenizersTokenizer, decoders, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        vocab_file = vocab_file or (folder and str(Path(folder) / "vocab.json"))
        merge_file = merge_file or (folder and str(Path(folder) / "merges.txt"))
        for flag, path in (("--vocab-file", vocab_file), ("--merge-file", merge_file)):
            if not path or not Path(path).is_file():
                raise FileNotFoundError(f"GPT2BPETokenizer needs {flag}: {path or 'not given'}")
        backend = TokenizersTokenizer(models.BPE.from_file(vocab_file, merge_file))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        hf = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
        return cls(Path(vocab_file).parent, _backend=hf, _files=[Path(vocab_file), Path(merge_file)])

    def __getstate__(self):  # pickle the tokenizer itself, not a path (DataLoader workers, preprocess workers)
        state = self.__dict__.copy()
        state["_content_encoder"] = None
        return state

    # ---------------------------------------------------------------- ids
    @property
    def eos(self) -> int | None:
        return self.hf.eos_token_id

    @property
    def eod(self) -> int | None:
        return self.hf.eos_token_id

    @property
    def bos(self) -> int | None:
        return self.hf.bos_token_id

    @property
    def pad(self) -> int | None:
        return self.hf.pad_token_id if self.hf.pad_token_id is not None else self.hf.eos_token_id

    @property
    def unk(self) -> int | None:
        return self.hf.unk_token_id

    def chat_support_error(self) -> str | None:
        missing = [t for t in ROLE_TOKENS[:3] if t not in self.special_tokens]  # <|observation|> only if used
        if not missing and self.eos is not None:
            return None
        if missing:
            what = f"no single-token chat role markers {', '.join(missing)}"
            fix = f"tok.add_special_tokens({{'additional_special_tokens': {list(ROLE_TOKENS)}}})"
        else:
            what, fix = "no eos_token", "tok.add_special_tokens({'eos_token': '<|endoftext|>'})"
        return (f"tokenizer {self.model_path} has {what}: add them and save it, e.g. tok = "
                f"AutoTokenizer.from_pretrained(DIR); {fix}; tok.save_pretrained(DIR) (then resize the model's "
                f"embeddings)")

    def token_to_id(self, token: str) -> int:
        i = self.hf.convert_tokens_to_ids(token)
        if i is None or (i == self.unk and token != self.hf.unk_token):
            raise KeyError(f"{token!r} is not a token of this huggingface tokenizer")
        return i

    def id_to_token(self, token_id: int) -> str:
        return self.hf.convert_ids_to_tokens(int(token_id))

    # ---------------------------------------------------------------- text
    def tokenize(self, text: str) -> list[int]:
        """Plain text -> ids, as Megatron-LM's HuggingFaceTokenizer (no bos/eos added)."""
        return self.hf.backend_tokenizer.encode(text, add_special_tokens=False).ids

    def tokenize_batch(self, texts: list[str], num_threads: int = -1) -> list[list[int]]:
        """``num_threads``: not used (the tokenizers library's own parallelism, TOKENIZERS_PARALLELISM, decides)."""
        return [e.ids for e in self.hf.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]

    def tokenize_content(self, text: str) -> list[int]:
        """Chat message text -> ids with special-token matching off: role markers typed by a user stay text."""
        if self._content_encoder is None:
            from tokenizers import Tokenizer as TokenizersTokenizer

            self._content_encoder = TokenizersTokenizer.from_str(self.hf.backend_tokenizer.to_str())
            self._content_encoder.encode_special_tokens = True
        return self._content_encoder.encode(text, add_special_tokens=False).ids

    def detokenize(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._special_ids]
        return self.hf.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


# The files of a Hugging Face tokenizer folder (an HF export copies them unchanged).
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                      "vocab.json", "merges.txt", "chat_template.jinja")


def _identity(kind: str, model_bytes: Sequence[bytes], special_tokens: dict) -> str:
    """sha256 over what decides a tokenizer's ids: its kind, model file(s) and special-token ids."""
    digest = hashlib.sha256(kind.encode())
    for blob in model_bytes:
        digest.update(hashlib.sha256(blob).digest())
    digest.update(json.dumps(special_tokens, sort_keys=True).encode())
    return "sha256:" + digest.hexdigest()


def messages_from_record(record: dict) -> tuple[list[dict], str | None]:
    """An SFT record -> (messages, system). Accepts the seed's ``{"question", "answer", "system"?}`` and
    ``{"messages": [{"role", "content"}, ...]}``. Raises KeyError/ValueError naming what is wrong."""
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise ValueError("'messages' must be a list of {role, content} objects")
        return messages, record.get("system")
    for key in ("question", "answer"):
        if key not in record:
            raise KeyError(key)
        if not isinstance(record[key], str):
            raise ValueError(f"{key!r} must be a string")
    return [{"role": "user", "content": record["question"]},
            {"role": "assistant", "content": record["answer"]}], record.get("system")

