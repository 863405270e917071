"""What a Hugging Face model directory needs besides the weights: config.json, generation_config.json, tokenizer files.

The exported directory loads with plain ``AutoModelForCausalLM`` / ``AutoTokenizer`` (no trust_remote_code) in
transformers 4.x and 5.x:

* ``config.json`` — ``LlamaForCausalLM`` with ``attention_bias: true`` (q/k/v/o biases; o is written as zeros, which is
  numerically Qwen2), or ``Qwen2ForCausalLM`` on request. Not qwen2 by default: ``AutoTokenizer`` on a ``qwen2``
  directory ignores ``tokenizer_class`` and forces the byte-level Qwen2 tokenizer, which gives wrong ids for a
  SentencePiece vocabulary.
* Tokenizer — ``tokenizer.model`` (the SentencePiece model, for tools that want it) plus ``tokenizer.json`` built here
  from the SentencePiece model: BPE with merges ranked by SentencePiece piece scores (transformers' own converter ranks
  them by piece id, which splits runs of spaces differently from SentencePiece for ChatGLM3's model), byte fallback,
  a dummy-prefix ``▁`` on every text chunk (the seed encoded the chunks between special tokens separately), and the
  chat special tokens as added special tokens with their exact ids. ``tokenizer_class`` is
  ``PreTrainedTokenizerFast``: it loads ``tokenizer.json`` verbatim (the Llama classes rebuild the post-processor from
  ``add_bos_token``, which cannot express ChatGLM3's two-token prompt prefix).
* The post-processor puts the chat prefix the model was trained with (``[gMASK] sop`` for the seed's ChatGLM3
  tokenizer, ``<s>`` for our own SentencePiece models; see tokenizer.py) in front of ``tokenizer(text)``, as the
  seed's tokenizer did, so the seed's quick-start prompt gives exactly the trained ids. ``add_special_tokens=False``
  gives SentencePiece's ids unchanged.
* ``chat_template`` renders the seed's format (prefix, ``<|system|>\\n{sys}\\n<|user|>\\n{q}\\n<|assistant|>\\n``,
  answers followed by eos, multi-turn); ``apply_chat_template`` then equals ``Tokenizer.chat_prompt_ids``.
* Role markers inside message *content* stay text, as in training (``Tokenizer.encode_conversation`` encodes content
  with SentencePiece only, so a literal ``<|user|>`` there is ordinary pieces, never the role id). HF matches added
  tokens anywhere in a string, so the template writes every special token found in content with ``NEUTRAL_MARK``
  after its first character (no added token matches that), and the tokenizer's normalizer — which runs on the text
  between added tokens only — deletes ``NEUTRAL_MARK`` again: the content is then encoded exactly as training did.
  Without this, a user could inject a turn (``"...<|user|>\\n..."``) into a served export. ``NEUTRAL_MARK`` is a
  Unicode noncharacter (reserved for internal use), so deleting it changes no real text. ``tokenizer(text)`` itself
  still turns literal markers into role ids, as the seed's tokenizer did (its quick start builds prompts as text).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

from tinyllm_mcore.presets import ModelPreset
from tinyllm_mcore.tokenizer import DEFAULT_SYSTEM, Tokenizer

HF_ARCHS = ("llama", "qwen2", "qwen2_moe")


def default_hf_arch(preset: ModelPreset) -> str:
    """llama for dense models (see the module docstring), Qwen2-MoE for MoE models (the only HF fit)."""
    return "qwen2_moe" if preset.num_experts else "llama"

# The seed's demo (web_demo.py): nucleus sampling at top_p 0.8, no top-k, temperature 1; a mild repetition penalty
# because 92M-class models loop otherwise.
GENERATION_DEFAULTS = dict(do_sample=True, top_p=0.8, top_k=0, temperature=1.0, repetition_penalty=1.1,
                           max_new_tokens=512)

# sentencepiece_model.proto ModelProto.SentencePiece.Type
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


# ---------------------------------------------------------------------------------------------------- model config
def hf_config(preset: ModelPreset, arch: str = "llama", *, torch_dtype: str = "float32", bos_token_id: int | None = 1,
              eos_token_id: int = 2, pad_token_id: int | None = 0) -> dict:
    """config.json for the preset as ``LlamaForCausalLM`` (default) or ``Qwen2ForCausalLM``; MoE presets as
    ``Qwen2MoeForCausalLM`` (the mapping: hf_mapping's module docstring)."""
    if arch not in HF_ARCHS:
        raise ValueError(f"unsupported --hf-arch {arch!r}; choose one of {', '.join(HF_ARCHS)}")
    if (arch == "qwen2_moe") != bool(preset.num_experts):
        raise ValueError(f"--hf-arch {arch} does not fit a {'MoE' if preset.num_experts else 'dense'} model; "
                         f"use {default_hf_arch(preset)}")
    config = {
        "architectures": [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                           "qwen2_moe": "Qwen2MoeForCausalLM"}[arch]],
        "model_type": arch,
        "vocab_size": preset.vocab_size,
        "hidden_size": preset.hidden_size,
        "intermediate_size": preset.ffn_hidden_size,
        "num_hidden_layers": preset.num_layers,
        "num_attention_heads": preset.num_attention_heads,
        "num_key_value_heads": preset.kv_heads,
        "head_dim": preset.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": preset.max_position_embeddings,
        "rms_norm_eps": preset.norm_eps,
        "rope_theta": preset.rope_theta,
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        "torch_dtype": torch_dtype,
    }
    if arch == "llama":
        config.update(attention_bias=True, mlp_bias=False, pretraining_tp=1)
    else:
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=preset.num_layers)
    if arch == "qwen2_moe":
        config.update(
            moe_intermediate_size=preset.ffn_hidden_size,
            shared_expert_intermediate_size=preset.moe_shared_expert_ffn_hidden_size or 0,  # 0: an empty one
            num_experts=preset.num_experts,
            num_experts_per_tok=preset.moe_router_topk,
            norm_topk_prob=preset.moe_norm_topk_prob,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            qkv_bias=True,
            output_router_logits=False,
            router_aux_loss_coef=0.001,
        )
    return config


