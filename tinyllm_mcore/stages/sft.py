"""SFT stage: `torchrun ... -m tinyllm_mcore.stages.sft --load PRETRAIN_CKPT --finetune --sft-data sft.jsonl ...`.

Same flags as pretraining plus `--sft-data` (chat jsonl — the seed's {question, answer[, system]} or {messages} —
or a prefix preprocessed by tools/preprocess_data.py --mode sft). The loss is the pretraining cross-entropy masked
to assistant tokens (data/sft.py builds loss masks and packs conversations with segment_ids; the shared LM forward
step turns those into a block-causal mask). Seed defaults: lr 3e-4 cosine, 3% warmup; `--finetune` loads the
pretrained weights only (fresh iteration count, optimizer and schedule).
"""
from __future__ import annotations

from tinyllm_mcore.training.loop import Stage, run_stage
from tinyllm_mcore.training.batches import lm_forward_step


def add_sft_args(parser) -> None:
    g = parser.add_argument_group("SFT")
    g.add_argument("--sft-data", nargs="*", default=None,
                   help="chat jsonl file(s) or indexed prefix(es) from preprocess_data --mode sft")
    g.add_argument("--no-pack", action="store_true", help="one conversation per sequence (padded) instead of packing")


def sft_datasets(ctx):
    args = ctx.args
    if not args.sft_data:
        raise ValueError("give --sft-data FILE.jsonl or indexed PREFIX")
    if ctx.tokenizer is None:
        raise ValueError("SFT needs --tokenizer-model (the chat format's role markers come from the tokenizer)")
    from tinyllm_mcore.data.sft_samples import build_sft_datasets

    return build_sft_datasets(args.sft_data, tokenizer=ctx.tokenizer, seq_length=args.seq_length, split=args.split,
                              seed=args.seed, pack=not args.no_pack)


def make_stage(datasets_provider=sft_datasets) -> Stage:
    return Stage(name="sft", datasets_provider=datasets_provider, forward_step=lm_forward_step,
                 extra_args=add_sft_args, default_warmup_fraction=0.03, needs_data_path=False,
                 shuffle_each_epoch=True, perplexity_of="lm loss")


STAGE = make_stage()


def main(argv=None) -> int:
    return run_stage(STAGE, argv)


if __name__ == "__main__":
    raise SystemExit(main())
