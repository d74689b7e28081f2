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

import torch
import torch.distributed as dist

from .layer import DeepSeekMoE
from .router import Router, expert_bias_step


@dataclass
class ExpertLoads:
    """Global expert loads of one optimizer step, per MoE layer (for logging and plots)."""

    names: list[str]          # router module names, in model order
    loads: torch.Tensor       # [layers, E] int64 token-expert assignments
    updated: bool             # whether the biases moved this step

    def imbalance(self) -> torch.Tensor:
        """max load / mean load per layer (1.0 is perfectly balanced)."""
        loads = self.loads.float()
        return loads.max(dim=1).values / loads.mean(dim=1).clamp(min=1e-9)


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
        return ExpertLoads([], torch.zeros(0, 0, dtype=torch.int64), False)
    loads = torch.stack([router.tokens_per_expert for _, router in named])  # [L, E]
    if group is not None and group.size() > 1:
        dist.all_reduce(loads, group=group)
    active = rate > 0 and (stop_tokens is None or tokens_seen < stop_tokens)
    for (_, router), load in zip(named, loads):
        if active:
            router.expert_bias.copy_(expert_bias_step(load, router.expert_bias, rate))
        router.tokens_per_expert.zero_()
    return ExpertLoads([name for name, _ in named], loads.cpu(), active)
