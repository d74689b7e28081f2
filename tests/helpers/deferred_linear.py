"""A plain nn.Linear whose weight gradient can be deferred to a W step: the toy layer of the
schedule tests (the model's own deferrable layers are in `megatron_dsv3.layers` and
`megatron_dsv3.moe.experts`)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from megatron_dsv3.weight_grad import WeightGradStore, linear_deferred_wgrad


class DeferredWgradLinear(nn.Linear):
    """nn.Linear through `linear_deferred_wgrad`; `attach_weight_grad_store` finds it by its
    `weight_grad_store` attribute."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 store: Optional[WeightGradStore] = None, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.weight_grad_store = store

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_deferred_wgrad(x, self.weight, self.bias, self.weight_grad_store)
