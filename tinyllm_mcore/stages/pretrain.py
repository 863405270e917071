"""Pretraining stage: `torchrun --nproc-per-node N -m tinyllm_mcore.stages.pretrain --model-size 92m --data-path ...`.

Megatron-LM's pretrain_gpt.py shape: a datasets provider (megatron GPTDataset blends over indexed files, or
MockGPTDataset) and a forward step whose loss is the masked next-token cross-entropy. The generic loop does the rest.
"""
from __future__ import annotations

from tinyllm_mcore.data.prefixes import checked_blend, parse_blend
from tinyllm_mcore.training.loop import Stage, run_stage
from tinyllm_mcore.training.batches import lm_forward_step


def num_samples(ctx) -> tuple[int, int, int]:
    """Samples megatron's GPTDataset builds for train, validation (every evaluation) and test."""
    args, batch = ctx.args, ctx.batch.global_batch_size
    evals = (args.train_iters // args.eval_interval + 1) if args.eval_interval else 0
    return args.train_iters * batch, evals * args.eval_iters * batch, args.eval_iters * batch


class SyntheticTokenizer:
    """For --mock-data without --tokenizer-model: megatron's mock dataset needs only a vocab size and an eod id."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.eod = self.eos = 0
        self.pad = -1  # never a real id: no label is masked as padding
        self.unique_identifiers = {"class": "SyntheticTokenizer", "vocab_size": vocab_size}


def pretrain_datasets(ctx):
    from tinyllm_mcore.data.pretrain import build_pretrain_datasets

    args, tokenizer = ctx.args, ctx.tokenizer
    if tokenizer is None:
        if not args.mock_data:
            raise ValueError("--data-path needs --tokenizer-model (its eod/pad ids define documents and padding)")
        tokenizer = SyntheticTokenizer(ctx.preset.vocab_size)
    if not args.mock_data:  # data whose vocabulary sidecar says it does not fit is refused before training
        from tinyllm_mcore.data.vocab_contract import check_prefix_vocab

        for prefix in parse_blend(args.data_path)[0]:
            check_prefix_vocab(prefix, ctx.preset.vocab_size, ctx.tokenizer_identity, mode="pretrain")

    return build_pretrain_datasets(
        data_path=args.data_path, split=args.split, seq_length=args.seq_length, seed=args.seed,
        tokenizer=tokenizer, num_samples=num_samples(ctx), mock=args.mock_data, cache_dir=args.data_cache_path)


def check_data_paths(args) -> None:
    """Every --data-path prefix has its .bin and .idx (weights are the numbers between prefixes)."""
    if not args.mock_data and args.data_path:
        checked_blend(args.data_path)


STAGE = Stage(name="pretrain", datasets_provider=pretrain_datasets, forward_step=lm_forward_step,
              default_warmup_fraction=0.05, check_args=check_data_paths, perplexity_of="lm loss")


def main(argv=None) -> int:
    return run_stage(STAGE, argv)


if __name__ == "__main__":
    raise SystemExit(main())
