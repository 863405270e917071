"""megatron-core dist checkpoint (any TP/PP, local or TE layer names) -> Hugging Face model directory.

The directory loads with plain ``AutoModelForCausalLM.from_pretrained(dir)`` and ``AutoTokenizer.from_pretrained``
(no trust_remote_code): dense models as ``LlamaForCausalLM`` with attention_bias (o_proj.bias written as zeros:
numerically the seed's Qwen2 architecture), MoE models as ``Qwen2MoeForCausalLM``. Padded vocab rows are stripped.
The tokenizer is the one given, else the run's ``--tokenizer-model`` recorded in the checkpoint. One CPU process:
megatron reshards the checkpoint into the whole model on load, then tensors stream into (sharded when large)
safetensors.

Dense models are not exported as ``qwen2``: transformers 5's AutoTokenizer forces its byte-level Qwen2Tokenizer on
``model_type: qwen2`` whatever ``tokenizer_class`` says, so the exported tokenizer would not be ours. The llama export
is numerically the same model and its tokenizer loads exactly.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from tinyllm_mcore.checkpoint import adapters
from tinyllm_mcore.convert.hf_config import default_hf_arch, generation_config, hf_config
from tinyllm_mcore.convert.hf_folder import write_hf_folder
from tinyllm_mcore.convert.mapping import (
    MC_EMBED, MappingError, check_finite, dist_checkpoint_shapes, local_name, mapping_table, megatron_to_hf,
)
from tinyllm_mcore.convert.mcore_model import single_process_megatron, whole_model
from tinyllm_mcore.convert.output import staged_output_dir
from tinyllm_mcore.convert.peft_adapter import ADAPTER_CONFIG, write_peft_adapter
from tinyllm_mcore.model.lora import merged_state_dict

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
EXPORT_ARCHS = ("llama", "qwen2_moe")  # and "qwen2", refused with QWEN2_REFUSED
QWEN2_REFUSED = (
    "--hf-arch qwen2 is not supported: transformers' AutoTokenizer forces its byte-level Qwen2Tokenizer on qwen2 "
    "directories (ignoring tokenizer_class), so the export would not tokenize as the model was trained; use the "
    "default --hf-arch llama (attention biases with a zero o_proj bias: numerically the same Qwen2 model)")


def _check_checkpoint_shapes(path, preset, saved_shapes: dict) -> int:
    """Compare the checkpoint's tensors with the preset's; return the checkpoint's padded vocab rows."""
    if MC_EMBED not in saved_shapes:
        raise MappingError(f"{path} holds no {MC_EMBED} (not a GPT model checkpoint?)")
    padded = saved_shapes[MC_EMBED][0]
    if padded < preset.vocab_size:
        raise MappingError(f"checkpoint embedding has {padded} rows, fewer than the vocab size {preset.vocab_size}")
    expected = {local_name(k): s for k, s in dist_checkpoint_shapes(preset, 1, padded).items()}
    for key, shape in saved_shapes.items():
        key = local_name(key)  # either spelling of the layer norms
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
                        verify: bool = True, require_manifest: bool = False,
                        allow_tokenizer_change: bool = False, peft_adapter: str | os.PathLike | None = None) -> Path:
    """Export; return the HF directory. Raises ValueError/FileNotFoundError with one-line messages.

    Tensors with NaN/inf values (also a finite value that overflows ``dtype``) are refused unless
    ``allow_non_finite``. The directory is written under a temporary name beside ``save`` and renamed when
    complete, so a failure (bad input, disk full) leaves nothing; an earlier export at ``save`` is replaced.
    ``verify`` checks the checkpoint's files against its manifest first. The tokenizer (given, or the one recorded)
    must be the one the checkpoint was trained with (checkpoint.io.check_tokenizer), unless
    ``allow_tokenizer_change``: an export ships its tokenizer, and a wrong one would be a silently wrong release.

    A LoRA checkpoint (checkpoint/adapters.py) is opened with its base: ``save`` gets the merged model,
    W + (alpha / r) B A, and ``peft_adapter`` (LoRA checkpoints only) a PEFT adapter folder for the base's export
    (convert/peft_adapter.py). ``save`` may be None when ``peft_adapter`` is given."""
    from tinyllm_mcore.tokenizer.core import Tokenizer
    from tinyllm_mcore.checkpoint.io import (
        check_tokenizer, load_checkpoint, read_checkpoint, resolve_load_dir, saved_tensor_shapes,
    )

    t0 = time.perf_counter()
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}")
    if hf_arch == "qwen2":
        raise ValueError(QWEN2_REFUSED)
    if hf_arch is not None and hf_arch not in EXPORT_ARCHS:
        raise ValueError(f"unsupported --hf-arch {hf_arch!r}; choose one of {', '.join(EXPORT_ARCHS)}")
    # the files first (checksums), then what they hold
    if save is None and peft_adapter is None:
        raise ValueError("give --save HF_DIR (the model) and/or --peft-adapter DIR (a LoRA checkpoint's adapters)")
    saved = read_checkpoint(resolve_load_dir(load), verify=verify, require_manifest=require_manifest)
    path, preset, run = saved.path, saved.preset, saved.metadata
    base, lora = None, None
    if adapters.is_lora_checkpoint(saved):  # adapters only: the base they were trained on holds the weights
        base = adapters.open_base(saved, verify=verify, require_manifest=require_manifest)
        lora = adapters.settings_of(saved)
    elif peft_adapter is not None:
        raise ValueError(f"--peft-adapter: {path} is not a LoRA checkpoint (it holds no adapters)")
    hf_arch = hf_arch or default_hf_arch(preset)
    if hf_arch != default_hf_arch(preset):
        raise MappingError(f"--hf-arch {hf_arch} does not fit this {'MoE' if preset.num_experts else 'dense'} "
                           f"checkpoint; use {default_hf_arch(preset)}")
    tokenizer_model = tokenizer_model or run.tokenizer_model
    # an unreadable file is the loader's one line, naming it
    tokenizer = Tokenizer.load(tokenizer_model, run.tokenizer_type) if tokenizer_model else None
    if tokenizer is not None:
        check_tokenizer(saved, tokenizer.vocab_size, tokenizer.identity, allow_change=allow_tokenizer_change)
    out = Path(save) if save is not None else None
    weights = base if base is not None else saved

    with single_process_megatron():
        padded = _check_checkpoint_shapes(weights.path, preset, saved_tensor_shapes(weights.path))
        log(f"[mcore_to_hf] {path} (saved at TP{run.tensor_model_parallel_size or '?'} "
            f"PP{run.pipeline_model_parallel_size or '?'}; {preset.name}, vocab {preset.vocab_size} of "
            f"{padded} rows{f'; LoRA r={lora.rank} on {base.path}' if lora else ''}) -> "
            f"{out or peft_adapter} as {hf_arch}, {dtype}")
        model = whole_model(preset, padded, lora=lora)
        if lora is not None:
            adapters.load(saved, base, [model], finetune=True)
            state = merged_state_dict(model, lora)
        else:
            load_checkpoint(saved, [model], finetune=True)
            state = model.state_dict()
        state = {k: v for k, v in state.items() if not k.endswith("._extra_state")}
        if peft_adapter is not None:
            with staged_output_dir(peft_adapter, replaceable=lambda d: (d / ADAPTER_CONFIG).is_file()) as staged:
                write_peft_adapter(staged, model, preset, lora, padded, source=str(path))
            log(f"[mcore_to_hf] wrote the PEFT adapter {peft_adapter} (load it on the export of {base.path})")
        del model
    if out is None:
        return Path(peft_adapter)

    with staged_output_dir(out, replaceable=lambda d: (d / "config.json").is_file()) as staged:
        written = write_hf_export(staged, preset, padded, state.__getitem__, source=str(path), tokenizer=tokenizer,
                                  dtype=dtype, hf_arch=hf_arch, prompt_prefix=prompt_prefix,
                                  max_shard_bytes=max_shard_bytes, log=log, allow_non_finite=allow_non_finite)
    if tokenizer is None:
        log("warning: no tokenizer given (--tokenizer-model) or recorded in the checkpoint: wrote no tokenizer files")
    log(f"[mcore_to_hf] wrote {', '.join(p.name for p in written)} to {out} in {time.perf_counter() - t0:.1f} s")
    return out


