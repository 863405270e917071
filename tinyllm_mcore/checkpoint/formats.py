"""The distributed optimizer's checkpoint formats (megatron-core's names), as Megatron-LM chooses them:

- dp_reshardable (default): each DP rank writes its own bucket shards, no communication at save or load. Loads at
  any DP size, but only at the TP/PP it was saved with.
- fully_reshardable (--dist-ckpt-optim-fully-reshardable): gathered into model space at save (param-shaped
  exp_avg/exp_avg_sq/fp32 param), so it loads at any TP/PP/DP. Costs a gather of the optimizer state per save.

Either loads only into a distributed optimizer (megatron's plain optimizer reads another layout); the weights of any
checkpoint load anywhere (--no-load-optim / --finetune). megatron 0.16's default, fully_sharded_model_space, needs
flattened ShardedTensors that torch_dist no longer writes: it crashes at DP >= 2 ("ShardedTensor.flattened_range is
not supported"). The format a checkpoint was written in is megatron's content metadata of that checkpoint.
"""
from __future__ import annotations

from pathlib import Path

import torch

from tinyllm_mcore.checkpoint import CheckpointError
from tinyllm_mcore.checkpoint.metadata import CheckpointMetadata

DP_RESHARDABLE = "dp_reshardable"
FULLY_RESHARDABLE = "fully_reshardable"
LEGACY_SHARDING = "fully_sharded_model_space"  # what checkpoints without content metadata were written with


def is_distributed_optimizer(optimizer) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return any(isinstance(o, DistributedOptimizer) for o in getattr(optimizer, "chained_optimizers", [optimizer]))


def optimizer_save_metadata(optimizer, *, fully_reshardable: bool = False, mem_efficient: bool = False) -> dict:
    """The sharding metadata megatron's optimizer.sharded_state_dict is given at save (also stored in the checkpoint
    as its content metadata): --dist-ckpt-optim-fully-reshardable, --distrib-optim-fully-reshardable-mem-efficient."""
    if optimizer is None or not is_distributed_optimizer(optimizer):
        return {}
    if fully_reshardable:
        return {"distrib_optim_sharding_type": FULLY_RESHARDABLE,
                "distrib_optim_fully_reshardable_mem_efficient": bool(mem_efficient)}
    return {"distrib_optim_sharding_type": DP_RESHARDABLE}


def optimizer_load_metadata(path: Path, common: dict, optimizer, saved: CheckpointMetadata) -> dict:
    """The metadata to load the optimizer state of the checkpoint `path` (its common state `common`, its run
    metadata `saved`) with; CheckpointError where it cannot be loaded here."""
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    content = dist_checkpointing.load_content_metadata(preloaded_state_dict=common) or {}
    saved_type = content.get("distrib_optim_sharding_type")
    if saved_type is None and saved.use_distributed_optimizer:
        saved_type = LEGACY_SHARDING
    here_distributed = is_distributed_optimizer(optimizer)
    saved_layout = (saved.tensor_model_parallel_size, saved.pipeline_model_parallel_size)
    layout = (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size())
    hint = "load the weights only with --no-load-optim (or --finetune)"
    if saved_type is not None and not here_distributed:
        raise CheckpointError(
            f"{path}: optimizer state was saved by the distributed optimizer ({saved_type}), which only the "
            f"distributed optimizer can read: add --use-distributed-optimizer, or {hint}")
    if saved_type in (DP_RESHARDABLE, LEGACY_SHARDING):
        if saved_layout != layout:
            raise CheckpointError(
                f"{path}: distributed-optimizer state ({saved_type}) was saved at TP={saved_layout[0]} "
                f"PP={saved_layout[1]} and loads only there (any DP); this run is TP={layout[0]} PP={layout[1]}: "
                f"{hint}, or save with --dist-ckpt-optim-fully-reshardable")
        return {"distrib_optim_sharding_type": saved_type}
    if saved_type == FULLY_RESHARDABLE:
        return {"distrib_optim_sharding_type": FULLY_RESHARDABLE}
    if here_distributed:
        raise CheckpointError(
            f"{path}: optimizer state was saved without the distributed optimizer, which cannot read it: drop "
            f"--use-distributed-optimizer for this run, or {hint}")
    return {}


def init_distributed_optimizer_state(optimizer) -> None:
    """Give a fresh distributed optimizer the state entries its sharded_state_dict expects before loading.

    Without apex/TE (CPU, or a GPU without them) megatron's DistributedOptimizer.state_dict() reads the Adam step from
    the per-parameter state, which a freshly built torch Adam does not have yet; the values are placeholders that the
    load replaces.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not isinstance(opt, DistributedOptimizer) or not isinstance(opt.optimizer, torch.optim.Optimizer):
            continue
        if opt.init_state_fn is not None:
            opt.init_state_fn(opt.optimizer, opt.config)
        for group in opt.optimizer.param_groups:
            for param in group["params"]:
                opt.optimizer.state[param].setdefault("step", torch.tensor(0.0))
