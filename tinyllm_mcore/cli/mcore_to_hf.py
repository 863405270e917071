"""megatron-core dist checkpoint (any TP/PP) -> Hugging Face model directory.

    tinyllm-mcore-to-hf --load CKPT_DIR --save HF_DIR [--dtype bf16] [--tokenizer-model PATH]
    tinyllm-mcore-to-hf --load LORA_CKPT --save MERGED_HF_DIR [--peft-adapter ADAPTER_DIR]

What is written and why: tinyllm_mcore/convert/to_hf.py.
"""
from __future__ import annotations

import argparse

from tinyllm_mcore.convert.output import add_conversion_flags, conversion_log
from tinyllm_mcore.checkpoint.io import add_load_check_flags
from tinyllm_mcore.cli.errors import run_cli
from tinyllm_mcore.runtime.quiet import add_verbose_flag

DTYPE_CHOICES = ("fp32", "fp16", "bf16")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--load", required=True, help="checkpoint root (with latest_checkpointed_iteration.txt) or iter dir")
    p.add_argument("--save", default=None,
                   help="HF model directory to write (a LoRA checkpoint: base and adapters merged)")
    p.add_argument("--peft-adapter", default=None, metavar="DIR",
                   help="a LoRA checkpoint: also write its adapters as a PEFT adapter folder for the base's export")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="fp32", help="dtype of the exported weights")
    p.add_argument("--tokenizer-model", default=None,
                   help="tokenizer.model or directory (default: the one recorded in the checkpoint)")
    # qwen2 stays a choice so that asking for it gets the one-line reason (convert/to_hf.py) instead of argparse's
    p.add_argument("--hf-arch", choices=("llama", "qwen2", "qwen2_moe"), default=None,
                   help="dense: llama (the default; qwen2 is refused, see its message); MoE: qwen2_moe (the default "
                        "and only choice)")
    p.add_argument("--no-prompt-prefix", action="store_true",
                   help="tokenizer(text) adds nothing (default: the chat prefix the model was trained with)")
    p.add_argument("--max-shard-size-mb", type=int, default=2048)
    add_load_check_flags(p)
    add_conversion_flags(p, "export")
    add_verbose_flag(p)
    return p


def main(argv=None) -> int:
    from tinyllm_mcore.convert.to_hf import convert_mcore_to_hf

    args = build_parser().parse_args(argv)
    return run_cli(lambda: convert_mcore_to_hf(
        args.load, args.save, args.dtype, args.tokenizer_model, args.hf_arch, not args.no_prompt_prefix,
        args.max_shard_size_mb * 1024**2, log=conversion_log(args.quiet), allow_non_finite=args.allow_non_finite,
        verify=not args.no_verify_checkpoint, require_manifest=args.require_manifest,
        allow_tokenizer_change=args.allow_tokenizer_change, peft_adapter=args.peft_adapter))


if __name__ == "__main__":
    raise SystemExit(main())
