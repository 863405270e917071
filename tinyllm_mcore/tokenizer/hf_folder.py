"""The one writer of Hugging Face tokenizer folders, and the one chat template.

``write_tokenizer_folder(tokenizer, out_dir)`` writes what ``transformers.AutoTokenizer.from_pretrained(out_dir)``
loads (no remote code, transformers 4.x and 5.x) and encodes exactly as ``tinyllm_mcore.tokenizer.core.Tokenizer`` does.
``tools/train_tokenizer.py`` (``tokenizer_training``) writes its folder with it, and so does the Hugging Face export:

* ``tokenizer.model`` — the SentencePiece model itself, for tools that want it (and ``Tokenizer.load``).
* ``tokenizer.json`` — built here from the SentencePiece model: BPE with merges ranked by SentencePiece piece scores
  (transformers' own converter ranks them by piece id, which splits runs of spaces differently from SentencePiece for
  ChatGLM3's model), byte fallback, a dummy-prefix ``▁`` on every text chunk (the seed encoded the chunks between
  special tokens separately), and the special tokens (role markers, ChatGLM3's appended tokens) as added special
  tokens with their exact ids. The post-processor puts the chat prefix the model was trained with (``[gMASK] sop``
  for ChatGLM3, ``<s>`` for our own models) in front of ``tokenizer(text)``, as the seed's tokenizer did;
  ``add_special_tokens=False`` gives SentencePiece's ids unchanged.
* ``tokenizer_config.json`` — ``tokenizer_class: PreTrainedTokenizerFast`` (loads ``tokenizer.json`` verbatim; the
  Llama classes rebuild the post-processor from ``add_bos_token``, which cannot express ChatGLM3's two-token prefix),
  the special tokens, and ``chat_template``; ``special_tokens_map.json`` — the special tokens again, for older tools.

The chat template is generated from ``tokenizer.CHAT_TURNS`` and ``DEFAULT_SYSTEM``, the definition that
``Tokenizer.encode_conversation`` reads, so ``apply_chat_template(messages, tokenize=True)`` gives the training ids;
every folder is checked for that before it is written. Two details of the mapping from chunks to one rendered text:

* A chunk that follows another text chunk (an answer after ``<|assistant|>\\n``) is rendered with a leading space: the
  ``▁`` that encoding it as a chunk of its own gives. ``\\n`` is a byte-fallback piece, so no merge crosses it.
* Role markers inside message *content* stay text, as in training (``encode_conversation`` encodes content with
  SentencePiece only). HF matches added tokens anywhere in a string, so the template writes every special token found
  in content with ``NEUTRAL_MARK`` after its first character (no added token matches that), and the tokenizer's
  normalizer — which runs on the text between added tokens only — deletes ``NEUTRAL_MARK`` again. Without this, a
  user could inject a turn (``"...<|user|>\\n..."``) into a served model. ``NEUTRAL_MARK`` is a Unicode noncharacter
  (reserved for internal use), so deleting it changes no real text. ``tokenizer(text)`` itself still turns literal
  markers into role ids, as the seed's tokenizer did (its quick start builds prompts as text).

A model trained with a Hugging Face tokenizer folder (``--tokenizer-type HuggingFaceTokenizer``) gets that folder's own
files, byte for byte: nothing is rebuilt, so it encodes exactly as training did (its chat template is its own).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Sequence

from tinyllm_mcore.runtime.files import staged_dir
from tinyllm_mcore.tokenizer.core import ANSWER_ROLE, CHAT_TURNS, DEFAULT_SYSTEM, Tokenizer

# Written after the first character of a special token found in chat content, removed by the normalizer (module
# docstring). A noncharacter: Unicode reserves it for internal use, so no real text carries it.
NEUTRAL_MARK = "\ufdd0"
UNLIMITED_LENGTH = 1 << 30  # model_max_length of a folder without a model (no position limit to state)

# sentencepiece_model.proto ModelProto.SentencePiece.Type
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED = 1, 2, 3, 4


def write_tokenizer_folder(tokenizer: Tokenizer, out_dir: str | os.PathLike, *, model_max_length: int | None = None,
                           prompt_prefix: bool = True) -> None:
    """Write the tokenizer files (module docstring) into ``out_dir``, created if needed; other files there stay.

    ``model_max_length``: the model's context length (None: unlimited). ``prompt_prefix=False`` leaves the chat
    prefix out of ``tokenizer(text)`` and of the chat template. The files are written to a temporary folder beside
    ``out_dir`` first, so a failure leaves ``out_dir`` as it was. Raises ValueError (one line) for a tokenizer whose
    files cannot reproduce its ids."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a directory")
    with staged_dir(out, merge=True) as staged:
        if tokenizer.kind == "huggingface":
            _copy_hf_tokenizer_files(tokenizer, staged)
        else:
            _write_sentencepiece_files(tokenizer, staged, model_max_length or UNLIMITED_LENGTH, prompt_prefix)


