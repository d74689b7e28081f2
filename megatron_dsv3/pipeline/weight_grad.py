"""Backward split into input gradient (B) and weight gradient (W), for zero-bubble filling.

A pipeline schedule wants the input gradient of a chunk as early as possible (the previous
stage is waiting for it) and the weight gradient whenever the rank would otherwise idle. So
the linear layers here compute the input gradient inside autograd's backward, as usual, and,
while their `WeightGradStore` is deferring, queue the weight-gradient matmul as a closure
instead of running it. The schedule later runs the queued closures of one backward chunk as
one W step.

  store = WeightGradStore()
  layer = DeferredWgradLinear(d_in, d_out, store=store)  # or attach_weight_grad_store(m, store)
  with store.deferring(label=("B", 0, 3)):                 # the schedule's B step
      torch.autograd.backward(outputs, output_grads)       # input grads only
  store.run_next()                                         # the W step: weight grads of that B

Design notes
  * No module-level state: the store is an object that the schedule owns and the layers hold
    a reference to; two models (or a reference run beside a pipelined one) never share it.
  * Outside `deferring()` the layers are plain linear layers (autograd returns the weight
    gradient and accumulates it as usual), so the same modules run in a single-process
    reference or in a non-zero-bubble step unchanged.
  * Same math as F.linear in both modes; the weight gradient is always `dY^T X` (and the bias
    gradient `sum dY`) computed by the same code, so B followed by W is bit-identical to a
    plain backward of the same function.
  * A deferred weight gradient is accumulated into `param.main_grad` when the parameter has
    one (Megatron's DDP keeps an fp32 gradient buffer there), else into `param.grad`. Autograd
    hooks on the parameter's grad accumulator (Megatron DDP's overlap_grad_reduce) do not fire
    for deferred gradients: the caller reduces gradients after the step (finalize_model_grads).
  * Only the matmuls of these layers are deferred; every other parameter (norms, router) gets
    its gradient during B. That is correct, only less of the weight work moves into W.
"""

from __future__ import annotations

from collections import deque
from contextlib import contextmanager
from typing import Callable, Hashable, Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


class WeightGradStore:
    """Queue of deferred weight-gradient work, one group per backward chunk (FIFO)."""

    def __init__(self) -> None:
        self._deferring = False
        self._open: list[Callable[[], None]] = []
        self._groups: deque[tuple[Hashable, list[Callable[[], None]]]] = deque()

    @property
    def deferring_now(self) -> bool:
        """True inside `deferring()`: layers queue their weight gradient instead of computing it."""
        return self._deferring

    @contextmanager
    def deferring(self, label: Hashable = None) -> Iterator[None]:
        """Queue the weight gradients of the backward run inside this block as one group."""
        if self._deferring:
            raise RuntimeError("WeightGradStore.deferring() does not nest: one backward chunk "
                               "at a time")
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False
            self._groups.append((label, self._open))
            self._open = []

    def defer(self, work: Callable[[], None]) -> None:
        if not self._deferring:
            raise RuntimeError("WeightGradStore.defer() outside deferring(): the layer should "
                               "have computed its weight gradient directly")
        self._open.append(work)

    def run_next(self) -> Hashable:
        """Run the oldest group (one W step); return the label it was queued with."""
        if not self._groups:
            raise RuntimeError("WeightGradStore.run_next(): no deferred weight gradients; the "
                               "schedule has more W steps than deferred B steps")
        label, works = self._groups.popleft()
        with torch.no_grad():
            for work in works:
                work()
        return label

    def peek_label(self) -> Hashable:
        """Label of the group the next `run_next()` will run."""
        if not self._groups:
            raise RuntimeError("WeightGradStore.peek_label(): no deferred weight gradients")
        return self._groups[0][0]

    def __len__(self) -> int:
        """Number of queued groups (W steps still to run)."""
        return len(self._groups)

    def clear(self) -> None:
        self._deferring = False
        self._open = []
        self._groups.clear()


def _accumulate(param: torch.Tensor, grad: torch.Tensor) -> None:
    """param.main_grad += grad (Megatron DDP) or param.grad += grad, creating it if absent."""
    main_grad = getattr(param, "main_grad", None)
    if main_grad is not None:
        main_grad.add_(grad)
    elif param.grad is None:
        param.grad = grad
    else:
        param.grad.add_(grad)


class _LinearDeferredWgrad(torch.autograd.Function):
    """y = x W^T + b; backward: dX = dY W now, dW = dY^T X and db = sum dY now or deferred."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                store: Optional[WeightGradStore]) -> torch.Tensor:
        ctx.save_for_backward(x)
        # The parameters themselves (not saved copies): a deferred gradient is accumulated
        # into them, and `main_grad` is a Python attribute of the Parameter object.
        ctx.weight, ctx.bias, ctx.store = weight, bias, store
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        (x,) = ctx.saved_tensors
        weight, bias, store = ctx.weight, ctx.bias, ctx.store
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x = grad_y @ weight if need_x else None  # [..., O] @ [O, I] -> [..., I]

        def weight_grads() -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
            grad_y_TO = grad_y.reshape(-1, grad_y.shape[-1])  # T = all leading dims, O = out
            x_TI = x.reshape(-1, x.shape[-1])                  # I = in
            grad_w = grad_y_TO.t() @ x_TI if need_w else None  # [O, I]
            grad_b = grad_y_TO.sum(0) if need_b else None      # [O]
            return grad_w, grad_b

        if store is not None and store.deferring_now and (need_w or need_b):
            def deferred() -> None:
                grad_w, grad_b = weight_grads()
                if grad_w is not None:
                    _accumulate(weight, grad_w)
                if grad_b is not None:
                    _accumulate(bias, grad_b)

            store.defer(deferred)
            return grad_x, None, None, None
        grad_w, grad_b = weight_grads()
        return grad_x, grad_w, grad_b, None


def linear_deferred_wgrad(x: torch.Tensor, weight: torch.Tensor,
                          bias: Optional[torch.Tensor] = None,
                          store: Optional[WeightGradStore] = None) -> torch.Tensor:
    """F.linear(x, weight, bias) whose weight/bias gradients go to `store` while it defers."""
    return _LinearDeferredWgrad.apply(x, weight, bias, store)


class DeferredWgradLinear(nn.Linear):
    """nn.Linear whose weight gradient can be deferred to a W step (see module docstring)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 store: Optional[WeightGradStore] = None, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.weight_grad_store = store

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_deferred_wgrad(x, self.weight, self.bias, self.weight_grad_store)


def attach_weight_grad_store(module: nn.Module, store: Optional[WeightGradStore]) -> int:
    """Point every submodule that has a `weight_grad_store` attribute at `store`; return the
    number of such submodules."""
    count = 0
    for sub in module.modules():
        if hasattr(sub, "weight_grad_store"):
            sub.weight_grad_store = store
            count += 1
    return count
