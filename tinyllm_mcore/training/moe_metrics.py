"""MoE training metrics: megatron's load-balancing aux loss and the tokens each expert processed, per layer.

The loop calls `MoEMetrics.attach(chunks, config)` once (None for a dense model) and `step()` after every training
step on every rank (the numbers are reduced collectively):

* ``moe aux loss`` — megatron's switch-transformer load-balancing loss *without* its coefficient, averaged over layers
  and micro-batches (1.0 = balanced; E/k when every token goes to the same k experts), from megatron's tracker
  (`moe_utils.track_moe_metrics`). Only recorded when ``--moe-aux-loss-coeff`` > 0 (megatron computes it only then).
* ``moe load imbalance`` — max over experts of the expert's token count / the mean count, averaged over layers
  (1.0 = balanced, E = every token on one expert), and ``moe load entropy`` — the entropy of each layer's token
  distribution over experts / log(E), averaged over layers (1.0 = balanced).
* ``moe dropped fraction`` — the share of token-to-expert assignments dropped by ``--moe-expert-capacity-factor``
  (0 without it).
* ``expert_load`` and ``expert_tokens`` (history only) — per layer, each expert's share of the processed token
  assignments, and their counts.

Counts come from a forward hook on every `TopKRouter`: the routing map after token dropping, summed over this rank's
tokens, then over TP (sequence-parallel shards) x DP ranks and over pipeline stages (disjoint layers). The hook counts
only forwards that build a graph in training mode, so evaluation and the no-grad first pass of full activation
recomputation are not counted (megatron's expert-bias counter uses the same rule).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist


class MoEMetrics:
    def __init__(self, routers, config):
        self.config = config
        self.num_layers = config.num_layers
        self.num_experts = config.num_moe_experts
        self.counts = torch.zeros(self.num_layers, self.num_experts, dtype=torch.float64)
        self.assigned = torch.zeros(self.num_layers, 1, dtype=torch.float64)  # tokens x topk, before dropping
        self.handles = [r.register_forward_hook(self._count) for r in routers]

    @classmethod
    def attach(cls, chunks, config) -> "MoEMetrics | None":
        """Hook this rank's routers; None for a dense model."""
        from megatron.core.transformer.moe.router import TopKRouter

        if not getattr(config, "num_moe_experts", None):
            return None
        routers = [m for chunk in chunks for m in chunk.modules() if isinstance(m, TopKRouter)]
        return cls(routers, config)

    def _count(self, router, inputs, outputs):
        if not (router.training and torch.is_grad_enabled()):
            return
        _, routing_map = outputs
        with torch.no_grad():
            self.counts[router.layer_number - 1] += routing_map.sum(dim=0).to(torch.float64).cpu()
            self.assigned[router.layer_number - 1] += routing_map.shape[0] * router.topk

    def step(self, num_microbatches: int) -> dict:
        """Reduce this step's counts (and megatron's aux-loss tracker) over all ranks; reset; return the metrics."""
        from megatron.core import parallel_state as ps
        from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker, track_moe_metrics

        device = "cuda" if torch.cuda.is_available() else "cpu"
        counts = torch.cat([self.counts, self.assigned], dim=1).to(device)  # a copy: the buffers are reset below
        dist.all_reduce(counts, group=ps.get_tensor_and_data_parallel_group(with_context_parallel=True))
        dist.all_reduce(counts, group=ps.get_pipeline_model_parallel_group())
        counts, assigned = counts.cpu().split([self.num_experts, 1], dim=1)
        self.counts.zero_()
        self.assigned.zero_()
        metrics: dict = {}
        if self.config.moe_aux_loss_coeff:
            totals: dict = {}
            track_moe_metrics(loss_scale=1.0 / num_microbatches, iteration=0, total_loss_dict=totals,
                              force_initialize=True, track_names=["load_balancing_loss"],
                              num_layers=self.num_layers)
            metrics["moe aux loss"] = float(totals["load_balancing_loss"])
        else:
            clear_aux_losses_tracker()
        seen = assigned[:, 0] > 0
        if seen.any():
            load = counts[seen]
            metrics["moe dropped fraction"] = float(1 - load.sum() / assigned[seen].sum())
            share = load / load.sum(dim=1, keepdim=True)
            entropy = -(share * share.clamp(min=1e-30).log()).sum(dim=1) / math.log(self.num_experts)
            metrics["moe load imbalance"] = float((share.max(dim=1).values * self.num_experts).mean())
            metrics["moe load entropy"] = float(entropy.mean())
            metrics["expert_load"] = share.tolist()
            metrics["expert_tokens"] = load.tolist()
        return metrics

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
