"""LoRA runs for `tests.harness.distributed.run_ranks`: SFT with adapters on a base checkpoint at several layouts.

The base is layout_cases.make_checkpoints' "policy" (an initial LM checkpoint).
"""
from pathlib import Path

import torch

from tests.harness import post_training_data as data

LORA_FLAGS = ("--lora-rank", "4", "--lora-alpha", "8")
RUN_FLAGS = ("--micro-batch-size", "1", "--global-batch-size", "8", "--lr", "1e-2", "--lr-warmup-iters", "0")


def _sft(out: str, iterations: int, flags: list[str]):
    from tinyllm_mcore.stages import sft
    from tinyllm_mcore.training.loop import parse_args, train

    stage = sft.make_stage(data.sft_provider(data.corpus().sft[:16]))
    args = parse_args(stage, data.common_flags(out, "--train-iters", str(iterations), "--load",
                                               str(Path(out) / "policy"), "--finetune", *RUN_FLAGS, *flags))
    return train(stage, args, data.tokenizer())


def lora_sft_steps(out: str, flags: list[str], iterations: int) -> dict:
    """Every step's loss and grad norm of a LoRA SFT run, the full model's first-step loss, whether the base weights
    are bit-identical to the checkpoint's after training, and what the optimizer holds."""
    from tinyllm_mcore.checkpoint.io import unwrap
    from tinyllm_mcore.model.lora import adapter_parameters, is_adapter_key

    full = _sft(out, 1, [*flags, "--lr", "0"])  # no adapters, no update: the base model's first step and weights
    base_loss = full["history"][0]["lm loss"]
    base_state = {k: v.detach().clone() for c in full["chunks"] for k, v in unwrap(c).state_dict().items()
                  if torch.is_tensor(v)}
    run = _sft(out, iterations, [*flags, *LORA_FLAGS])
    steps = [{k: r[k] for k in ("lm loss", "grad_norm")} for r in run["history"] if r["split"] == "train"]
    lora_state = {k: v for c in run["chunks"] for k, v in unwrap(c).state_dict().items()}
    base_keys = [k for k in lora_state if not is_adapter_key(k) and torch.is_tensor(lora_state[k])]
    optimizer = run["optimizer"]
    optimized = [p for g in optimizer.param_groups for p in g["params"]]
    adapters = [p for c in run["chunks"] for _, p in adapter_parameters(unwrap(c))]
    trainable = [p for c in run["chunks"] for p in unwrap(c).parameters() if p.requires_grad]
    b_norm = sum(float(p.float().norm()) for c in run["chunks"] for n, p in adapter_parameters(unwrap(c))
                 if n.endswith("lora_B"))
    return {
        "steps": steps, "base_loss": base_loss,
        "base_unchanged": all(torch.equal(lora_state[k], base_state[k]) for k in base_keys),
        "base_keys": len(base_keys), "base_keys_expected": len(base_state),
        "optimizer_numel": sum(p.numel() for p in optimized),
        "adapter_numel": sum(p.numel() for p in adapters),
        "trainable_is_adapters": {id(p) for p in trainable} == {id(p) for p in adapters},
        "optimizer_state_numel": sum(v.numel() for o in getattr(optimizer, "chained_optimizers", [optimizer])
                                     for s in o.optimizer.state.values() for v in s.values()
                                     if torch.is_tensor(v) and v.dim() > 0),
        "b_norm": b_norm,
    }


def lora_dpo_first_step(out: str, flags: list[str]) -> dict:
    """DPO's first step with adapters on the policy (the reference is --ref-load's, without adapters)."""
    from tests.stages.layout_cases import dpo_first_step

    return dpo_first_step(out, [*flags, *LORA_FLAGS])
