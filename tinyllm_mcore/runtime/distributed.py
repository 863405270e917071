"""Process group and megatron parallel state: NCCL on GPU, gloo on CPU; TP, PP (+ virtual PP), EP, DP; seeds.

Launchers: `torchrun` (RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT), Slurm `srun` with one task per GPU
(SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID; MASTER_ADDR/MASTER_PORT exported by the sbatch script), or a plain
`python` process (a world of one).
"""
from __future__ import annotations

import os
import pickle
import random
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from tinyllm_mcore.runtime import cpu
from tinyllm_mcore.runtime.files import free_port

T = TypeVar("T")


class ParallelConfigError(ValueError):
    """An impossible parallel layout (reported as one line by the CLIs)."""


@dataclass(frozen=True)
class Launch:
    rank: int
    world_size: int
    local_rank: int


def launch_from_env() -> Launch:
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun (also torchrun under srun)
        return Launch(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:  # srun, one task per GPU
        return Launch(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)))
    return Launch(0, 1, 0)


def check_parallel_layout(world_size: int, tp: int, pp: int, num_attention_heads: int, num_layers: int,
                          vpp_layers: int | None = None, ep: int = 1, num_query_groups: int | None = None,
                          num_experts: int = 0) -> int:
    """Validate a layout and return the data-parallel size; raise ParallelConfigError with one clear line."""
    if tp < 1 or pp < 1 or ep < 1:
        raise ParallelConfigError(f"parallel sizes must be >= 1 (TP={tp}, PP={pp}, EP={ep})")
    if world_size % (tp * pp):
        raise ParallelConfigError(
            f"world size {world_size} is not divisible by tensor-parallel {tp} x pipeline-parallel {pp} = {tp * pp}")
    if num_attention_heads % tp:
        raise ParallelConfigError(f"{num_attention_heads} attention heads are not divisible by tensor-parallel size {tp}")
    if num_query_groups and num_query_groups % tp:
        raise ParallelConfigError(f"{num_query_groups} key/value heads are not divisible by tensor-parallel size {tp}")
    if num_layers % pp:
        raise ParallelConfigError(f"{num_layers} layers are not divisible by pipeline-parallel size {pp}")
    if vpp_layers is not None:
        if pp < 2:
            raise ParallelConfigError("--num-layers-per-virtual-pipeline-stage needs pipeline-parallel size >= 2")
        if (num_layers // pp) % vpp_layers:
            raise ParallelConfigError(
                f"{num_layers // pp} layers per pipeline stage are not divisible by {vpp_layers} layers per virtual stage")
    dp = world_size // (tp * pp)
    if ep > 1:
        if not num_experts:
            raise ParallelConfigError("--expert-model-parallel-size > 1 needs a MoE model")
        if num_experts % ep:
            raise ParallelConfigError(f"{num_experts} experts are not divisible by expert-parallel size {ep}")
        # experts are tensor-parallel like the dense layers (megatron's expert TP = TP), so EP groups span DP ranks
        if dp % ep:
            raise ParallelConfigError(f"expert-parallel size {ep} must divide the data-parallel size {dp} "
                                      f"(world {world_size} / (TP {tp} x PP {pp}))")
    return dp


def initialize(tp: int = 1, pp: int = 1, vpp: int | None = None, ep: int = 1, seed: int = 1234,
               timeout_minutes: int = 30) -> Launch:
    """Start torch.distributed and megatron's parallel state for this process; idempotent per process."""
    from megatron.core import parallel_state

    cpu.activate()
    launch = launch_from_env()
    if not dist.is_initialized():
        launched = "RANK" in os.environ or "SLURM_PROCID" in os.environ
        if launch.world_size == 1 and not (launched and "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ):
            # A plain `python` process: a world of one rendezvous on a fresh local port, and leaves os.environ
            # alone (child processes must not inherit a MASTER_ADDR/MASTER_PORT that belongs to this process).
            # Under a launcher, even with one process, its address is the rendezvous: torchrun serves the store
            # there itself (TORCHELASTIC_USE_AGENT_STORE), and a private port would wait for a server forever.
            init_method = f"tcp://127.0.0.1:{free_port()}"
        else:
            missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
            if missing:
                raise ParallelConfigError(f"{' and '.join(missing)} not set (torchrun sets them; under srun export "
                                          "them in the sbatch script)")
            init_method = "env://"
        if cpu.is_active():
            backend = "gloo"
        else:
            backend = "nccl"
            torch.cuda.set_device(launch.local_rank)
        dist.init_process_group(backend, init_method=init_method, rank=launch.rank, world_size=launch.world_size,
                                timeout=timedelta(minutes=timeout_minutes))
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            virtual_pipeline_model_parallel_size=vpp,
            expert_model_parallel_size=ep,
        )
    set_seed(seed)
    return launch


def set_seed(seed: int) -> None:
    """Megatron-LM's convention: each pipeline stage offsets the seed; TP ranks differ inside the RNG tracker."""
    from megatron.core import parallel_state, tensor_parallel

    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy() -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def is_logging_rank() -> bool:
    """The rank that holds the loss and prints: last pipeline stage, first TP and DP rank."""
    from megatron.core import parallel_state

    return (parallel_state.is_pipeline_last_stage(ignore_virtual=True)
            and parallel_state.get_tensor_model_parallel_rank() == 0
            and parallel_state.get_data_parallel_rank() == 0)


def logging_rank() -> int:
    """The global rank for which `is_logging_rank()` holds, as every rank sees it (a collective)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return 0
    answers = [None] * dist.get_world_size()
    dist.all_gather_object(answers, is_logging_rank())
    return answers.index(True)


def on_rank0_then_share(fn: Callable[[], T], *, share_value: bool = True) -> T | None:
    """Call ``fn`` on rank 0 only; every rank then returns its value or raises its error (`on_rank_then_share`)."""
    return on_rank_then_share(fn, 0, share_value=share_value)


def on_rank_then_share(fn: Callable[[], T], src: int, *, share_value: bool = True) -> T | None:
    """Call ``fn`` on rank ``src`` only; every rank then returns its value or raises its error.

    An exception on ``src`` reaches every rank as the same type with the same one line (``src`` raises the original),
    so all ranks stop alike instead of the others waiting in their next collective. ``share_value=False`` keeps the
    value on ``src`` (one that belongs to that process, such as a lock) and gives the others None; otherwise the value
    must pickle. Without a process group (or in a world of one) it is just ``fn()``.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return fn()
    value, error, failure = None, None, None
    if dist.get_rank() == src:
        try:
            value = fn()
        except Exception as e:
            error, failure = e, (_shareable_type(e), str(e))
    box = [(value if share_value else None, failure)]
    dist.broadcast_object_list(box, src=src)
    if error is not None:
        raise error
    if box[0][1] is not None:
        raise _rebuilt_error(*box[0][1])
    return value if dist.get_rank() == src else box[0][0]


def _shareable_type(error: Exception) -> type:
    try:  # a class pickles by reference: one defined inside a function cannot be named on another rank
        pickle.dumps(type(error))
        return type(error)
    except Exception:
        return RuntimeError


def _rebuilt_error(kind: type, message: str) -> Exception:
    try:
        return kind(message)
    except Exception:  # a type that needs more than its message (UnicodeDecodeError...)
        return RuntimeError(message)


def print_rank0(*args, **kwargs) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)
