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


def lora_resume(out: str, flags: list[str], other_flags: list[str]) -> dict:
    """4 LoRA steps in one run, and 2 + 2 with a save and resume in between: the losses, and what the saved
    checkpoint holds (its model tensors, its metadata's base record); the last 2 steps again from iteration 2's
    checkpoint at `other_flags`' layout."""
    from megatron.core import parallel_state as ps

    from tinyllm_mcore.checkpoint.io import read_checkpoint, resolve_load_dir, saved_tensor_shapes

    straight = _sft_lora(out, 4, flags)
    save = str(Path(out) / "lora_resume")
    first = _sft_lora(out, 4, [*flags, "--save", save, "--exit-interval", "2"])
    resumed = _sft_lora(out, 4, [*flags, "--save", save], load=save)
    saved = read_checkpoint(resolve_load_dir(save))
    ps.destroy_model_parallel()  # another layout (the process group stays)
    other = _sft_lora(out, 4, other_flags, load=str(Path(save) / "iter_0000002"))
    return {"resumed_other_layout": [r["lm loss"] for r in other["history"]],
            "straight": [r["lm loss"] for r in straight["history"]],
            "resumed": [r["lm loss"] for r in first["history"] + resumed["history"]],
            "grad_norms": [[r["grad_norm"] for r in straight["history"]],
                           [r["grad_norm"] for r in first["history"] + resumed["history"]]],
            "saved_keys": sorted(k for k in saved_tensor_shapes(saved.path) if not k.startswith("optimizer")),
            "lora": saved.metadata.lora, "lora_base": saved.metadata.lora_base}


def _sft_lora(out: str, iterations: int, flags: list[str], load: str | None = None):
    from tinyllm_mcore.stages import sft
    from tinyllm_mcore.training.loop import parse_args, train

    stage = sft.make_stage(data.sft_provider(data.corpus().sft[:16]))
    start = ["--load", load] if load else ["--load", str(Path(out) / "policy"), "--finetune"]
    args = parse_args(stage, data.common_flags(out, "--train-iters", str(iterations), *start, *RUN_FLAGS,
                                               *LORA_FLAGS, *flags))
    return train(stage, args, data.tokenizer())
