"""A LoRA checkpoint's adapters as a Hugging Face PEFT adapter folder for the Llama layout the export writes.

`PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE_EXPORT), DIR)` loads it (BASE_EXPORT: the
base checkpoint exported with tinyllm-mcore-to-hf). Names: our fused linear_qkv becomes q_proj, k_proj and v_proj,
each with the shared lora_A and its rows of lora_B (the converter's q/k/v split of the fused weight applied to B);
linear_fc1 becomes gate_proj and up_proj the same way; linear_proj is o_proj, linear_fc2 down_proj. PEFT adds
(lora_alpha / r) B A x per module, which is exactly our fused adapter's output split by rows.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from tinyllm_mcore.convert.mapping import mapping_table
from tinyllm_mcore.model.lora import TARGETS, LoraSettings, adapters_of

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def peft_tensors(model, preset, settings: LoraSettings, padded: int) -> dict[str, torch.Tensor]:
    """PEFT's state dict (fp32) for the whole model's adapters (TP1, PP1)."""
    table = {e.megatron: e for e in mapping_table(preset, padded) if e.megatron is not None}
    tensors = {}
    for layer_number, target, _, adapter in adapters_of(model, settings):
        parent_name, linear_name, _ = TARGETS[target]
        entry = table[f"decoder.layers.{layer_number - 1}.{parent_name}.{linear_name}.weight"]
        a, b = adapter.lora_A.detach().float(), adapter.lora_B.detach().float()
        for hf_name, b_rows in zip(entry.hf, entry.transform.to_hf(b)):  # B's rows split as the weight's are
            module = PEFT_PREFIX + hf_name.removesuffix(".weight")
            tensors[f"{module}.lora_A.weight"] = a.clone().contiguous()
            tensors[f"{module}.lora_B.weight"] = b_rows.clone().contiguous()
    return tensors


def peft_target_modules(preset, settings: LoraSettings) -> list[str]:
    table = {e.megatron: e for e in mapping_table(preset, preset.vocab_size) if e.megatron is not None}
    names = []
    for target in settings.targets:
        parent_name, linear_name, _ = TARGETS[target]
        for hf_name in table[f"decoder.layers.0.{parent_name}.{linear_name}.weight"].hf:
            names.append(hf_name.removesuffix(".weight").rsplit(".", 1)[1])
    return names


def write_peft_adapter(out_dir: Path, model, preset, settings: LoraSettings, padded: int, *, source: str) -> list[Path]:
    """adapter_config.json and adapter_model.safetensors into the (staged, empty) `out_dir`."""
    from safetensors.torch import save_file

    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": settings.rank, "lora_alpha": settings.alpha,
        "lora_dropout": settings.dropout, "target_modules": peft_target_modules(preset, settings), "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
        "inference_mode": True, "modules_to_save": None, "base_model_name_or_path": None,
        "revision": None, "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
        "alpha_pattern": {}, "megatron_config": None, "megatron_core": "megatron.core",
    }
    weights = out_dir / ADAPTER_WEIGHTS
    save_file(peft_tensors(model, preset, settings, padded), str(weights), metadata={"format": "pt", "source": source})
    config_path = out_dir / ADAPTER_CONFIG
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    return [config_path, weights]
