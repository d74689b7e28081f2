"""The routed experts' weight gradients of several micro-batches in one grouped GEMM.

With 64 small experts and 4,096-token micro-batches an expert sees ~400 rows per micro-batch,
so each micro-batch's weight-gradient GEMM dW_e = dY_e^T X_e is short on rows and its result
then goes through a pass over every expert weight to be summed into the step's fp32 gradient
(per weight element and micro-batch: 2 bytes written by the GEMM, 2 + 4 read, 4 written).
Collected over the micro-batches of an optimizer step instead, the same sum

    dW_e = sum_m dY_{m,e}^T X_{m,e}

is one GEMM per expert over all its rows of the step, accumulated in fp32 inside the GEMM,
and the fp32 gradient is written once per step (kernels/grouped_wgrad.py: the micro-batches are
the kernel's segments, read where they lie; no reordering of rows). The price is memory: each
micro-batch's X and dY of every expert projection are copied into buffers that live from step to
step (the proxy preset: ~0.4 GB per MoE layer and micro-batch). The copy is also what CUDA
graphs need: under torch.compile's "reduce-overhead" the experts' input comes out of the
compiled router's graph and the gradient of their output out of the compiled combine's
backward graph, and the next micro-batch's replay overwrites both.

  merger = ExpertGradMerger()
  attach_expert_grad_merger(model, merger)   # every RoutedExperts of the model
  for each micro-batch: loss.backward()       # dX as usual; (dY, X) of each projection copied
  merger.flush()                              # dW of all of them, into main_grad / .grad

`stores_first(weight)` (MasterWeights.claims_sum): whether the weight's fp32 sum holds nothing
of this step yet, so that the flush stores the gradient instead of adding it to a zeroed sum.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from ..kernels.grouped_wgrad import grouped_wgrad_segments
from ..weight_grad import accumulate_weight_grad
from .experts import Groups, RoutedExperts


class _Segments:
    """One expert weight's (dY, X) rows and expert end offsets, one segment per micro-batch,
    in buffers [segments, rows, features] that grow to the largest step seen and are kept.
    `segments`: how many to make room for at first (the micro-batches of a step)."""

    def __init__(self, segments: int) -> None:
        self.first_segments = segments
        self.grad_y: Optional[torch.Tensor] = None
        self.x: Optional[torch.Tensor] = None
        self.ends: Optional[torch.Tensor] = None
        self.count = 0

    def append(self, grad_y_NO: torch.Tensor, x_NI: torch.Tensor, ends_E: torch.Tensor) -> None:
        rows = grad_y_NO.shape[0]
        if (self.grad_y is None or self.count == self.grad_y.shape[0]
                or rows > self.grad_y.shape[1] or self.grad_y.dtype != grad_y_NO.dtype):
            self._grow(grad_y_NO, x_NI, ends_E)
        self.grad_y[self.count, :rows].copy_(grad_y_NO)
        self.x[self.count, :rows].copy_(x_NI)
        self.ends[self.count].copy_(ends_E)
        self.count += 1

    def _grow(self, grad_y_NO, x_NI, ends_E) -> None:
        """Room for the first step's segments (then twice as many as held) and the larger row
        count; what is held is kept."""
        old = (self.grad_y, self.x, self.ends)
        held = self.count
        if old[0] is None:
            segments = self.first_segments
        else:
            segments = 2 * held if held == old[0].shape[0] else old[0].shape[0]
        rows = max(grad_y_NO.shape[0], 0 if old[0] is None else old[0].shape[1])
        self.grad_y = grad_y_NO.new_empty(segments, rows, grad_y_NO.shape[1])
        self.x = x_NI.new_empty(segments, rows, x_NI.shape[1])
        self.ends = ends_E.new_empty(segments, ends_E.shape[0])
        if held:
            for new, kept in zip((self.grad_y, self.x, self.ends), old):
                new[:held, :kept.shape[1]].copy_(kept[:held])

    def release_view(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The held segments (views of the buffers, valid until the next append); emptied."""
        held, self.count = self.count, 0
        return self.grad_y[:held], self.x[:held], self.ends[:held]


class ExpertGradMerger:
    """Per expert weight, the (dY, X, expert ends) of each micro-batch since the last flush;
    `micro_batches`: how many a step has (the buffers' first size; more make them grow)."""

    def __init__(self, stores_first: Optional[Callable[[torch.Tensor], bool]] = None,
                 micro_batches: int = 8) -> None:
        if micro_batches < 1:
            raise ValueError(f"ExpertGradMerger(micro_batches={micro_batches}) is invalid: a "
                             "step has at least one micro-batch")
        self.micro_batches = micro_batches
        self._pending: dict[int, tuple[torch.Tensor, _Segments]] = {}
        self._buffers: dict[int, _Segments] = {}
        self.stores_first = stores_first

    def add(self, weight: torch.Tensor, grad_y_NO: torch.Tensor, x_NI: torch.Tensor,
            groups: Groups) -> None:
        """Copy one micro-batch's operands of `weight`'s gradient (called by the experts'
        autograd backward instead of computing it)."""
        segments = self._buffers.setdefault(id(weight), _Segments(self.micro_batches))
        self._pending.setdefault(id(weight), (weight, segments))
        ends_E = (groups if isinstance(groups, torch.Tensor) else
                  torch.tensor(groups, dtype=torch.int64).cumsum(0).to(torch.int32))
        segments.append(grad_y_NO, x_NI, ends_E.to(device=grad_y_NO.device, dtype=torch.int32))

    def __len__(self) -> int:
        """Expert weights with operands held."""
        return len(self._pending)

    @torch.no_grad()
    def flush(self) -> None:
        """Each held weight's gradient over its micro-batches, written once into its fp32
        `main_grad` (stored when `stores_first` says its sum is not yet this step's, else
        added), or added to its `.grad`."""
        pending, self._pending = self._pending, {}
        for weight, segments in pending.values():
            grad_y_SNO, x_SNI, ends_SE = segments.release_view()
            main_grad = getattr(weight, "main_grad", None)
            if main_grad is not None and main_grad.dtype == torch.float32:
                store = self.stores_first is not None and self.stores_first(weight)
                grouped_wgrad_segments(grad_y_SNO, x_SNI, ends_SE, main_grad,
                                       accumulate=not store)
            else:
                grad_EOI = torch.empty(weight.shape, dtype=torch.float32, device=weight.device)
                grouped_wgrad_segments(grad_y_SNO, x_SNI, ends_SE, grad_EOI, accumulate=False)
                accumulate_weight_grad(weight, grad_EOI.to(weight.dtype))


def attach_expert_grad_merger(module: torch.nn.Module, merger) -> int:
    """Point every routed-experts module under `module` at `merger` (None detaches); returns
    how many."""
    experts = [m for m in module.modules() if isinstance(m, RoutedExperts)]
    for m in experts:
        m.weight_grad_merger = merger
    return len(experts)
