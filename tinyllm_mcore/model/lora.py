"""LoRA adapters on the decoder's megatron linear layers, sharded like the layer each one wraps.

`--lora-target` names (this project's megatron layers, see the architecture notes):
  qkv  -> self_attention.linear_qkv   (ColumnParallelLinear, fused [q; k; v] per query group)
  proj -> self_attention.linear_proj  (RowParallelLinear, the attention output)
  fc1  -> mlp.linear_fc1              (ColumnParallelLinear, fused SwiGLU [gate; up])
  fc2  -> mlp.linear_fc2              (RowParallelLinear, down)

The adapter adds (alpha / r) * B A x to the layer's output. Each is a sibling module of the layer it wraps
(`linear_qkv_lora` beside `linear_qkv`), called from a forward hook on that layer: the base layer's own parameters,
state-dict keys and checkpoints stay exactly megatron's, and the adapter's are keys of their own.

Sharding (TP = tensor-parallel size):
- Column-parallel layer (weight [out/TP, in]): A [r, in] replicated, B [out/TP, r] split on dim 0 like the weight.
  h = A x is the same on every rank; its backward all-reduces dh (each rank's B slice gives a part of it), so A's
  gradient is complete and equal on every rank. Under sequence parallelism x is all-gathered first (backward: split,
  not reduce-scatter — dx is already complete after dh's all-reduce).
- Row-parallel layer (weight [out, in/TP], input split on its last dim): A [r, in/TP] split on dim 1 like the weight,
  B [out, r] replicated. h = A x is a partial sum on each rank; it is all-reduced (r values per token, not out) and
  B h is then the same on every rank, added to the layer's already reduced output. Under sequence parallelism h is
  reduce-scattered along the sequence instead (as the layer's output is) and B's gradient, from this rank's sequence
  slice only, is all-reduced over TP by megatron with the norms' (param.sequence_parallel).

B starts at zero (step 0 is the base model); A is drawn for the whole layer from a generator seeded by (--seed, global
layer number, target) and sliced, so it is the same tensor at every layout. Base parameters are frozen
(requires_grad False): megatron's DDP and optimizer then hold buffers and state only for the adapters.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

import torch

TARGETS = {"qkv": ("self_attention", "linear_qkv", "column"),
           "proj": ("self_attention", "linear_proj", "row"),
           "fc1": ("mlp", "linear_fc1", "column"),
           "fc2": ("mlp", "linear_fc2", "row")}
ADAPTER_SUFFIX = "_lora"  # linear_qkv's adapter is the module linear_qkv_lora beside it


@dataclass(frozen=True)
class LoraSettings:
    rank: int
    alpha: float
    dropout: float
    targets: tuple[str, ...]
    seed: int = 0

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def describe(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout, "targets": list(self.targets)}


def add_lora_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("LoRA")
    g.add_argument("--lora-rank", type=int, default=None,
                   help="train LoRA adapters of this rank on the frozen base model (default: full fine-tuning)")
    g.add_argument("--lora-alpha", type=float, default=None, help="adapter scaling alpha / rank (default: 2 x rank)")
    g.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the adapters' input")
    g.add_argument("--lora-target", default="qkv,proj,fc1,fc2",
                   help="layers that get adapters, comma-separated: qkv (attention linear_qkv), proj (linear_proj), "
                        "fc1 (MLP linear_fc1, gate and up), fc2 (linear_fc2, down)")


def settings_from_args(args) -> LoraSettings | None:
    """The run's LoRA settings (None: no --lora-rank). Raises ValueError naming the flag."""
    rank = getattr(args, "lora_rank", None)
    if rank is None:
        for flag, default in (("lora_alpha", None), ("lora_dropout", 0.0)):
            if getattr(args, flag, default) != default:
                raise ValueError(f"--{flag.replace('_', '-')} needs --lora-rank R")
        return None
    if rank < 1:
        raise ValueError(f"--lora-rank {rank}: must be >= 1")
    alpha = args.lora_alpha if args.lora_alpha is not None else 2.0 * rank
    if not alpha > 0 or math.isinf(alpha):
        raise ValueError(f"--lora-alpha {alpha:g}: must be a positive number")
    if not 0 <= args.lora_dropout < 1:
        raise ValueError(f"--lora-dropout {args.lora_dropout:g}: must be in [0, 1)")
    names = [t.strip() for t in args.lora_target.split(",") if t.strip()]
    unknown = [t for t in names if t not in TARGETS]
    if unknown or not names:
        raise ValueError(f"--lora-target {args.lora_target!r}: use a comma-separated subset of "
                         f"{','.join(TARGETS)}")
    targets = tuple(t for t in TARGETS if t in names)  # a fixed order, whatever the flag's
    return LoraSettings(rank=rank, alpha=alpha, dropout=args.lora_dropout, targets=targets, seed=args.seed)


def _seed_for(seed: int, layer_number: int, target: str) -> int:
    return (seed * 1_000_003 + layer_number * 101 + list(TARGETS).index(target)) % (2 ** 63)


