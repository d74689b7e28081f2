"""Backward split into input gradient (B) and weight gradient (W), for zero-bubble filling.

A pipeline schedule wants the input gradient of a chunk as early as possible (the previous
stage is waiting for it) and the weight gradient whenever the rank would otherwise idle. So
the layers here compute the input gradient inside autograd's backward, as usual, and, while
their `WeightGradStore` is deferring, queue the weight-gradient GEMM instead of running it.
The schedule later runs the queued work of one backward chunk as one W step.

  store = WeightGradStore()
  attach_weight_grad_store(model, store)              # every deferrable layer of the model
  with store.deferring(label=("B", 0, 3)):            # the schedule's B step
      torch.autograd.backward(outputs, output_grads)  # input grads only
  store.run_next()                                    # the W step: weight grads of that B

The mechanism is one primitive, `weight_grad_now_or_later(store, param, compute)`: a layer's
autograd backward hands it the closure that computes its parameter's gradient; it returns the
gradient (autograd accumulates it, as for any layer) or, while the store defers, queues the
closure and returns None. The layers built on it:
  linear_deferred_wgrad   y = x W^T (+ b), with an optional all-reduce of dX over a
        tensor-parallel group (Megatron's column-parallel `allreduce_dgrad`)
  layers.py: the "local" backend's column / row / replicated linears
  moe/experts.py: the routed experts' two grouped GEMMs (dW_e = dY_e^T X_e per expert)
`attach_weight_grad_store(module, store)` points every layer with a `weight_grad_store`
attribute at the store; with no store attached (None) those layers run their plain code.

Design notes
  * No module-level state: the store is an object that the schedule owns and the layers hold
    a reference to; two models (or a reference run beside a pipelined one) never share it.
  * Same arithmetic in both modes: the closure is the code the non-deferred backward runs, so
    B followed by W gives bit-identical gradients. W reproduces how autograd accumulates: a
    parameter's contributions within one group are summed in backward order first, then added
    to its gradient once (autograd sums a leaf's incoming gradients before accumulating), and
    W runs under the autocast state its B ran under.
  * A deferred gradient is accumulated into `param.main_grad` when the parameter has one
    (Megatron's DDP keeps an fp32 gradient buffer there; its hook adds `.grad` the same way),
    else into `param.grad`. Autograd hooks on the parameter's grad accumulator (Megatron DDP's
    overlap_grad_reduce) do not fire for deferred gradients: the caller reduces gradients after
    the step (finalize_model_grads, with overlap_grad_reduce off).
  * Only the GEMMs of these layers are deferred; every other parameter (norms, the router, the
    embedding, Megatron's own output layer) gets its gradient during B. That is correct, only
    less of the weight work moves into W.
  * Not traced by torch.compile while a store is attached: whether to defer is read in the
    backward (`deferring_now`), and a traced layer would have the value of trace time (not
    deferring) compiled into its backward graph, so B would compute W's gradients. The layers
    with a store leave the graph (`torch.compiler.disable`: layers.py's linears at the layer,
    `RoutedExperts._eager`, `linear_deferred_wgrad` for any other caller); without one they
    trace as before.
"""

from __future__ import annotations

from collections import deque
from contextlib import contextmanager
from typing import Callable, Hashable, Iterator, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .kernels.grad_accumulate import add_into_fp32_

GradFn = Callable[[], torch.Tensor]  # computes one parameter's gradient contribution


class WeightGradStore:
    """Queue of deferred weight-gradient work, one group per backward chunk (FIFO)."""

    def __init__(self) -> None:
        self._deferring = False
        self._open: list[tuple[torch.Tensor, GradFn]] = []
        self._groups: deque[tuple[Hashable, list[tuple[torch.Tensor, GradFn]]]] = deque()

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

    def defer_grad(self, param: torch.Tensor, compute: GradFn) -> None:
        """Queue `compute` (returns a gradient contribution for `param`) in the open group; it
        will run under the autocast state of this moment (the B step's backward)."""
        if not self._deferring:
            raise RuntimeError("WeightGradStore.defer_grad() outside deferring(): the layer "
                               "should have computed its weight gradient directly")
        device_type = param.device.type
        enabled = torch.is_autocast_enabled(device_type)
        dtype = torch.get_autocast_dtype(device_type)

        def under_b_autocast() -> torch.Tensor:
            with torch.autocast(device_type, dtype=dtype, enabled=enabled):
                return compute()

        self._open.append((param, under_b_autocast))

    def run_next(self) -> Hashable:
        """Run the oldest group (one W step); return the label it was queued with."""
        if not self._groups:
            raise RuntimeError("WeightGradStore.run_next(): no deferred weight gradients; the "
                               "schedule has more W steps than deferred B steps")
        return self._run(*self._groups.popleft())

    def run_last(self) -> Hashable:
        """Run the newest group: one deferred and run within the same step (an F&B step that
        runs its own weight gradients behind an exchange), so that the groups queued before it
        keep their order for the schedule's W steps."""
        if not self._groups:
            raise RuntimeError("WeightGradStore.run_last(): no deferred weight gradients")
        return self._run(*self._groups.pop())

    @staticmethod
    def _run(label: Hashable, works: list[tuple[torch.Tensor, GradFn]]) -> Hashable:
        # As autograd: the contributions of one backward to a parameter are summed in the
        # order they arrive, then accumulated once (at the parameter's last contribution).
        last = {id(param): i for i, (param, _) in enumerate(works)}
        pending: dict[int, torch.Tensor] = {}
        with torch.no_grad():
            for i, (param, compute) in enumerate(works):
                grad = compute().to(param.dtype)  # autograd casts a gradient to its input's dtype
                if id(param) in pending:
                    grad = pending.pop(id(param)) + grad
                if last[id(param)] == i:
                    accumulate_weight_grad(param, grad)
                else:
                    pending[id(param)] = grad
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


