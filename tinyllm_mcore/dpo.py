"""DPO stage: `torchrun ... -m tinyllm_mcore.dpo --load SFT_CKPT --finetune --preference-data PREFIX ...`.

Direct Preference Optimization (Rafailov et al. 2023): the policy starts from the SFT checkpoint and is trained
against a frozen reference model (by default the same checkpoint) with

    loss = -logsigmoid(β·((log πθ(c) − log πref(c)) − (log πθ(r) − log πref(r))))     (β 0.1, the seed's)

(with label smoothing ε: (1−ε)·that − ε·logsigmoid(−…), the conservative-DPO form). Sequence log-probs sum the
response tokens only (loss_mask), computed by megatron's vocab-parallel cross-entropy, so under TP no rank ever
gathers full-vocabulary logits.

Batch shape: a preference sample is a pair (leading dim 2: chosen, rejected), so chosen and rejected of a pair are
always in the same micro-batch; the micro-batch [mbs, 2, s] runs as [2·mbs, s].

The reference model lives in the same parallel layout as the policy (one frozen chunk per policy chunk, no grads,
no optimizer state). Under pipeline parallelism it rides the policy's pipeline: each stage runs the policy and the
reference on their halves of the received activations and sends both on ([s, 2·mbs policy ‖ 2·mbs reference, h]),
so the loss on the last stage sees both log-probs of the same micro-batch. Why not precompute the reference
log-probs once? For a single epoch both cost the same reference forward per pair (the in-pipeline reference adds
one forward-only pass per step, ~1/4 of a step's compute — see docs / the report measurement); precomputing only
pays off for several epochs, and costs a separate pass whose outputs must follow samples through DP sharding and
shuffling. Holding the reference costs its weights only (no grads or Adam state: ~1/4 of the policy's training
memory in fp32).
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

from tinyllm_mcore.pretrain import batch_to_device
from tinyllm_mcore.training.loop import Stage, main

REPORT_NAMES = ("dpo loss", "rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin",
                "logps/chosen", "logps/rejected")

# policy chunk (unwrapped GPTModel) id -> its frozen reference chunk; set by `build_reference`
_REFERENCES: dict[int, torch.nn.Module] = {}


def add_dpo_args(parser) -> None:
    g = parser.add_argument_group("DPO")
    g.add_argument("--preference-data", nargs="*", default=None,
                   help="preference jsonl ({prompt, chosen, rejected}) or preprocessed indexed prefix(es)")
    g.add_argument("--beta", type=float, default=0.1, help="DPO temperature β (the seed's 0.1)")
    g.add_argument("--label-smoothing", type=float, default=0.0, help="conservative DPO ε in [0, 0.5)")
    g.add_argument("--ref-load", default=None,
                   help="reference checkpoint (default: --load, i.e. the policy's starting weights)")
    # a sample is a (chosen, rejected) pair; no --data-path needed
    parser.set_defaults(sequences_per_sample=2, allow_no_data=True, shuffle_each_epoch=True)


# ---------------------------------------------------------------------------------------------------------------
# Loss


def sequence_logps(per_token_nll: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Sum of response-token log-probs per sequence: [n, s] −log p(label) (vocab-parallel CE) -> [n]."""
    return -(per_token_nll.float() * loss_mask.float()).sum(dim=-1)


def dpo_loss(reference_nll: torch.Tensor, loss_mask: torch.Tensor, beta: float, label_smoothing: float,
             policy_nll: torch.Tensor):
    """Loop convention (loss_sum, count, reports); rows of the [2·mbs, s] tensors alternate chosen, rejected."""
    policy = sequence_logps(policy_nll, loss_mask).view(-1, 2)
    reference = sequence_logps(reference_nll, loss_mask).view(-1, 2)
    rewards = beta * (policy - reference.detach())  # [pairs, 2]: implicit rewards of chosen, rejected
    margin = rewards[:, 0] - rewards[:, 1]
    losses = -F.logsigmoid(margin) * (1 - label_smoothing) - F.logsigmoid(-margin) * label_smoothing
    loss_sum = losses.sum()
    pairs = torch.tensor(float(losses.numel()), device=losses.device)
    stats = {
        "dpo loss": loss_sum,
        "rewards/chosen": rewards[:, 0].sum(),
        "rewards/rejected": rewards[:, 1].sum(),
        # a tie (margin 0: every pair at the first step, when policy = reference) counts as not accurate
        "rewards/accuracy": (margin > 0).float().sum(),
        "rewards/margin": margin.sum(),
        "logps/chosen": policy[:, 0].sum(),
        "logps/rejected": policy[:, 1].sum(),
    }
    reports = {k: torch.stack([v.detach().float(), pairs]) for k, v in stats.items()}
    return loss_sum, pairs.to(torch.int), reports


# ---------------------------------------------------------------------------------------------------------------
# Forward step: policy and frozen reference on the same micro-batch


def flatten_pairs(batch: dict) -> dict:
    """[mbs, 2, s] -> [2·mbs, s], rows alternating chosen, rejected."""
    for k, v in batch.items():
        if v.dim() < 3 or v.size(1) != 2:
            raise ValueError(f"preference samples need a leading pair dimension of 2; {k!r} has shape "
                             f"{tuple(v.shape[1:])}")
    return {k: v.flatten(0, 1) for k, v in batch.items()}


