"""megatron-core dist checkpoint (any TP/PP, local or TE layer names) -> Hugging Face model directory.

    python checkpoint_convert/mcore_to_hf.py --load CKPT_DIR --save HF_DIR [--dtype bf16] [--tokenizer-model PATH]

The directory loads with plain ``AutoModelForCausalLM.from_pretrained(HF_DIR)`` and ``AutoTokenizer.from_pretrained``
(no trust_remote_code): ``LlamaForCausalLM`` with attention_bias (o_proj.bias written as zeros: numerically the
seed's Qwen2 architecture) by default, or ``--hf-arch qwen2``. Padded vocab rows are stripped. The tokenizer is the
one given, else the run's ``--tokenizer-model`` recorded in the checkpoint. One CPU process: megatron reshards the
checkpoint into the global model on load, then tensors stream into (sharded when large) safetensors.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `python checkpoint_convert/mcore_to_hf.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from tinyllm_mcore import hf_export
from tinyllm_mcore.hf_mapping import (
    conversion_log,
    MC_EMBED, MappingError, check_finite, checkpoint_tensor_shapes, dist_checkpoint_shapes, load_global_state,
    megatron_to_hf, single_process_megatron, staged_output_dir,
)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
QWEN2_TOKENIZER_WARNING = (
    "warning: --hf-arch qwen2: transformers' AutoTokenizer forces its byte-level Qwen2Tokenizer on qwen2 directories "
    "and ignores tokenizer_class, which gives wrong ids for this SentencePiece vocabulary; load the tokenizer with "
    "PreTrainedTokenizerFast.from_pretrained(dir) or use the default --hf-arch llama")


def _check_checkpoint_shapes(path, preset, saved_shapes: dict) -> int:
    """Compare the checkpoint's tensors with the preset's; return the checkpoint's padded vocab rows."""
    if MC_EMBED not in saved_shapes:
        raise MappingError(f"{path} holds no {MC_EMBED} (not a GPT model checkpoint?)")
    padded = saved_shapes[MC_EMBED][0]
    if padded < preset.vocab_size:
        raise MappingError(f"checkpoint embedding has {padded} rows, fewer than the vocab size {preset.vocab_size}")
    expected = dist_checkpoint_shapes(preset, 1, padded)  # padded rows taken from the checkpoint itself
    te_or_local = {"decoder.layers.input_layernorm.weight": "decoder.layers.self_attention.linear_qkv.layer_norm_weight",
                   "decoder.layers.pre_mlp_layernorm.weight": "decoder.layers.mlp.linear_fc1.layer_norm_weight"}
    for key, shape in saved_shapes.items():
        key = te_or_local.get(key, key)
        if key.startswith(("embedding.", "decoder.", "output_layer.")):
            if key not in expected:
                raise MappingError(f"checkpoint tensor {key} is not part of the {preset.name} model "
                                   "(unsupported architecture?)")
            if tuple(shape) != expected[key]:
                raise MappingError(f"checkpoint tensor {key} has shape {tuple(shape)}, the saved preset implies "
                                   f"{expected[key]} (shape/config mismatch)")
    return padded