def accumulate_weight_grad(param: torch.Tensor, grad: torch.Tensor) -> None:
    """param.main_grad += grad (Megatron DDP) or param.grad += grad, creating it if absent."""
    main_grad = getattr(param, "main_grad", None)
    if main_grad is not None:
        add_into_fp32_(main_grad, grad)
    elif param.grad is None:
        param.grad = grad
    else:
        param.grad.add_(grad)


def weight_grad_now_or_later(store: Optional[WeightGradStore], param: torch.Tensor,
                             compute: GradFn) -> Optional[torch.Tensor]:
    """For a layer's autograd backward: `compute()` now (return it to autograd), or, while
    `store` defers, queue it for the W step and return None (autograd then leaves `param`
    alone). The one place where a layer's weight gradient is either computed or deferred."""
    if store is not None and store.deferring_now:
        store.defer_grad(param, compute)
        return None
    return compute()


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype autocast casts GEMM inputs to on this device, None when autocast is off.
    Our autograd functions cast explicitly (autocast does not reach inside them) and save the
    cast tensors, as autograd saves them for F.linear under autocast."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


class _LinearDeferredWgrad(torch.autograd.Function):
    """y = x W^T + b; backward: dX = dY W now (all-reduced over `dgrad_group` if given),
    dW = dY^T X and db = sum dY now or deferred."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                store: Optional[WeightGradStore], dgrad_group) -> torch.Tensor:
        x_c, w_c, b_c = x, weight, bias
        dtype = autocast_dtype(x.device.type)
        if dtype is not None:
            x_c, w_c = x.to(dtype), weight.to(dtype)
            b_c = None if bias is None else bias.to(dtype)
        ctx.save_for_backward(x_c, w_c)
        # The parameters themselves (not saved copies): a deferred gradient is accumulated
        # into them, and `main_grad` is a Python attribute of the Parameter object.
        ctx.weight, ctx.bias, ctx.store, ctx.dgrad_group = weight, bias, store, dgrad_group
        return F.linear(x_c, w_c, b_c)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x, w = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x = handle = None
        if need_x:
            grad_x = grad_y.matmul(w)  # [..., O] @ [O, I] -> [..., I]
            if ctx.dgrad_group is not None:  # Megatron's column-parallel allreduce_dgrad:
                handle = dist.all_reduce(grad_x, group=ctx.dgrad_group, async_op=True)
                # ... in flight while a non-deferred weight gradient computes

        def grad_y_TO() -> torch.Tensor:  # T = all leading dims, O = out features
            return grad_y.reshape(-1, grad_y.shape[-1])

        grad_w = grad_b = None
        if need_w:
            grad_w = weight_grad_now_or_later(
                ctx.store, ctx.weight, lambda: grad_y_TO().t() @ x.reshape(-1, x.shape[-1]))
        if need_b:
            grad_b = weight_grad_now_or_later(ctx.store, ctx.bias, lambda: grad_y_TO().sum(0))
        if handle is not None:
            handle.wait()
        return grad_x, grad_w, grad_b, None, None


@torch.compiler.disable  # the store's deferral is decided in backward: Python state, eager
def _linear_deferred_wgrad_eager(x: torch.Tensor, weight: torch.Tensor,
                                 bias: Optional[torch.Tensor], store: WeightGradStore,
                                 dgrad_group) -> torch.Tensor:
    return _LinearDeferredWgrad.apply(x, weight, bias, store, dgrad_group)


def linear_deferred_wgrad(x: torch.Tensor, weight: torch.Tensor,
                          bias: Optional[torch.Tensor] = None,
                          store: Optional[WeightGradStore] = None,
                          dgrad_group=None) -> torch.Tensor:
    """F.linear(x, weight, bias) whose weight/bias gradients go to `store` while it defers.
    `dgrad_group`: all-reduce the input gradient over this group (a column-parallel layer
    whose input is replicated over tensor-parallel ranks); None: no communication.

    Under torch.compile with a store it leaves the graph (one break each side) and runs eager:
    traced, dynamo would read `store.deferring_now` once, at trace time (False: the forward is
    not deferring), and fold the non-deferred weight gradient into the compiled backward, so B
    would compute what W should. Without a store (normal training) it is traced."""
    if store is not None and torch.compiler.is_compiling():
        return _linear_deferred_wgrad_eager(x, weight, bias, store, dgrad_group)
    return _LinearDeferredWgrad.apply(x, weight, bias, store, dgrad_group)


def attach_weight_grad_store(module: nn.Module, store: Optional[WeightGradStore]) -> int:
    """Point every submodule that has a `weight_grad_store` attribute at `store` (None
    detaches: the layers run their plain code again); return the number of such submodules."""
    count = 0
    for sub in module.modules():
        if hasattr(sub, "weight_grad_store"):
            sub.weight_grad_store = store
            count += 1
    return count