def pair_attention_mask(batch: dict):
    if "segment_ids" in batch:
        from tinyllm_mcore.data.sft import packed_attention_mask

        return packed_attention_mask(batch["segment_ids"])
    return None


def run_policy_and_reference(model, reference, tokens, position_ids, attention_mask, labels):
    """Forward this pipeline stage of the policy (with grad) and the reference (without).

    Returns (policy_output, reference_output): per-token −log p on the last stage, hidden states elsewhere.
    """
    from tinyllm_mcore.training.checkpoint import unwrap

    policy = unwrap(model)
    if not policy.pre_process:  # split what the previous stage sent: [s, policy rows ‖ reference rows, h]
        received = policy.decoder.input_tensor
        rows = received.size(1) // 2
        policy.set_input_tensor(received[:, :rows])
        unwrap(reference).set_input_tensor(received[:, rows:].detach())
    policy_out = model(tokens, position_ids, attention_mask, labels=labels)
    with torch.no_grad():
        reference_out = reference(tokens, position_ids, attention_mask, labels=labels)
    return policy_out, reference_out


def dpo_forward_step(data_iterator, model, *, beta: float, label_smoothing: float):
    from tinyllm_mcore.training.checkpoint import unwrap

    batch = flatten_pairs(batch_to_device(next(data_iterator)))
    reference = _REFERENCES[id(unwrap(model))]
    policy_out, reference_out = run_policy_and_reference(
        model, reference, batch["tokens"], batch["position_ids"], pair_attention_mask(batch), batch["labels"])
    if not unwrap(model).post_process:
        # send both to the next stage in one tensor (the loop sizes it with sequences_per_sample = 4)
        return torch.cat([policy_out, reference_out.to(policy_out.dtype)], dim=1), None
    return policy_out, partial(dpo_loss, reference_out, batch["loss_mask"], beta, label_smoothing)


# ---------------------------------------------------------------------------------------------------------------
# Reference model


def build_reference(args, chunks) -> list[torch.nn.Module]:
    """One frozen copy per policy chunk, same layout; weights from --ref-load, else copied from the policy as loaded."""
    from megatron.core.transformer.module import Float16Module
    from megatron.core.utils import get_model_config

    from tinyllm_mcore.presets import ModelPreset
    from tinyllm_mcore.training import checkpoint as ckpt
    from tinyllm_mcore.training.loop import default_model_provider

    preset = ModelPreset(**args.preset)
    references = []
    for chunk in chunks:
        policy = ckpt.unwrap(chunk)
        config = get_model_config(policy)
        reference = default_model_provider(args, preset, config, policy.pre_process, policy.post_process,
                                           getattr(policy, "vp_stage", None))
        if torch.cuda.is_available():
            reference.cuda(torch.cuda.current_device())
        if args.bf16 or args.fp16:
            reference = Float16Module(config, reference)
        references.append(reference)
    if args.ref_load:
        ckpt.load_checkpoint(args.ref_load, references, finetune=True)
    else:
        for reference, chunk in zip(references, chunks):
            ckpt.unwrap(reference).load_state_dict(ckpt.unwrap(chunk).state_dict(), strict=True)
    _REFERENCES.clear()
    for reference, chunk in zip(references, chunks):
        reference.eval()
        reference.requires_grad_(False)
        _REFERENCES[id(ckpt.unwrap(chunk))] = reference
    return references


def after_load(args, chunks) -> None:
    if not args.load and not args.ref_load:
        raise ValueError("DPO needs a starting checkpoint: --load SFT_CKPT --finetune (and/or --ref-load)")
    build_reference(args, chunks)
    if args.pipeline_model_parallel_size > 1:
        args.sequences_per_sample = 4  # pipeline messages carry policy and reference activations of each pair


# ---------------------------------------------------------------------------------------------------------------
# Data


def preference_datasets(args, tokenizer, preset):
    if not args.preference_data:
        raise ValueError("give --preference-data FILE.jsonl or indexed PREFIX")
    if tokenizer is None:
        raise ValueError("DPO needs --tokenizer-model (the chat format's role markers come from the tokenizer)")
    from tinyllm_mcore.data.preference import build_preference_datasets

    return build_preference_datasets(args.preference_data, tokenizer=tokenizer, seq_length=args.seq_length,
                                     split=args.split, seed=args.seed)


def make_stage(datasets_provider=preference_datasets) -> Stage:
    def forward_step(data_iterator, model):
        args = _ARGS["args"]
        return dpo_forward_step(data_iterator, model, beta=args.beta, label_smoothing=args.label_smoothing)

    def remember_args(args, chunks):
        if not 0 <= args.label_smoothing < 0.5:
            raise ValueError(f"--label-smoothing must be in [0, 0.5), got {args.label_smoothing}")
        _ARGS["args"] = args
        after_load(args, chunks)

    return Stage(name="dpo", datasets_provider=datasets_provider, forward_step=forward_step,
                 extra_args=add_dpo_args, default_warmup_fraction=0.1, after_load=remember_args,
                 report_names=REPORT_NAMES)


_ARGS: dict = {}
STAGE = make_stage()

if __name__ == "__main__":
    from tinyllm_mcore.pretrain import load_tokenizer

    raise SystemExit(main(STAGE, tokenizer_loader=load_tokenizer))