def generation_config(eos_token_id: int = 2, pad_token_id: int | None = 0, bos_token_id: int | None = 1) -> dict:
    return {"bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "pad_token_id": pad_token_id,
            **GENERATION_DEFAULTS}


def write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------------- tokenizer
# Written after the first character of a special token found in chat content, removed by the normalizer (module
# docstring). A noncharacter: Unicode reserves it for internal use, so no real text carries it.
NEUTRAL_MARK = "\ufdd0"


def chat_template(prefix: str, special_tokens: Sequence[str] = ()) -> str:
    """Jinja for the seed's chat format; ``prefix`` is the trained prompt prefix as text (special-token strings);
    ``special_tokens`` (the tokenizer's added special tokens) are neutralised inside message content.

    One line, no whitespace control: every newline in the output is a literal of the format. An assistant turn in the
    history renders as ``<|assistant|>\n {answer}``: the space makes the answer start with the ``▁`` that encoding
    it as a chunk of its own gives (``\n`` is a byte-fallback piece, so no merge crosses it).
    """
    neutralise = ""
    for token in sorted(set(special_tokens), key=len, reverse=True):  # longest first: no token is cut twice
        if len(token) < 2 or any(c in token for c in "'\\"):
            raise ValueError(f"special token {token!r} cannot be neutralised in the chat template")
        neutralise += f" | replace('{token}', '{token[0] + NEUTRAL_MARK + token[1:]}')"
    return (
        "{% if messages and messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
        "{% set messages = messages[1:] %}{% else %}{% set system = '" + DEFAULT_SYSTEM + "' %}{% endif %}"
        + prefix +
        "{% if system | trim %}<|system|>\n{{ system | trim" + neutralise + " }}\n{% endif %}"
        "{% for m in messages %}"
        "{% if m['role'] == 'assistant' %}<|assistant|>\n {{ m['content'] | trim" + neutralise + " }}{{ eos_token }}"
        "{% else %}<|{{ m['role'] }}|>\n{{ m['content'] | trim" + neutralise + " }}\n{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def build_hf_tokenizer(tokenizer: Tokenizer, prefix_ids: list[int] | None = None):
    """A ``tokenizers.Tokenizer`` that encodes exactly like ``tokenizer`` (SentencePiece BPE + special tokens)."""
    from sentencepiece import sentencepiece_model_pb2 as model_pb2
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, normalizers, processors

    proto = model_pb2.ModelProto()
    proto.ParseFromString(tokenizer.sp.serialized_model_proto())
    if proto.trainer_spec.model_type != model_pb2.TrainerSpec.BPE:
        raise ValueError("only SentencePiece BPE models can be exported (the seed's and ours are BPE)")
    if not proto.normalizer_spec.add_dummy_prefix:
        raise ValueError("SentencePiece models without add_dummy_prefix are not supported by the exporter")
    if proto.normalizer_spec.remove_extra_whitespaces or proto.normalizer_spec.name not in ("identity", ""):
        # ChatGLM3's model and ours use identity normalisation; other rules would need a normalizer here.
        if proto.normalizer_spec.precompiled_charsmap or proto.normalizer_spec.remove_extra_whitespaces:
            raise ValueError(f"SentencePiece normalization {proto.normalizer_spec.name!r} is not supported by the "
                             "exporter (train with normalization identity)")
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
        raise ValueError(f"special tokens beyond the SentencePiece vocabulary must follow it contiguously: {appended}")

    # HF matches added tokens inside any text. ChatGLM3's 'sop'/'eop' are plain words ('people', 'Aesop'), so they are
    # written as '<sop>'/'<eop>': same ids, never produced from ordinary text.
    specials = {i: f"<{t}>" if t.isalpha() else t for i, t in specials.items()}
    hf.add_special_tokens([AddedToken(specials[i], special=True, normalized=False) for i in sorted(specials)])
    if user_defined:
        hf.add_tokens([AddedToken(t, special=False, normalized=False) for t in user_defined])
    for i, text in specials.items():
        if hf.token_to_id(text) != i:
            raise AssertionError(f"special token {text!r} got id {hf.token_to_id(text)}, expected {i}")

    prefix_ids = list(tokenizer.chat_prefix_ids if prefix_ids is None else prefix_ids)
    if prefix_ids:
        prefix = [(specials[i] if i in specials else pieces[i].piece, i) for i in prefix_ids]
        single = " ".join(t for t, _ in prefix) + " $A:0"
        pair = single + " $B:1"
        hf.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=prefix)
    return hf


