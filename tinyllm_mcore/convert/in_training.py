"""HF folders inside a training run, at any layout (TP, PP, VPP, EP, DP, distributed optimizer), with the
converters' code: `--save-hf` writes `SAVE/iter_N/hf/` with every checkpoint, `--load-hf DIR` starts a run from an
HF folder.

Where a rank's part of each model tensor lies in the whole model comes from megatron's own `sharded_state_dict()`
(what the dist checkpoint stores: TP slices, global layer and expert indices, fc1's [gate; up] halves), named by
`mapping.whole_model_name`; the whole model's tensors then go through the converters' table (`mapping`), writer
(`to_hf.write_hf_export`) and reader (`to_mcore.HFSource`).

- `--save-hf` (`save_hf_folder`, every rank, from `checkpoint.io.save_checkpoint` once the dist checkpoint is
  written): each rank's main replicas go to rank 0, which writes exactly what `tinyllm-mcore-to-hf` writes for that
  checkpoint (fp32, the run's tokenizer and chat template, the folder's own manifest), staged beside `hf/` and
  renamed when complete. It is written before the checkpoint's manifest, so the checkpoint's checksums cover it,
  the latest pointer moves only once both exist, and a save that dies midway is an incomplete checkpoint, removed
  whole at the next start. A failure on rank 0 reaches every rank as the same one line
  (`runtime.distributed.on_rank0_then_share`). Why `iter_N/hf/`: the export belongs to that iteration (as
  torchtitan's HF save sits in its `step-N/` folder and Megatron-Bridge keeps an iteration's artifacts in
  `iter_N/`), so the pointer names both and removing an iteration removes its export; a subfolder, because
  `from_pretrained` wants a folder of HF files only.
- `--load-hf DIR` (`open_hf_start` where `--load` is read, `load_hf_start` once the optimizer exists): the folder's
  manifest is checked on rank 0 (if it has one; `--require-manifest` refuses one without), its config.json must
  describe this run's `--model-size` (shapes, RoPE base, norm epsilon) and its vocabulary and tokenizer this run's;
  then every rank copies its slices of the mapped tensors into its parameters. Only config.json (as JSON),
  safetensors weights and the tokenizer files (as data) are read: no pickle, no code from the folder. The run
  starts as `--load X --finetune` does: iteration 0, fresh optimizer and schedule.
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist

from tinyllm_mcore.checkpoint import CheckpointError
from tinyllm_mcore.checkpoint import io as ckpt
from tinyllm_mcore.checkpoint import safety
from tinyllm_mcore.checkpoint.metadata import CheckpointMetadata
from tinyllm_mcore.convert.mapping import MappingError, megatron_shapes, whole_model_name
from tinyllm_mcore.convert.output import conversion_log, staged_output_dir
from tinyllm_mcore.convert.to_hf import write_hf_export
from tinyllm_mcore.convert.to_mcore import HFSource
from tinyllm_mcore.model.presets import padded_vocab_size
from tinyllm_mcore.runtime import distributed as rt

HF_SUBDIR = "hf"  # SAVE/iter_N/hf
# Beyond the shapes, what decides what the weights compute: the run builds its model from --model-size.
HF_START_FIELDS = ckpt.SHAPE_FIELDS + ("rope_theta", "norm_eps")


def check_flags(ctx) -> None:
    """What the flags cannot do in this stage, before anything is built."""
    args = ctx.args
    if args.save_hf and ctx.model_head != "lm":
        raise ValueError(f"--save-hf exports language models; the {ctx.stage_name} stage's {ctx.model_head} model "
                         "has no Hugging Face counterpart here")
    if ctx.lora is not None and ctx.model_head != "lm":
        raise ValueError(f"--lora-rank: the {ctx.stage_name} stage trains a new {ctx.model_head} head, which "
                         "adapters on a frozen model would leave untrained; train it in full")
    if ctx.lora is not None and args.save_hf:
        raise ValueError("--save-hf is not available with --lora-rank: export the LoRA checkpoint with "
                         "tinyllm-mcore-to-hf (the merged model, or --peft-adapter DIR)")
    if ctx.lora is not None and args.load_hf:
        raise ValueError("--load-hf is not available with --lora-rank: start a LoRA run from a checkpoint (--load)")
    if args.load_hf and getattr(args, "init_from", None):
        raise ValueError("--load-hf and --init-from both give the starting weights: use one")


def _padded_vocab(ctx) -> int:
    """The embedding rows of this run's model (build_chunks pads the vocabulary for its TP)."""
    return padded_vocab_size(ctx.preset.vocab_size, ctx.layout.tensor, ctx.args.make_vocab_size_divisible_by)