class LoraAdapter(torch.nn.Module):
    """The adapter of one linear layer (see the module docstring for its sharding and collectives)."""

    def __init__(self, base, kind: str, target: str, layer_number: int, settings: LoraSettings, config):
        from megatron.core import parallel_state as ps
        from megatron.core.tensor_parallel import set_tensor_model_parallel_attributes

        super().__init__()
        self.kind, self.target, self.scaling = kind, target, settings.scaling
        self.sequence_parallel = bool(config.sequence_parallel)
        self.gated_fc1 = target == "fc1" and bool(config.gated_linear_unit)
        self.dropout = torch.nn.Dropout(settings.dropout) if settings.dropout else None
        tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
        out_local, in_local = base.weight.shape
        in_full = in_local * tp if kind == "row" else in_local
        r = settings.rank
        generator = torch.Generator().manual_seed(_seed_for(settings.seed, layer_number, target))
        bound = 1.0 / math.sqrt(in_full)  # PEFT's default (kaiming-uniform, a = sqrt(5)) for lora_A
        a_full = torch.empty(r, in_full, dtype=torch.float32).uniform_(-bound, bound, generator=generator)
        if kind == "row":
            a_full = a_full[:, tp_rank * in_local:(tp_rank + 1) * in_local]
        dtype, device = base.weight.dtype, base.weight.device
        self.lora_A = torch.nn.Parameter(a_full.to(dtype=dtype, device=device).contiguous())
        self.lora_B = torch.nn.Parameter(torch.zeros(out_local, r, dtype=dtype, device=device))
        if kind == "column":
            set_tensor_model_parallel_attributes(self.lora_B, is_parallel=True, dim=0, stride=1)
        else:
            set_tensor_model_parallel_attributes(self.lora_A, is_parallel=True, dim=1, stride=1)
            # B sees only this rank's sequence slice under SP: megatron all-reduces such grads over TP
            self.lora_B.sequence_parallel = self.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.delta(x, self.sequence_parallel)

    def delta(self, x: torch.Tensor, sequence_parallel: bool) -> torch.Tensor:
        """(alpha / r) B A x for the wrapped layer's input `x`; `sequence_parallel`: x (column) or the output (row)
        is split along the sequence (dim 0) as in training; the KV-cache decoder passes False (its activations are
        [b, s, h], whole)."""
        from megatron.core.tensor_parallel import mappings

        if self.kind == "column":
            if sequence_parallel:
                x = mappings.gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False)
            if self.dropout is not None:
                x = self.dropout(x)
            h = mappings.copy_to_tensor_model_parallel_region(torch.matmul(x, self.lora_A.t()))
        else:
            if self.dropout is not None:
                x = self.dropout(x)
            h = torch.matmul(x, self.lora_A.t())
            h = (mappings.reduce_scatter_to_sequence_parallel_region(h) if sequence_parallel
                 else mappings.reduce_from_tensor_model_parallel_region(h))
        return torch.matmul(h, self.lora_B.t()) * self.scaling

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        """Dist-checkpoint tensors sharded like the base layer's weight (fc1's B split per gate / up as its weight)."""
        from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        state = self.state_dict(prefix="", keep_vars=True)
        axis = {"lora_B": 0} if self.kind == "column" else {"lora_A": 1}
        sharded = make_sharded_tensors_for_checkpoint(state, prefix, axis, sharded_offsets)
        if self.gated_fc1:
            key = f"{prefix}lora_B"
            sharded[key] = apply_swiglu_sharded_factory(sharded[key], sharded_offsets)
        return sharded


def _hook(adapter: LoraAdapter):
    def add_adapter_output(module, inputs, output):
        out, bias = output
        return out + adapter(inputs[0]), bias
    return add_adapter_output


def apply_lora(model: torch.nn.Module, settings: LoraSettings, config) -> None:
    """Freeze every parameter of `model` (one pipeline chunk as build_model makes it) and give each targeted linear
    layer of its decoder an adapter."""
    for p in model.parameters():
        p.requires_grad_(False)
    decoder = getattr(model, "decoder", None)
    for layer in getattr(decoder, "layers", []):
        for target in settings.targets:
            parent_name, linear_name, kind = TARGETS[target]
            parent = getattr(layer, parent_name)
            base = getattr(parent, linear_name, None)
            if base is None or not hasattr(base, "weight"):
                raise ValueError(f"--lora-target {target}: layer {layer.layer_number} has no dense {linear_name} "
                                 "(MoE experts take no adapters)")
            adapter = LoraAdapter(base, kind, target, layer.layer_number, settings, config)
            parent.add_module(linear_name + ADAPTER_SUFFIX, adapter)
            base.register_forward_hook(_hook(adapter))


def adapter_beside(parent: torch.nn.Module, linear_name: str) -> LoraAdapter | None:
    """The adapter of `parent`'s linear layer `linear_name` (None: it has none)."""
    return getattr(parent, linear_name + ADAPTER_SUFFIX, None)


def is_adapter_key(key: str) -> bool:
    """A state-dict / checkpoint key of an adapter parameter."""
    return any(f"{TARGETS[t][1]}{ADAPTER_SUFFIX}." in key for t in TARGETS)


def adapter_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if is_adapter_key(n)]


def adapters_of(model: torch.nn.Module, settings: LoraSettings):
    """(global layer number, target, the linear layer, its adapter) for every adapter of a chunk."""
    for layer in model.decoder.layers:
        for target in settings.targets:
            parent_name, linear_name, _ = TARGETS[target]
            parent = getattr(layer, parent_name)
            yield (layer.layer_number, target, getattr(parent, linear_name),
                   getattr(parent, linear_name + ADAPTER_SUFFIX))


def merged_state_dict(model: torch.nn.Module, settings: LoraSettings) -> dict[str, torch.Tensor]:
    """The state dict of the base model with each adapter merged into its weight, W + (alpha / r) B A (in float64,
    then the weight's dtype); adapter tensors left out. For the whole model in one process (TP1, PP1)."""
    merged = {}
    for _, _, linear, adapter in adapters_of(model, settings):
        delta = settings.scaling * (adapter.lora_B.detach().double() @ adapter.lora_A.detach().double())
        merged[id(linear.weight)] = (linear.weight.detach().double() + delta).to(linear.weight.dtype)
    state = {}
    named = dict(model.named_parameters())
    for key, value in model.state_dict().items():
        if is_adapter_key(key):
            continue
        param = named.get(key)
        state[key] = merged.get(id(param), value) if param is not None else value
    return state