def write_tokenizer(tokenizer: Tokenizer, out_dir: str | os.PathLike, *, prompt_prefix: bool = True,
                    model_max_length: int | None = None) -> list[Path]:
    """tokenizer.model, tokenizer.json, tokenizer_config.json and special_tokens_map.json into ``out_dir``."""
    if tokenizer.kind == "huggingface":
        return copy_hf_tokenizer_files(tokenizer, out_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prefix_ids = list(tokenizer.chat_prefix_ids) if prompt_prefix else []
    hf = build_hf_tokenizer(tokenizer, prefix_ids)
    files = [out / "tokenizer.model", out / "tokenizer.json"]
    files[0].write_bytes(tokenizer.sp.serialized_model_proto())
    hf.save(str(files[1]))

    sp = tokenizer.sp
    piece = sp.id_to_piece
    # The chat/special tokens under their HF names (ChatGLM3's sop/eop become <sop>/<eop>, see build_hf_tokenizer).
    role_tokens = [hf.id_to_token(i) for i in sorted(tokenizer.special_tokens.values())]
    added_decoder = {}
    for token in json.loads(files[1].read_text(encoding="utf-8"))["added_tokens"]:
        added_decoder[str(token["id"])] = {k: token[k] for k in
                                           ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": piece(sp.bos_id()),
        "eos_token": piece(sp.eos_id()),
        "unk_token": piece(sp.unk_id()),
        "pad_token": piece(tokenizer.pad),
        "additional_special_tokens": role_tokens,
        "added_tokens_decoder": added_decoder,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length or (1 << 30),
        "chat_template": chat_template("".join(hf.id_to_token(i) for i in prefix_ids),
                                       [t["content"] for t in added_decoder.values() if t["special"]]),
    }
    files.append(write_json(out / "tokenizer_config.json", config))
    special_map = {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token",
                                          "additional_special_tokens")}
    files.append(write_json(out / "special_tokens_map.json", special_map))
    return files


def copy_hf_tokenizer_files(tokenizer, out_dir: str | os.PathLike) -> list[Path]:
    """A model trained with a Hugging Face tokenizer (``--tokenizer-type HuggingFaceTokenizer``) ships that
    tokenizer's own files, byte for byte: nothing is rebuilt, so the export encodes exactly as training did."""
    import shutil

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not tokenizer.files:
        raise ValueError(f"tokenizer {tokenizer.model_path} has no files to export")
    return [Path(shutil.copyfile(f, out / f.name)) for f in tokenizer.files]


