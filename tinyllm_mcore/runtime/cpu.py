"""What megatron-core needs to run without CUDA. A no-op when CUDA is available.

megatron-core assumes a GPU: it asks `torch.cuda.current_device()` for where to put buffers, seeds and forks a CUDA
RNG for tensor-parallel initialisation and dropout, and some of its optimizer/clip-grad code builds `device="cuda"`
tensors or asserts `torch.cuda.FloatTensor`. On a CPU-only machine we redirect exactly those points, at
import-time patch sites, instead of intercepting every torch op (a global TorchFunctionMode costs time on every op).
Each goes through runtime/compat.py's patch mechanism, declared for the megatron-core and torch releases it was
checked against.

Call `activate()` once, before building models; it returns whether the CPU adapter is in use.
Only runtime/distributed.py asks whether it is active (to pick gloo); other code asks torch.cuda.is_available().
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import types

import torch

from tinyllm_mcore.runtime import compat

_ACTIVE = False
# The CPU adapter's patches replace torch attributes or hand megatron torch stand-ins: checked for both packages.
_VERSIONS = (compat.MEGATRON_CORE, compat.TORCH)


def cuda_usable() -> bool:
    return torch.cuda.is_available()


def is_active() -> bool:
    return _ACTIVE


class CpuRNGStatesTracker:
    """Stand-in for megatron's CudaRNGStatesTracker, keeping named CPU generator states.

    Tensor-parallel ranks initialise and drop out with different seeds inside `fork()`; here the fork swaps the
    process-wide CPU RNG state, exactly as the CUDA tracker swaps the CUDA one.
    """

    def __init__(self, *args, **kwargs):
        self.reset()

    def is_initialized(self):
        return self._is_initialized

    def reset(self):
        self._is_initialized = False
        self.states_ = {}
        self.seeds_ = set()

    def get_states(self):
        return {k: v.clone() for k, v in self.states_.items()}

    def set_states(self, states):
        self._is_initialized = True
        self.states_ = {k: v.clone() for k, v in states.items()}

    def add(self, name, seed):
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name="model-parallel-rng"):
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


def config_overrides() -> dict:
    """TransformerConfig fields the CPU path needs (empty on GPU).

    batch_p2p_comm: megatron batches a pipeline step's sends/receives as [send_prev, recv_prev, send_next,
    recv_next]. At PP=2 prev and next are the same peer, and gloo matches same-peer messages first-in-first-out,
    so with virtual pipeline stages an activation can land in the gradient buffer (NCCL orders the batch itself).
    megatron's unbatched path posts sends and receives in matching order on two groups, which gloo pairs exactly.

    moe_token_dispatcher_type: megatron's all-to-all MoE dispatcher copies routing metadata on a side CUDA stream;
    the all-gather dispatcher (same routing, same expert computation, EP via all-gather/reduce-scatter) needs none.
    Ignored by dense models.
    """
    return {"batch_p2p_comm": False, "moe_token_dispatcher_type": "allgather"} if _ACTIVE else {}


def _cpu_device_kwargs(fn):
    """Wrap a torch factory so device='cuda'/cuda index from megatron lands on the CPU."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        dev = kwargs.get("device")
        if dev is not None and (isinstance(dev, int) or "cuda" in str(dev)):
            kwargs["device"] = "cpu"
        return fn(*args, **kwargs)

    return wrapper


# megatron-core modules that build tensors with a literal device="cuda" on paths we use (loss-token counters in the
# pipeline schedules, optimizer/grad-scaler scalars, clip-grad buffers, dist-checkpoint exchange buffers).
_MODULES_WITH_CUDA_FACTORIES = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.rerun_state_machine",
    "megatron.core.tensor_parallel.data",
    "megatron.core.transformer.utils",
    "megatron.core.transformer.moe.moe_utils",  # the MoE aux-loss tracker's buffers (track_moe_metrics)
    "megatron.core.utils",
)
_FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "arange", "empty_like", "zeros_like", "ones_like")


class _TorchOnCpu(types.ModuleType):
    """`torch` as seen by one megatron module: identical, except tensor factories ignore a CUDA device."""

    def __init__(self):
        super().__init__("torch")
        for name in _FACTORIES:
            setattr(self, name, _cpu_device_kwargs(getattr(torch, name)))

    def __getattr__(self, name):
        return getattr(torch, name)


_TENSOR_TYPE = torch.Tensor.type


def _type_with_cuda_names(self, dtype=None, *args, **kwargs):
    """`Tensor.type()` reporting a CPU tensor under its CUDA name ("torch.cuda.FloatTensor"); conversions as usual."""
    if dtype is None and not args and not kwargs:
        name = _TENSOR_TYPE(self)
        return name.replace("torch.", "torch.cuda.", 1) if not name.startswith("torch.cuda.") else name
    return _TENSOR_TYPE(self, dtype, *args, **kwargs)


