"""Hugging Face model directory -> megatron-core dist checkpoint loadable at a chosen TP/PP.

    tinyllm-hf-to-mcore --load HF_DIR --save CKPT_DIR --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2

What is accepted and what is written: tinyllm_mcore/convert/to_mcore.py.
"""
from __future__ import annotations

import argparse

from tinyllm_mcore.convert.output import add_conversion_flags, conversion_log
from tinyllm_mcore.cli.errors import run_cli
from tinyllm_mcore.runtime.quiet import add_verbose_flag


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--load", required=True, help="HF model directory (config.json + safetensors / pytorch_model.bin)")
    p.add_argument("--save", required=True, help="megatron checkpoint root to write")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    add_conversion_flags(p, "convert")
    add_verbose_flag(p)
    return p


def main(argv=None) -> int:
    from tinyllm_mcore.convert.to_mcore import convert_hf_to_mcore

    args = build_parser().parse_args(argv)
    return run_cli(lambda: convert_hf_to_mcore(
        args.load, args.save, args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
        args.make_vocab_size_divisible_by, log=conversion_log(args.quiet), allow_non_finite=args.allow_non_finite))


if __name__ == "__main__":
    raise SystemExit(main())
