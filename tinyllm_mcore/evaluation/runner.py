"""Open the model to evaluate (an mcore checkpoint or an HF export) and run a whole evaluation; used by
tools/evaluate.py and callable from Python."""
from __future__ import annotations

import json
from pathlib import Path

from tinyllm_mcore.evaluation.backends import CausalLM, HFCausalLM, McoreCausalLM
from tinyllm_mcore.evaluation.encoders import HFEncoder, SentencePieceEncoder


def open_hf(path: str, *, tokenizer_model: str | None = None, tokenizer_type: str = "auto", add_prefix: bool = True,
            bf16: bool = False) -> tuple[CausalLM, object]:
    """An HF export: AutoModelForCausalLM + AutoTokenizer (or the project's Tokenizer with `tokenizer_model`)."""
    import torch

    if not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"not a Hugging Face model directory (no config.json): {path}")
    lm = HFCausalLM.from_pretrained(path, dtype=torch.bfloat16 if bf16 else torch.float32)
    if tokenizer_model:
        from tinyllm_mcore.tokenizer.core import Tokenizer

        return lm, SentencePieceEncoder(Tokenizer.load(tokenizer_model, tokenizer_type), add_prefix)
    return lm, HFEncoder.from_pretrained(path, add_prefix)


def open_mcore(load: str, tokenizer_model: str, *, tokenizer_type: str = "auto", tensor_parallel_size: int = 1,
               pipeline_parallel_size: int = 1, add_prefix: bool = True, bf16: bool = False,
               allow_tokenizer_change: bool = False, verify: bool = True,
               require_manifest: bool = False) -> tuple[CausalLM, object]:
    """An mcore checkpoint at any TP/PP (inference.open; run under torchrun for TP*PP > 1)."""
    from tinyllm_mcore.inference.open import open_checkpoint
    from tinyllm_mcore.tokenizer.core import Tokenizer

    if not tokenizer_model:
        raise ValueError("--tokenizer-model is required with --load")
    tokenizer = Tokenizer.load(tokenizer_model, tokenizer_type)
    opened = open_checkpoint(load, tokenizer, tensor_parallel_size=tensor_parallel_size,
                             pipeline_parallel_size=pipeline_parallel_size, bf16=bf16,
                             allow_tokenizer_change=allow_tokenizer_change, verify=verify,
                             require_manifest=require_manifest)
    return McoreCausalLM(opened.chunks, opened.preset), SentencePieceEncoder(tokenizer, add_prefix)


def is_writer() -> bool:
    """The one process that writes result files (rank 0; every rank holds the same results)."""
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def write_results(result: dict, output_json: str | None, output_md: str | None = None, markdown: str | None = None):
    if not is_writer():
        return
    if output_json:
        Path(output_json).parent.mkdir(parents=True, exist_ok=True)
        Path(output_json).write_text(json.dumps(result, ensure_ascii=False, indent=1), encoding="utf-8")
    if output_md and markdown is not None:
        Path(output_md).parent.mkdir(parents=True, exist_ok=True)
        Path(output_md).write_text(markdown, encoding="utf-8")