def convert_mcore_to_hf(load: str | os.PathLike, save: str | os.PathLike, dtype: str = "fp32",
                        tokenizer_model: str | None = None, hf_arch: str | None = None, prompt_prefix: bool = True,
                        max_shard_bytes: int = 2 * 1024**3, log=print, allow_non_finite: bool = False,
                        verify: bool = True) -> Path:
    """Export; return the HF directory. Raises ValueError/FileNotFoundError with one-line messages.

    Tensors with NaN/inf values (also a finite value that overflows ``dtype``) are refused unless
    ``allow_non_finite``. The directory is written under a temporary name beside ``save`` and renamed when
    complete, so a failure (bad input, disk full) leaves nothing; an earlier export at ``save`` is replaced.
    ``verify`` checks the checkpoint's files against its manifest first."""
    from tinyllm_mcore.tokenizer import Tokenizer
    from tinyllm_mcore.training.checkpoint import CheckpointError, resolve_load_dir, saved_preset, verify_checkpoint

    t0 = time.perf_counter()
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}")
    if hf_arch is not None and hf_arch not in hf_export.HF_ARCHS:
        raise ValueError(f"unsupported --hf-arch {hf_arch!r}; choose one of {', '.join(hf_export.HF_ARCHS)}")
    path = resolve_load_dir(load)
    if verify:
        verify_checkpoint(path)
    preset, saved_args = saved_preset(load)
    hf_arch = hf_arch or hf_export.default_hf_arch(preset)
    if (hf_arch == "qwen2_moe") != bool(preset.num_experts):
        raise MappingError(f"--hf-arch {hf_arch} does not fit this {'MoE' if preset.num_experts else 'dense'} "
                           f"checkpoint; use {hf_export.default_hf_arch(preset)}")
    tokenizer_model = tokenizer_model or saved_args.get("tokenizer_model")
    tokenizer = None
    if tokenizer_model:
        try:
            tokenizer = Tokenizer.load(tokenizer_model, saved_args.get("tokenizer_type", "auto"))
        except RuntimeError as e:  # sentencepiece's parse error names no flag
            raise ValueError(f"--tokenizer-model {tokenizer_model}: not a SentencePiece model "
                             f"({str(e).splitlines()[0]})") from None
        if tokenizer.vocab_size != preset.vocab_size:
            raise MappingError(f"model vocab {preset.vocab_size} != tokenizer vocab {tokenizer.vocab_size} "
                               f"({tokenizer_model}): export needs the tokenizer the model was trained with")
    out = Path(save)
    if hf_arch == "qwen2":
        log(QWEN2_TOKENIZER_WARNING)
    elif hf_arch == "qwen2_moe":  # same AutoTokenizer behaviour; no llama alternative for MoE
        log(QWEN2_TOKENIZER_WARNING.replace("--hf-arch qwen2", "qwen2_moe").replace("qwen2 directories",
            "qwen2_moe directories").replace(" or use the default --hf-arch llama", ""))

    with single_process_megatron():
        saved_shapes = checkpoint_tensor_shapes(path)
        padded = _check_checkpoint_shapes(path, preset, saved_shapes)
        log(f"[mcore_to_hf] {path} (saved at TP{saved_args.get('tensor_model_parallel_size', '?')} "
            f"PP{saved_args.get('pipeline_model_parallel_size', '?')}; {preset.name}, vocab {preset.vocab_size} of "
            f"{padded} rows) -> {out} as {hf_arch}, {dtype}")
        try:
            state = load_global_state(path, preset, padded)
        except MappingError:
            raise
        except Exception as e:  # a damaged file the manifest could not vouch for: one line naming the checkpoint
            first = (str(e).strip().splitlines() or [""])[0][:300]
            raise CheckpointError(f"{path}: cannot be loaded ({type(e).__name__}: {first})") from None

    def tensors():
        for name, tensor, source in megatron_to_hf(preset, state.__getitem__, o_proj_bias=hf_arch == "llama",
                                                   dtype=DTYPES[dtype]):
            if not allow_non_finite:
                check_finite(name, tensor, f"from {source} of {path}, as {dtype}")
            log(f"  {source} -> {name} {tuple(tensor.shape)}")
            yield name, tensor

    ids = dict(bos_token_id=tokenizer.bos if tokenizer else 1, eos_token_id=tokenizer.eos if tokenizer else 2,
               pad_token_id=tokenizer.pad if tokenizer else 0)
    torch_dtype = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[dtype]
    with staged_output_dir(out, replaceable=lambda d: (d / "config.json").is_file()) as staged:
        written = hf_export.write_safetensors(tensors(), staged, max_shard_bytes=max_shard_bytes)
        del state
        written.append(hf_export.write_json(staged / "config.json", hf_export.hf_config(
            preset, hf_arch, torch_dtype=torch_dtype, **ids)))
        written.append(hf_export.write_json(staged / "generation_config.json", hf_export.generation_config(**ids)))
        if tokenizer is not None:
            written += hf_export.write_tokenizer(tokenizer, staged, prompt_prefix=prompt_prefix,
                                                 model_max_length=preset.max_position_embeddings)
        else:
            log("warning: no tokenizer given (--tokenizer-model) or recorded in the checkpoint: wrote no tokenizer "
                "files")
    log(f"[mcore_to_hf] wrote {', '.join(p.name for p in written)} to {out} in {time.perf_counter() - t0:.1f} s")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--load", required=True, help="checkpoint root (with latest_checkpointed_iteration.txt) or iter dir")
    p.add_argument("--save", required=True, help="HF model directory to write")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="dtype of the exported weights")
    p.add_argument("--tokenizer-model", default=None,
                   help="tokenizer.model or directory (default: the one recorded in the checkpoint)")
    p.add_argument("--hf-arch", choices=list(hf_export.HF_ARCHS), default=None,
                   help="dense: llama (default; exact tokenizer loading) or qwen2 (see the warning it prints); "
                        "MoE: qwen2_moe (the default and only choice)")
    p.add_argument("--no-prompt-prefix", action="store_true",
                   help="tokenizer(text) adds nothing (default: the chat prefix the model was trained with)")
    p.add_argument("--max-shard-size-mb", type=int, default=2048)
    p.add_argument("--allow-non-finite", action="store_true",
                   help="export even if tensors hold NaN/inf (refused by default, naming the tensor)")
    p.add_argument("--no-verify-checkpoint", action="store_true",
                   help="skip checking the checkpoint's files against its manifest (checksums)")
    p.add_argument("--quiet", action="store_true", help="do not list every mapped tensor")
    return p


def main(argv=None) -> int:
    from tinyllm_mcore.training.errors import run_cli

    args = build_parser().parse_args(argv)
    log = conversion_log(args.quiet)
    return run_cli(lambda: convert_mcore_to_hf(
        args.load, args.save, args.dtype, args.tokenizer_model, args.hf_arch, not args.no_prompt_prefix,
        args.max_shard_size_mb * 1024**2, log=log, allow_non_finite=args.allow_non_finite,
        verify=not args.no_verify_checkpoint))


if __name__ == "__main__":
    sys.exit(main())