def _model_shards(chunks) -> Iterator[tuple[str, tuple, object]]:
    """(whole-model local-spec name, this rank's index into that global tensor, the ShardedTensor) for every model
    tensor of this rank's chunks. The ShardedTensor's data is the parameter itself or, for fc1's [gate; up] halves
    (megatron's ShardedTensorFactory), a view of it."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    for chunk in chunks:
        state = ckpt.unwrap(chunk).sharded_state_dict()
        apply_factories(state)
        for shard in nested_values(state):
            if not isinstance(shard, ShardedTensor) or shard.key.endswith("_extra_state"):
                continue
            if shard.flattened_range is not None:  # model tensors are never flattened (only optimizer state is)
                raise MappingError(f"{shard.key}: a flattened model shard cannot be mapped")
            n = shard.prepend_axis_num
            yield whole_model_name(shard.key, tuple(shard.global_offset[:n])), shard.global_slice()[n:], shard


# ------------------------------------------------------------------------------------------------ --save-hf
def save_hf_folder(ctx, path: Path) -> Path:
    """--save-hf: every rank, after the dist checkpoint in `path` (an iteration folder) is written. Returns
    `path/hf` on every rank, or raises the same one-line error on every rank."""
    from megatron.core.dist_checkpointing.mapping import is_main_replica

    t0 = time.perf_counter()
    # only main replicas travel (DP copies hold the same values), one rank's at a time: rank 0 never holds more than
    # the whole model and one rank's shards (gather_object would pad every rank's message to the largest one)
    pieces = [(name, index, shard.data.detach().cpu()) for name, index, shard in _model_shards(ctx.chunks)
              if is_main_replica(shard.replica_id)]
    target = Path(path) / HF_SUBDIR
    preset, padded = ctx.preset, _padded_vocab(ctx)
    whole, covered, problem = {}, Counter(), None
    if dist.get_rank() == 0:
        # fp32, the converter's default export: a bf16 model's weights widen exactly, as when it loads the checkpoint
        whole = {name: torch.empty(shape) for name, shape in megatron_shapes(preset, padded).items()}
        for source in range(dist.get_world_size()):
            if source:
                box = [None]
                dist.recv_object_list(box, src=source)
                pieces = box[0]
            try:
                for name, index, data in pieces:
                    whole[name][index] = data
                    covered[name] += data.numel()
            except Exception as e:  # reported by write(), so that every rank hears of it
                problem = problem or e
    else:
        dist.send_object_list([pieces], dst=0)
    del pieces

    def write() -> Path:
        if problem is not None:
            raise MappingError(f"--save-hf: a rank's model shard does not fit the {preset.name} model "
                               f"({type(problem).__name__}: {problem})")
        short = [name for name, t in whole.items() if covered[name] != t.numel()]
        if short:
            raise MappingError(f"--save-hf: the ranks' shards cover {covered[short[0]]} of {whole[short[0]].numel()} "
                               f"values of {short[0]}")
        with staged_output_dir(target) as staged:
            write_hf_export(staged, preset, padded, whole.__getitem__, source=str(path), tokenizer=ctx.tokenizer,
                            log=conversion_log(quiet=True))
        print(f"saved HF folder {target} in {time.perf_counter() - t0:.1f} s", flush=True)
        return target

    return rt.on_rank0_then_share(write)


# ------------------------------------------------------------------------------------------------ --load-hf
@dataclass(frozen=True)
class HFStart:
    """An HF folder checked against the run (open_hf_start), to be copied into its model (load_hf_start)."""
    source: HFSource


def _verify_folder(path: Path, require_manifest: bool) -> None:
    """Rank 0 checks the folder's files against its manifest (ours have one; a Hub folder has none)."""
    try:
        verified = safety.verify(path)
    except safety.CheckpointIntegrityError as e:
        raise CheckpointError(str(e)) from None
    if not verified and require_manifest:
        raise CheckpointError(f"--load-hf {path} has no manifest.json, so its files cannot be verified "
                              "(--require-manifest)")