# ---------------------------------------------------------------------------------------------------- weights IO
class HFWeights:
    """Lazy, safe access to an HF model directory's tensors: safetensors (memory-mapped, one tensor at a time) or
    ``pytorch_model.bin`` via ``torch.load(weights_only=True)`` (memory-mapped for the zip format; the legacy
    pre-1.6 format cannot be mapped and is read whole). Nothing in the directory is executed. A file that cannot be
    read raises ValueError naming it."""

    def __init__(self, model_dir: str | os.PathLike):
        self.dir = Path(model_dir)
        if not self.dir.is_dir():
            raise FileNotFoundError(f"HF model directory does not exist: {self.dir}")
        self._where: dict[str, object] = {}
        for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                                   ("pytorch_model.bin.index.json", "pytorch_model.bin")):
            index = self.dir / index_name
            if index.is_file():
                files = sorted(set(_read_weight_map(index).values()))
                break
            if (self.dir / single).is_file():
                files = [single]
                break
        else:
            raise FileNotFoundError(f"no model.safetensors, pytorch_model.bin (or their .index.json) in {self.dir}")
        self.files = files
        for name in files:
            path = self.dir / name
            if not path.is_file():
                raise FileNotFoundError(f"weight file listed in the index is missing: {path}")
            if name.endswith(".safetensors"):
                handle = _open_safetensors(path)
                for key in handle.keys():
                    self._where[key] = handle
            else:
                state = _load_torch_weights(path)
                for key in state:
                    self._where[key] = state

    def names(self) -> list[str]:
        return list(self._where)

    def get(self, name: str):
        source = self._where.get(name)
        if source is None:
            return None
        return source[name] if isinstance(source, dict) else source.get_tensor(name)


def _read_weight_map(index: Path) -> dict:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{index}: not a weight index ({type(e).__name__}: {e})") from None
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index}: 'weight_map' is not an object")
    return weight_map


def _open_safetensors(path: Path):
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt")
    except Exception as e:  # safetensors' own error type: truncated, garbage or unreadable files
        raise ValueError(f"{path}: not a readable safetensors file (truncated or corrupt? {e})") from None


def _load_torch_weights(path: Path) -> dict:
    """A ``pytorch_model.bin`` state dict, read with the weights-only unpickler (no code can run)."""
    import pickle
    import re
    import zipfile

    import torch

    try:
        # mmap needs the zip format (torch >= 1.6); the seed's and older files may be the legacy format.
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        found = re.search(r"(?:unsupported|Unsupported global:) GLOBAL (\S+)", str(e))
        what = f"it references {found.group(1)}" if found else "it holds objects other than tensors"
        raise ValueError(f"{path}: refused by the weights-only loader ({what}); only tensors are read from "
                         "HF weight files") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable PyTorch weight file (truncated or corrupt? "
                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'unexpected end of file'})") \
            from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a state dict of tensors")
    return state


def write_safetensors(tensors, out_dir: str | os.PathLike, max_shard_bytes: int = 2 * 1024**3) -> list[Path]:
    """Stream (name, tensor) pairs into ``model.safetensors``, or shards + ``model.safetensors.index.json`` when the
    total exceeds ``max_shard_bytes``; at most one shard of tensors is held at a time."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    shards: list[tuple[Path, list[str]]] = []
    total = 0
    pending: dict = {}
    pending_bytes = 0

    def flush():
        nonlocal pending, pending_bytes
        if pending:
            path = out / f"model-{len(shards) + 1:05d}.safetensors"
            save_file(pending, str(path), metadata={"format": "pt"})
            shards.append((path, list(pending)))
            pending, pending_bytes = {}, 0

    for name, t in tensors:
        size = t.numel() * t.element_size()
        if pending and pending_bytes + size > max_shard_bytes:
            flush()
        pending[name] = t.contiguous()
        pending_bytes += size
        total += size
    flush()
    if len(shards) == 1:
        final = out / "model.safetensors"
        os.replace(shards[0][0], final)
        return [final]
    n = len(shards)
    files, weight_map = [], {}
    for i, (path, names) in enumerate(shards, 1):
        final = out / f"model-{i:05d}-of-{n:05d}.safetensors"
        os.replace(path, final)
        files.append(final)
        weight_map.update({k: final.name for k in names})
    files.append(write_json(out / "model.safetensors.index.json",
                            {"metadata": {"total_size": total}, "weight_map": weight_map}))
    return files