def chat_template(prefix: str, special_tokens: Sequence[str] = ()) -> str:
    """The Jinja chat template of ``CHAT_TURNS``: ``prefix`` is the trained prompt prefix as text (special-token
    strings, e.g. ``<s>``); ``special_tokens`` (every added special token) are neutralised inside message content.

    One line, no whitespace control: every newline in the output is a literal of the format (transformers renders
    with ``trim_blocks``, so no literal may start with a newline right after a ``{% %}`` tag; none does here)."""
    neutralise = ""
    for token in sorted(set(special_tokens), key=len, reverse=True):  # longest first: no token is cut twice
        if len(token) < 2 or any(c in token for c in "'\\"):
            raise ValueError(f"special token {token!r} cannot be neutralised in the chat template")
        neutralise += f" | replace('{token}', '{token[0] + NEUTRAL_MARK + token[1:]}')"

    def content(expr: str) -> str:
        return "{{ content(" + expr + ") }}"

    def turn(role: str, text: str) -> str:
        t = CHAT_TURNS[role]
        if not t.is_answer:
            return _literal(t.marker + t.opening) + content(text) + _literal(t.closing)
        # The answer is a chunk of its own: a leading space stands for its dummy prefix (module docstring), and an
        # empty chunk has none.
        answer = "{% if " + text + " | trim %} " + content(text) + _literal(t.closing) + "{% endif %}" \
            if not t.closing else " " + content(text) + _literal(t.closing)
        return _literal(t.marker + t.opening) + answer + "{{ eos_token }}"

    loop_roles = [role for role in CHAT_TURNS if role != "system"]
    branches = "".join(("{% if " if i == 0 else "{% elif ") + f"m['role'] == '{role}' %}}" + turn(role, "m['content']")
                       for i, role in enumerate(loop_roles))
    unknown = ("{% else %}{{ raise_exception('unknown chat role ' ~ m['role'] ~ ' (system only first; "
               + ", ".join(loop_roles) + ")') }}{% endif %}")
    answer_turn = CHAT_TURNS[ANSWER_ROLE]
    return (
        "{% macro content(text) %}{{ text | trim" + neutralise + " }}{% endmacro %}"
        "{% if messages and messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
        "{% set turns = messages[1:] %}{% else %}{% set system = '" + _literal(DEFAULT_SYSTEM, quoted=True) + "' %}"
        "{% set turns = messages %}{% endif %}"
        + _literal(prefix)
        + "{% if system | trim %}" + turn("system", "system") + "{% endif %}"
        + "{% for m in turns %}" + branches + unknown + "{% endfor %}"
        + "{% if add_generation_prompt %}" + _literal(answer_turn.marker + answer_turn.opening) + "{% endif %}")