def _folder_tokenizer_identity(path: Path, tokenizer_type: str) -> tuple[str | None, str | None]:
    """(where, identity) of the tokenizer the folder ships (tokenizer.model or tokenizer.json, read as data), or
    (None, None) without one."""
    from tinyllm_mcore.tokenizer.core import Tokenizer

    if not ((path / "tokenizer.model").is_file() or (path / "tokenizer.json").is_file()):
        return None, None
    return str(path), Tokenizer.load(path, tokenizer_type).identity


def open_hf_start(ctx) -> HFStart:
    """--load-hf, on every rank once the process group exists: the files first (rank 0 checks the manifest; every
    rank gets its verdict), then what they hold (model and tokenizer against this run's). One line if not."""
    args = ctx.args
    path = Path(args.load_hf)
    if not path.is_dir():
        raise FileNotFoundError(f"--load-hf {path}: no such directory")
    if not args.no_verify_checkpoint:
        rt.on_rank0_then_share(lambda: _verify_folder(path, args.require_manifest))
    try:
        source = HFSource.open(path, safetensors_only=True)
    except (ValueError, FileNotFoundError) as e:  # one line that names the folder and the flag
        raise type(e)(str(e) if str(path) in str(e) else f"--load-hf {path}: {e}") from None
    ckpt.check_same_model(path, source.preset, ctx.preset, HF_START_FIELDS)
    where, identity = (None, None)
    if ctx.tokenizer_identity is not None and not args.allow_tokenizer_change:
        where, identity = _folder_tokenizer_identity(path, args.tokenizer_type)
    # the one tokenizer check of every command that reads weights, on the folder as if it were a checkpoint
    as_checkpoint = ckpt.SavedCheckpoint(path=path, common={}, metadata=CheckpointMetadata(
        preset=source.preset, tokenizer_model=where, tokenizer_identity=identity))
    ckpt.check_tokenizer(as_checkpoint, ctx.preset.vocab_size, ctx.tokenizer_identity,
                         allow_change=args.allow_tokenizer_change)
    return HFStart(source=source)


def load_hf_start(start: HFStart, ctx, optimizer) -> None:
    """Every rank copies its slices of the folder's tensors (through the mapping table, padded for this run's TP)
    into its model chunks; the optimizer's own fp32 copies are refreshed from them, as after a --finetune load.
    Pipeline stages read different tensors, so what one finds wrong (a shape, NaN) is agreed on: every rank raises
    the same line."""
    targets: dict[str, list] = {}
    for name, index, shard in _model_shards(ctx.chunks):
        targets.setdefault(name, []).append((index, shard.data))
    problem = None
    try:
        with torch.no_grad():
            for name, tensor, _ in start.source.megatron_tensors(_padded_vocab(ctx), names=set(targets)):
                for index, data in targets.pop(name):
                    data.copy_(tensor[index])  # the parameter itself, or a view of it
        # the reward model's head is not in an LM's folder: it stays as built (reward --init-from does the same)
        missing = [n for n in targets if not (ctx.model_head == "reward" and n.startswith("reward_head."))]
        if missing:
            raise MappingError(f"--load-hf {start.source.path} has nothing for {missing[0]} of this model")
    except (ValueError, FileNotFoundError) as e:
        problem = str(e)
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, problem)
    problem = next((p for p in everyone if p), None)
    if problem:
        raise MappingError(problem)
    optimizer.reload_model_params()
    rt.print_rank0(f"loaded --load-hf {start.source.path} ({start.source.facts.model_type}, "
                   f"{start.source.preset.name}) at iteration 0: fresh optimizer and LR schedule")