def _with_cuda_type_names(fn):
    """`fn`, inside which `tensor.type()` reports CPU float tensors under their CUDA names.

    megatron's optimizers sort parameters by `param.type() == 'torch.cuda.FloatTensor'` (and Half/BFloat16) and
    raise for anything else; only their constructors and clip-grad ask, so only those run with the CUDA names.
    """
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with compat.patched(torch.Tensor, "type", _type_with_cuda_names, versions=_VERSIONS,
                            why="megatron's optimizers accept only CUDA tensor type names"):
            return fn(*args, **kwargs)

    return wrapper


class _CpuStream:
    """The one, always-synchronous "stream" of a CPU: waiting on it or recording into it does nothing."""

    def wait_stream(self, stream):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        return event

    def synchronize(self):
        pass


_CPU_STREAM = _CpuStream()


def activate() -> bool:
    """Install the CPU adapter if there is no CUDA. Idempotent."""
    global _ACTIVE
    if _ACTIVE or cuda_usable():
        return _ACTIVE
    _ACTIVE = True

    from megatron.core.optimizer import clip_grads, distrib_optimizer, optimizer
    from megatron.core.tensor_parallel import random as mp_random

    # 1. The model-parallel RNG tracker: CPU generator states instead of CUDA ones.
    rng_why = "megatron's tensor-parallel RNG tracker keeps CUDA generator states"
    compat.patch(mp_random, "CudaRNGStatesTracker", CpuRNGStatesTracker, versions=_VERSIONS, why=rng_why)
    compat.patch(mp_random, "_CUDA_RNG_STATE_TRACKER", CpuRNGStatesTracker(), versions=_VERSIONS, why=rng_why)
    compat.patch(mp_random, "_CUDA_RNG_STATE_TRACKER_INITIALIZED", True, versions=_VERSIONS, why=rng_why)
    compat.patch(mp_random, "_get_cuda_rng_state", lambda *a, **k: torch.get_rng_state(), versions=_VERSIONS,
                 why=rng_why)
    compat.patch(mp_random, "_set_cuda_rng_state", lambda state, *a, **k: torch.set_rng_state(state),
                 versions=_VERSIONS, why=rng_why)

    # 2. "Which GPU am I on?" -> the CPU. Megatron passes the answer as a factory `device=`.
    compat.patch(torch.cuda, "current_device", lambda: torch.device("cpu"), versions=_VERSIONS,
                 why="megatron places buffers on the current CUDA device")
    compat.patch(torch.cuda, "synchronize", lambda *a, **k: None, versions=_VERSIONS, why="nothing to wait for")
    compat.patch(torch.cuda, "manual_seed", lambda *a, **k: None, versions=_VERSIONS, why="no CUDA generator")
    # megatron-core 0.19's DDP makes the current CUDA stream wait for CUDA-graph events in every gradient sync
    # (and MoE/pipeline helpers order work on streams): on CPU there is one stream, so there is nothing to wait for.
    compat.patch(torch.cuda, "current_stream", lambda *a, **k: _CPU_STREAM, versions=_VERSIONS,
                 why="megatron orders work on CUDA streams")
    # Tensor.cuda() can only fail on a machine without CUDA; megatron calls it on buffers that must stay put.
    compat.patch(torch.Tensor, "cuda", lambda self, *a, **k: self, versions=_VERSIONS,
                 why="megatron moves buffers to the GPU")

    # 3. Literal device="cuda" factories, module by module.
    cpu_torch = _TorchOnCpu()
    for module_name in _MODULES_WITH_CUDA_FACTORIES:
        compat.patch(importlib.import_module(module_name), "torch", cpu_torch, versions=_VERSIONS,
                     why='the module builds tensors with device="cuda"')

    # 4. Type-name checks in the optimizer constructors and clip-grad.
    type_why = "megatron's optimizers accept only CUDA tensor type names"
    compat.wrap(optimizer.Float16OptimizerWithFloat16Params, "__init__", _with_cuda_type_names, versions=_VERSIONS,
                why=type_why)
    compat.wrap(distrib_optimizer.DistributedOptimizer, "_build_model_and_main_param_groups",
                lambda built: classmethod(_with_cuda_type_names(built.__func__)), versions=_VERSIONS, why=type_why)
    compat.wrap(clip_grads, "clip_grad_by_total_norm_fp32", _with_cuda_type_names, versions=_VERSIONS,
                why=type_why)
    compat.patch(optimizer, "clip_grad_by_total_norm_fp32", clip_grads.clip_grad_by_total_norm_fp32,
                 versions=_VERSIONS, why=type_why + " (the optimizer's own import of clip-grad)")
    return True