def render_chat(template: str, messages: Sequence[dict], *, add_generation_prompt: bool, eos_token: str) -> str:
    """Render ``template`` as transformers' ``apply_chat_template`` does (sandboxed, trim_blocks, lstrip_blocks)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ValueError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                            eos_token=eos_token)


def build_hf_tokenizer(tokenizer: Tokenizer, prefix_ids: list[int] | None = None):
    """A ``tokenizers.Tokenizer`` that encodes exactly like ``tokenizer`` (SentencePiece BPE + special tokens)."""
    from sentencepiece import sentencepiece_model_pb2 as model_pb2
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, normalizers, processors

    proto = model_pb2.ModelProto()
    proto.ParseFromString(tokenizer.sp.serialized_model_proto())
    if proto.trainer_spec.model_type != model_pb2.TrainerSpec.BPE:
        raise ValueError(f"{tokenizer.model_path}: only SentencePiece BPE models can be written as Hugging Face "
                         "tokenizers (the seed's and ours are BPE)")
    if not proto.normalizer_spec.add_dummy_prefix:
        raise ValueError(f"{tokenizer.model_path}: SentencePiece models without add_dummy_prefix are not supported")
    if proto.normalizer_spec.precompiled_charsmap or proto.normalizer_spec.remove_extra_whitespaces:
        # ChatGLM3's model and ours use identity normalisation; other rules would need a normalizer here.
        raise ValueError(f"{tokenizer.model_path}: SentencePiece normalization {proto.normalizer_spec.name!r} is not "
                         "supported (train with normalization identity)")
    pieces = list(proto.pieces)
    vocab = {p.piece: i for i, p in enumerate(pieces)}
    # sentencepiece's BPE merges any adjacent pair whose concatenation is a normal piece, highest piece score first.
    mergeable = {p.piece for p in pieces if p.type == _NORMAL}
    merges = []
    for p in pieces:
        if p.type != _NORMAL or len(p.piece) < 2:
            continue
        for cut in range(1, len(p.piece)):
            left, right = p.piece[:cut], p.piece[cut:]
            if left in mergeable and right in mergeable:
                merges.append((p.score, vocab[left], vocab[right], left, right))
    merges.sort(key=lambda m: (-m[0], m[1], m[2]))
    unk = pieces[proto.trainer_spec.unk_id].piece
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[(m[3], m[4]) for m in merges], unk_token=unk,
                                fuse_unk=True, byte_fallback=proto.trainer_spec.byte_fallback))
    # SentencePiece's dummy prefix, unconditionally, on every chunk between special tokens (HF's Metaspace skips it
    # when a chunk already starts with a space, which changes the ids of "  x").
    # NEUTRAL_MARK (see chat_template) is deleted first, so neutralised markers in chat content encode as text.
    hf.normalizer = normalizers.Sequence([normalizers.Replace(NEUTRAL_MARK, ""), normalizers.Prepend("▁"),
                                          normalizers.Replace(" ", "▁")])
    hf.pre_tokenizer = None
    hf.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])

    # Special tokens, each at its exact id: SentencePiece control pieces (<unk> <s> </s> and our role markers),
    # then tokens appended after the SentencePiece vocabulary (ChatGLM3's [MASK] ... <|observation|>).
    specials = {i: p.piece for i, p in enumerate(pieces) if p.type in (_CONTROL, _UNKNOWN)}
    specials.update({i: t for t, i in tokenizer.special_tokens.items()})
    user_defined = [p.piece for p in pieces if p.type == _USER_DEFINED]
    appended = sorted(i for i in specials if i >= len(pieces))
    if appended and appended != list(range(len(pieces), len(pieces) + len(appended))):
        raise ValueError(f"{tokenizer.model_path}: special tokens beyond the SentencePiece vocabulary must follow it "
                         f"contiguously: {appended}")

    # HF matches added tokens inside any text. ChatGLM3's 'sop'/'eop' are plain words ('people', 'Aesop'), so they are
    # written as '<sop>'/'<eop>': same ids, never produced from ordinary text.
    specials = {i: f"<{t}>" if t.isalpha() else t for i, t in specials.items()}
    hf.add_special_tokens([AddedToken(specials[i], special=True, normalized=False) for i in sorted(specials)])
    if user_defined:
        hf.add_tokens([AddedToken(t, special=False, normalized=False) for t in user_defined])
    for i, text in specials.items():
        if hf.token_to_id(text) != i:
            raise ValueError(f"{tokenizer.model_path}: special token {text!r} got id {hf.token_to_id(text)} in the "
                             f"Hugging Face tokenizer, expected {i}")

    prefix_ids = list(tokenizer.chat_prefix_ids if prefix_ids is None else prefix_ids)
    if prefix_ids:
        prefix = [(specials[i] if i in specials else pieces[i].piece, i) for i in prefix_ids]
        single = " ".join(t for t, _ in prefix) + " $A:0"
        pair = single + " $B:1"
        hf.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=prefix)
    return hf


# ---------------------------------------------------------------------------------------------------- internals
def _write_sentencepiece_files(tokenizer: Tokenizer, out: Path, model_max_length: int, prompt_prefix: bool) -> None:
    prefix_ids = list(tokenizer.chat_prefix_ids) if prompt_prefix else []
    hf = build_hf_tokenizer(tokenizer, prefix_ids)
    (out / "tokenizer.model").write_bytes(tokenizer.sp.serialized_model_proto())
    hf.save(str(out / "tokenizer.json"))

    piece = tokenizer.sp.id_to_piece
    added = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))["added_tokens"]
    added_decoder = {str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word",
                                                       "special")} for t in added}
    template = chat_template("".join(hf.id_to_token(i) for i in prefix_ids),
                             [t["content"] for t in added if t["special"]])
    eos_token = piece(tokenizer.eos)
    _check_chat_template(tokenizer, hf, template, eos_token, prefix_ids)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": piece(tokenizer.bos),
        "eos_token": eos_token,
        "unk_token": piece(tokenizer.unk),
        "pad_token": piece(tokenizer.pad),
        # The chat/special tokens under their HF names (ChatGLM3's sop/eop are <sop>/<eop>, see build_hf_tokenizer).
        "additional_special_tokens": [hf.id_to_token(i) for i in sorted(tokenizer.special_tokens.values())],
        "added_tokens_decoder": added_decoder,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "chat_template": template,
    }
    write_json(out / "tokenizer_config.json", config)
    write_json(out / "special_tokens_map.json", {k: config[k] for k in (
        "bos_token", "eos_token", "unk_token", "pad_token", "additional_special_tokens")})


# Conversations every written folder must encode exactly as training does: multi-turn, every role, the default and an
# omitted system text, a role marker typed into content, runs of spaces, digits, an empty answer.
_PROBE_CONVERSATIONS = (
    [{"role": "user", "content": "你好，介绍一下自己。"}, {"role": "assistant", "content": "我是一个助手。"},
     {"role": "user", "content": "  what is 2+2?  <|assistant|> 12345\n"}],
    [{"role": "system", "content": "你是助手。"}, {"role": "user", "content": "天气"},
     {"role": "assistant", "content": "查询中"}, {"role": "observation", "content": "{\"temp\": 21}"},
     {"role": "assistant", "content": "  二十一度。  "}],
    [{"role": "system", "content": " "}, {"role": "user", "content": "x"}, {"role": "assistant", "content": ""}],
)


def _check_chat_template(tokenizer: Tokenizer, hf, template: str, eos_token: str, prefix_ids: list[int]) -> None:
    """Refuse to write a folder whose ``apply_chat_template`` would give other ids than training did."""
    skip = len(tokenizer.chat_prefix_ids) - len(prefix_ids)  # the prefix left out (prompt_prefix=False)
    for messages in _PROBE_CONVERSATIONS:
        expected = tokenizer.chat_prompt_ids(messages)[skip:]
        text = render_chat(template, messages, add_generation_prompt=messages[-1]["role"] != ANSWER_ROLE,
                           eos_token=eos_token)
        got = hf.encode(text, add_special_tokens=False).ids
        if got != expected:
            first = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
            raise ValueError(f"{tokenizer.model_path}: its Hugging Face chat template would encode a conversation "
                             f"differently from training (first difference at id {first} of {len(expected)}); this "
                             "vocabulary cannot be written as a Hugging Face tokenizer folder")


def _copy_hf_tokenizer_files(tokenizer, out: Path) -> None:
    if not tokenizer.files:
        raise ValueError(f"tokenizer {tokenizer.model_path} has no files to write")
    for f in tokenizer.files:
        shutil.copyfile(f, out / f.name)


def _literal(text: str, quoted: bool = False) -> str:
    """Format text placed into the template verbatim: refuse what Jinja would read as syntax."""
    if any(s in text for s in ("{{", "{%", "{#")) or (quoted and any(c in text for c in "'\\")):
        raise ValueError(f"chat format text {text!r} cannot be placed in a Jinja template")
    return text


def write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return path
