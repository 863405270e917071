"""Frozen reference models for the stages that train against one (DPO, GRPO's KL term).

The reference lives in the same parallel layout as the policy (one frozen chunk per policy chunk, no grads, no
optimizer state). Under pipeline parallelism it rides the policy's pipeline: each stage runs the policy and the
reference on their halves of the received activations and sends both on ([s, policy rows ‖ reference rows, h]),
so the loss on the last stage sees both log-probs of the same micro-batch (the stage declares
models_per_pipeline_message=2).
"""
from __future__ import annotations

import torch


def build_references(ctx, ref_load: str | None) -> None:
    """One frozen copy per policy chunk, same layout; weights from `ref_load`, else copied from the policy as loaded.
    A `ref_load` checkpoint must hold the policy's model (preset, tokenizer) — one error line otherwise."""
    from megatron.core.utils import get_model_config

    from tinyllm_mcore.checkpoint import io as ckpt
    from tinyllm_mcore.model.build import build_chunks, use_te_for

    args = ctx.args
    # the policy's config: the same layout, virtual-pipeline chunks and precision
    references = build_chunks(ctx.preset, get_model_config(ckpt.unwrap(ctx.chunks[0])), head=ctx.model_head,
                              seed=args.seed,
                              # a LoRA policy is on the local spec (model/lora.py): the reference's keys are its base's
                              use_te=False if ctx.lora is not None else use_te_for(args.transformer_impl),
                              make_vocab_size_divisible_by=args.make_vocab_size_divisible_by)
    if ref_load:
        saved = ckpt.read_checkpoint(ckpt.resolve_load_dir(ref_load), verify=not args.no_verify_checkpoint,
                                     require_manifest=args.require_manifest)
        try:
            ckpt.check_matches_run(saved, ctx.preset, ctx.tokenizer_identity, args.allow_tokenizer_change)
        except ValueError as e:  # the policy's own message says "pass --model-size": here the reference is wrong
            raise ValueError(f"--ref-load: {e}".replace(": pass --model-size", "; the reference must be the "
                                                         "policy's model, e.g. its own start --model-size")) from None
        ckpt.load_checkpoint(saved, references, finetune=True)
    else:
        from tinyllm_mcore.model.lora import is_adapter_key

        for reference, chunk in zip(references, ctx.chunks):  # a LoRA policy's base (its adapters start at B = 0)
            base = {k: v for k, v in ckpt.unwrap(chunk).state_dict().items() if not is_adapter_key(k)}
            ckpt.unwrap(reference).load_state_dict(base, strict=True)
    for reference in references:
        reference.eval()
        reference.requires_grad_(False)
    ctx.references = references


def run_policy_and_reference(model, reference, tokens, position_ids, mask, labels):
    """Forward this pipeline stage of the policy (with grad) and the reference (without).

    Returns (policy_output, reference_output): per-token −log p on the last stage, hidden states elsewhere.
    """
    from tinyllm_mcore.checkpoint.io import unwrap

    policy = unwrap(model)
    if not policy.pre_process:  # split what the previous stage sent: [s, policy rows ‖ reference rows, h]
        received = policy.decoder.input_tensor
        rows = received.size(1) // 2
        policy.set_input_tensor(received[:, :rows])
        unwrap(reference).set_input_tensor(received[:, rows:].detach())
    policy_out = model(tokens, position_ids, mask, labels=labels)
    with torch.no_grad():
        reference_out = reference(tokens, position_ids, mask, labels=labels)
    return policy_out, reference_out


def pipeline_message(policy_out: torch.Tensor, reference_out: torch.Tensor) -> torch.Tensor:
    """What a non-last stage sends on: both models' activations in one tensor."""
    return torch.cat([policy_out, reference_out.to(policy_out.dtype)], dim=1)
