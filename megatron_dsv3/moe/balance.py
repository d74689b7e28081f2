"""Load balancing, what a training step sets and does around the MoE layers.

  set_balance_loss_scale(model, scale)   the gradient scale of every MoE layer's sequence-wise
        balance loss: 1 / micro-batches per step (times any loss scale), so that it is
        normalised like the main loss; must be set before training (an error otherwise)
  update_expert_biases(model, group=...) the auxiliary-loss-free bias update, once per
        optimizer step: b_i <- b_i + gamma * sign(mean_load - load_i)  (docs/architecture.md)

The loads are the routers' token counts since the last update, summed over every replica that
routes with the same bias: the data-parallel ranks (and, with expert parallelism, the expert-
parallel ranks, which see different tokens). Tensor-parallel ranks route the same tokens and
are not summed. All routers' counts travel in one all-reduce. The update runs outside
autograd and stops (gamma = 0) once `bias_update_stop_tokens` training tokens are seen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from .layer import DeepSeekMoE
from .router import Router, expert_bias_step


LOAD_WINDOW_STEPS = 20  # the load heatmaps sum the loads of the last this many (logged) steps


@dataclass
class ExpertLoads:
    """Global expert loads of one optimizer step, per MoE layer (for logging and plots)."""

    names: list[str]          # router module names, in model order
    loads: torch.Tensor       # [layers, E] int64 token-expert assignments
    updated: bool             # whether the biases moved this step
    biases: Optional[torch.Tensor] = None  # [layers, E] fp32 expert biases after the step

    def imbalance(self) -> torch.Tensor:
        """max load / mean load per layer (1.0 is perfectly balanced)."""
        loads = self.loads.float()
        return loads.max(dim=1).values / loads.mean(dim=1).clamp(min=1e-9)

    def max_over_min(self) -> torch.Tensor:
        """max load / min load per layer, an idle expert counted as 1 token (finite)."""
        loads = self.loads.float()
        return loads.max(dim=1).values / loads.min(dim=1).values.clamp(min=1)

    def metrics(self) -> dict[str, float]:
        """Per layer (`layer_label`): moe/<label>/imbalance (max / mean load), max_over_min,
        and with the biases bias_spread (max - min) and bias_norm (L2)."""
        out = {}
        columns = {"imbalance": self.imbalance(), "max_over_min": self.max_over_min()}
        if self.biases is not None:
            biases = self.biases.float()
            columns["bias_spread"] = biases.max(dim=1).values - biases.min(dim=1).values
            columns["bias_norm"] = biases.norm(dim=1)
        values = {key: column.tolist() for key, column in columns.items()}
        for i, name in enumerate(self.names):
            for key, column in values.items():
                out[f"moe/{layer_label(name)}/{key}"] = column[i]
        return out


def gather_expert_loads(rows: list, updated: bool, group=None) -> ExpertLoads:
    """ExpertLoads of rows (router's full-model name, load [E], bias [E]) held by the ranks of
    `group` (all of them, through all_gather_object, on every rank of it; this rank's alone
    without a group or in a group of one), in model order: decoder layers, then MTP depths."""
    if group is not None and dist.get_world_size(group) > 1:
        parts: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(parts, rows, group=group)
        rows = [row for part in parts for row in part]
    rows = sorted(rows, key=lambda row: (row[0].startswith("mtp"), int(row[0].split(".")[2])))
    if not rows:
        return ExpertLoads([], torch.zeros(0, 0, dtype=torch.int64), updated, torch.zeros(0, 0))
    return ExpertLoads([r[0] for r in rows], torch.stack([r[1] for r in rows]), updated,
                       torch.stack([r[2] for r in rows]))


def layer_label(router_name: str) -> str:
    """'decoder.layers.1.mlp.router' -> 'L1'; 'mtp.layers.0.transformer_layer...' -> 'mtp0'
    (a leading 'module.' of a wrapped model is dropped)."""
    parts = router_name.removeprefix("module.").split(".")
    if parts[0] == "decoder" and len(parts) > 2:
        return f"L{parts[2]}"
    if parts[0] == "mtp" and len(parts) > 2:
        return f"mtp{parts[2]}"
    return router_name.removesuffix(".router")


def set_balance_loss_scale(model: torch.nn.Module, scale: float) -> int:
    """Set the balance loss's gradient scale on every DeepSeekMoE in `model` (e.g. 1 /
    num_microbatches: the main loss of each micro-batch is divided by it too); returns how
    many layers were set."""
    layers = [m for m in model.modules() if isinstance(m, DeepSeekMoE)]
    for layer in layers:
        layer.set_balance_loss_scale(scale)
    return len(layers)


def routers(model: torch.nn.Module) -> list[tuple[str, Router]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, Router)]


@torch.no_grad()
def update_expert_biases(model: torch.nn.Module, *, group=None, tokens_seen: int,
                         rate: float, stop_tokens: int | None = None) -> ExpertLoads:
    """Sum every router's load over `group`, step its bias, reset its counter."""
    named = routers(model)
    if not named:
        return ExpertLoads([], torch.zeros(0, 0, dtype=torch.int64), False,
                           torch.zeros(0, 0))
    loads = torch.stack([router.tokens_per_expert for _, router in named])  # [L, E]
    if group is not None and group.size() > 1:
        dist.all_reduce(loads, group=group)
    active = rate > 0 and (stop_tokens is None or tokens_seen < stop_tokens)
    for (_, router), load in zip(named, loads):
        if active:
            router.expert_bias.copy_(expert_bias_step(load, router.expert_bias, rate))
        router.tokens_per_expert.zero_()
    biases = torch.stack([router.expert_bias for _, router in named])
    return ExpertLoads([name for name, _ in named], loads.cpu(), active, biases.cpu())