def write_hf_export(out_dir: Path, preset, padded: int, read_mc, *, source: str, tokenizer=None, dtype: str = "fp32",
                    hf_arch: str | None = None, prompt_prefix: bool = True, max_shard_bytes: int = 2 * 1024**3,
                    log=print, allow_non_finite: bool = False) -> list[Path]:
    """The HF folder of one whole model into the (staged, empty) directory ``out_dir``: what the export writes,
    whoever holds the tensors (this converter, or a training run's --save-hf). ``read_mc(name)`` gives the global
    tensor of a local-spec state-dict name with its ``padded`` vocab rows; ``source`` names where they come from in
    messages. Returns the files written (hf_folder.write_hf_folder, its manifest last)."""
    hf_arch = hf_arch or default_hf_arch(preset)

    def tensors():
        table = mapping_table(preset, padded, o_proj_bias=hf_arch == "llama")
        for name, tensor, origin in megatron_to_hf(table, read_mc, dtype=DTYPES[dtype]):
            if not allow_non_finite:
                check_finite(name, tensor, f"from {origin} of {source}, as {dtype}")
            log(f"  {origin} -> {name} {tuple(tensor.shape)}")
            yield name, tensor

    ids = dict(bos_token_id=tokenizer.bos if tokenizer else 1, eos_token_id=tokenizer.eos if tokenizer else 2,
               pad_token_id=tokenizer.pad if tokenizer else 0)
    torch_dtype = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[dtype]
    return write_hf_folder(out_dir, tensors(), hf_config(preset, hf_arch, torch_dtype=torch_dtype, **ids),
                           generation_config(**ids), tokenizer=tokenizer, prompt_prefix=prompt_prefix,
                           max_shard_bytes=max_shard_bytes)
