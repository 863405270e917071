"""Hugging Face model directory -> megatron-core dist checkpoint loadable at a chosen TP/PP.

    python checkpoint_convert/hf_to_mcore.py --load HF_DIR --save CKPT_DIR \
        --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2

Accepts our own exports (Llama with zero o_proj bias; Qwen2-MoE for MoE models), Qwen2, Qwen2-MoE (every layer MoE),
Llama (with or without attention bias) and the seed's
released ``tinyllm`` layout (Qwen2 weight names; fp16 ``pytorch_model.bin`` or safetensors) — the seed's remote code is
never run: only config.json and the tensors are read. One CPU process; tensors stream from the (memory-mapped) HF
files into the global model, which megatron's dist_checkpointing writes under its sharded keys. The result is
``CKPT_DIR/iter_0000000`` + ``latest_checkpointed_iteration.txt``; load it with ``--load CKPT_DIR --finetune``
(pretrain/SFT/DPO) or ``load_model_for_inference``. Weights are stored in fp32 (the trainer's master dtype).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `python checkpoint_convert/hf_to_mcore.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from tinyllm_mcore.hf_export import HFWeights
from tinyllm_mcore.hf_mapping import (
    conversion_log,
    HF_O_BIAS, HF_SHARED_EXPERT, MappingError, build_global_model, check_finite, hf_shapes, hf_to_megatron,
    preset_from_hf_config, single_process_megatron, staged_output_dir,
)
from tinyllm_mcore.presets import padded_vocab_size
from tinyllm_mcore.runtime import compat
from tinyllm_mcore.runtime.distributed import check_parallel_layout

# Buffers some HF checkpoints carry that are recomputed from the config.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def read_hf_config(hf_dir: Path) -> dict:
    path = hf_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {hf_dir}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError names no file
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: not a JSON object")
    return config


def convert_hf_to_mcore(load: str | os.PathLike, save: str | os.PathLike, tensor_model_parallel_size: int = 1,
                        pipeline_model_parallel_size: int = 1, make_vocab_size_divisible_by: int = 128,
                        log=print, allow_non_finite: bool = False) -> Path:
    """Convert; return the written iteration directory. Raises ValueError/FileNotFoundError with one-line messages.

    Tensors with NaN/inf values are refused unless ``allow_non_finite``. The output appears only when complete: a new
    ``save`` root (or, inside an existing root, the ``iter_0000000`` directory) is written under a temporary name
    and renamed at the end, so a failure leaves nothing behind."""
    from megatron.core import dist_checkpointing

    from megatron.core.dist_checkpointing.mapping import ShardedObject

    from tinyllm_mcore.runtime import compat
    from tinyllm_mcore.training import checkpoint_safety as safety
    from tinyllm_mcore.training.checkpoint import TRACKER, _forked_write_results_queue, _rng_state, iteration_dir

    t0 = time.perf_counter()
    hf_dir = Path(load)
    config = read_hf_config(hf_dir)
    preset, facts = preset_from_hf_config(config)
    tp, pp = tensor_model_parallel_size, pipeline_model_parallel_size
    check_parallel_layout(tp * pp, tp, pp, preset.num_attention_heads, preset.num_layers,
                          num_query_groups=preset.num_query_groups)
    weights = HFWeights(hf_dir)
    expected = hf_shapes(preset, tied=facts["tied"])
    names = set(weights.names())
    unknown = [n for n in names if n not in expected and not n.endswith(HF_O_BIAS)
               and not n.endswith(_IGNORED_SUFFIXES) and not (facts["tied"] and n == "lm_head.weight")]
    if unknown:
        raise MappingError(f"{len(unknown)} tensors do not belong to a {config.get('model_type')} model of this "
                           f"config, e.g. {sorted(unknown)[:3]}")
    # Llama without attention bias has no q/k/v biases: they become zeros.
    optional = {n for n in expected if n.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias"))} \
        if not facts["attention_bias"] else set()
    if preset.num_experts and not preset.moe_shared_expert_ffn_hidden_size:  # Qwen2-MoE's empty shared expert
        optional |= {n for n in expected if n.endswith(HF_SHARED_EXPERT)}
    missing = [n for n in expected if n not in names and n not in optional]
    if missing:
        raise MappingError(f"{len(missing)} tensors are missing from {hf_dir}, e.g. {missing[:3]}")

    padded = padded_vocab_size(preset.vocab_size, tp, make_vocab_size_divisible_by)
    save_root = Path(save)
    if save_root.exists() and not save_root.is_dir():
        raise ValueError(f"--save {save_root} exists and is not a directory")
    # Stage the whole root when it is new; inside an existing root (other checkpoints may live there) only the
    # iteration directory, whose tracker moves last.
    new_root = not save_root.exists()
    target = save_root if new_root else iteration_dir(save_root, 0)
    path = iteration_dir(save_root, 0)
    log(f"[hf_to_mcore] {hf_dir} ({config.get('model_type')}, {preset.name}: h={preset.hidden_size} "
        f"L={preset.num_layers} heads={preset.num_attention_heads}/{preset.kv_heads} ffn={preset.ffn_hidden_size} "
        f"vocab={preset.vocab_size} -> {padded} padded for TP{tp}) -> {path} for TP{tp} PP{pp}")

    def read_hf(name: str):
        t = weights.get(name)
        return t if t is None or allow_non_finite else check_finite(name, t, str(hf_dir))

    with single_process_megatron(), staged_output_dir(target) as staged:
        model = build_global_model(preset, padded)
        params = model.state_dict(keep_vars=True)
        with torch.no_grad():
            for name, tensor, sources in hf_to_megatron(preset, read_hf, padded, tied=facts["tied"]):
                params[name].copy_(tensor)
                log(f"  {' + '.join(sources)} -> {name} {tuple(tensor.shape)}")
        del weights
        args = {
            "model_size": preset.name,
            "vocab_size": preset.vocab_size,
            "preset": dataclasses.asdict(preset),
            "tensor_model_parallel_size": tp,
            "pipeline_model_parallel_size": pp,
            "make_vocab_size_divisible_by": make_vocab_size_divisible_by,
            "converted_from": str(hf_dir.resolve()),
            "hf_model_type": config.get("model_type"),
        }
        # An RNG state for every (PP, TP) rank of the target layout, so a plain --load (no --finetune) at that
        # layout finds what checkpoint.load_checkpoint asks for.
        rng = _rng_state()
        state = {
            **compat.checkpoint_stamp(),
            "iteration": 0, "consumed_samples": 0, "args": args, "model": model.sharded_state_dict(),
            "rng_state": [ShardedObject("rng_state", rng, (pp, tp), (p, t), replica_id=0)
                          for p in range(pp) for t in range(tp)],
            **compat.checkpoint_stamp(),
        }
        staged_iter = iteration_dir(staged, 0) if new_root else staged
        staged_iter.mkdir(exist_ok=True)
        _forked_write_results_queue()
        safety.forked_workers_die_with_parent()
        with _quiet_writer_errors():  # a failed write is reported once, as one line, by staged_output_dir / run_cli
            dist_checkpointing.save(state, str(staged_iter))
        # as the trainer's saves: readable by every supported megatron-core, checksummed last
        compat.write_common_state_file(staged_iter)
        safety.write_manifest(staged_iter)
        compat.write_common_state_file(staged_iter)  # loadable under every supported megatron-core
        if new_root:
            (staged / TRACKER).write_text("0")
    if not new_root:
        tmp = save_root / f".{TRACKER}.tmp"
        tmp.write_text("0")
        os.replace(tmp, save_root / TRACKER)
    log(f"[hf_to_mcore] wrote {path} in {time.perf_counter() - t0:.1f} s")
    return path


@contextlib.contextmanager
def _quiet_writer_errors():
    """megatron's checkpoint writer logs a worker's failure before raising it; the raise is what we report."""
    writer_log = logging.getLogger("megatron.core.dist_checkpointing.strategies.filesystem_async")
    level = writer_log.level
    writer_log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        writer_log.setLevel(level)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--load", required=True, help="HF model directory (config.json + safetensors / pytorch_model.bin)")
    p.add_argument("--save", required=True, help="megatron checkpoint root to write")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    p.add_argument("--allow-non-finite", action="store_true",
                   help="convert even if tensors hold NaN/inf (refused by default, naming the tensor)")
    p.add_argument("--quiet", action="store_true", help="do not list every mapped tensor")
    return p


def main(argv=None) -> int:
    from tinyllm_mcore.training.errors import run_cli

    args = build_parser().parse_args(argv)
    log = conversion_log(args.quiet)
    return run_cli(lambda: convert_hf_to_mcore(
        args.load, args.save, args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
        args.make_vocab_size_divisible_by, log=log, allow_non_finite=args.allow_non_finite))


if __name__ == "__main__":
    sys.exit(main())
