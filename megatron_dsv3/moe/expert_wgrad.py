"""The routed experts' weight gradients of several micro-batches in one grouped GEMM.

With 64 small experts and 4,096-token micro-batches an expert sees ~400 rows per micro-batch,
so each micro-batch's weight-gradient GEMM dW_e = dY_e^T X_e is short on rows and its result
then goes through a pass over every expert weight to be summed into the step's fp32 gradient
(per weight element and micro-batch: 2 bytes written by the GEMM, 2 + 4 read, 4 written).
Collected over the micro-batches of an optimizer step instead, the same sum

    dW_e = sum_m dY_{m,e}^T X_{m,e}

is one GEMM per expert over all its rows of the step, accumulated in fp32 inside the GEMM,
and the fp32 gradient is written once per step (kernels/grouped_wgrad.py: the micro-batches are
the kernel's segments, read where they lie; no reordering of rows).

Each expert projection's backward copies its dY and X (and the experts' row ends) into segment
`slot` of buffers [micro-batches, rows, features] made when the merger is attached, with a
custom op that declares the mutation (kernels/grouped_wgrad.stash_segment_): the copy needs no
host sync and no Python state, so the experts' backward stays inside torch.compile's graph and
its CUDA graph (the buffers have static addresses; `slot` is a device tensor the step sets
before each micro-batch). The copy is also what CUDA graphs need: the next micro-batch's replay
overwrites the memory the operands came in. The price is memory: the proxy preset, ~0.4 GB per
MoE layer and micro-batch. `rows` is fixed: every token goes to top-k experts, so a micro-batch
of T tokens has T * top_k rows without expert parallelism (with it, the rows a rank receives
vary: not supported).

  merger = ExpertGradMerger(micro_batches=8, rows=4096 * 6)
  merger.attach(model)                       # every RoutedExperts of the model
  for each micro-batch: merger.begin_micro_batch(); loss.backward()   # dX as usual
  merger.flush()                             # dW of all of them, into main_grad / .grad

`stores_first(weight)` (MasterWeights.claims_sum): whether the weight's fp32 sum holds nothing
of this step yet, so that the flush stores the gradient instead of adding it to a zeroed sum.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from ..kernels.grouped_wgrad import grouped_wgrad_segments
from ..weight_grad import accumulate_weight_grad
from .experts import RoutedExperts


class Segments:
    """One expert weight's buffers: dY [S, N, O], X [S, N, I], the experts' end rows [S, E]
    (int32), and the merger's `slot` (shared by every weight)."""

    def __init__(self, weight: torch.Tensor, micro_batches: int, rows: int,
                 slot: torch.Tensor, dtype: torch.dtype) -> None:
        experts, out_features, in_features = weight.shape
        make = dict(device=weight.device, dtype=dtype)
        self.weight = weight
        self.grad_y = torch.zeros(micro_batches, rows, out_features, **make)
        self.x = torch.zeros(micro_batches, rows, in_features, **make)
        self.ends = torch.zeros(micro_batches, experts, device=weight.device, dtype=torch.int32)
        self.slot = slot
        for buffer in (self.grad_y, self.x, self.ends):  # CUDA graphs may keep their address
            torch._dynamo.mark_static_address(buffer)


class ExpertGradMerger:
    """Segment buffers for every routed-expert weight of the modules it is attached to, for
    `micro_batches` micro-batches of `rows` expert rows each, in `dtype` (the GEMMs' operands:
    bf16 on a GPU)."""

    def __init__(self, micro_batches: int, rows: int, *, dtype: torch.dtype = torch.bfloat16,
                 stores_first: Optional[Callable[[torch.Tensor], bool]] = None) -> None:
        if micro_batches < 1 or rows < 1:
            raise ValueError(f"ExpertGradMerger(micro_batches={micro_batches}, rows={rows}) is "
                             "invalid: a step has at least one micro-batch of at least one row")
        self.micro_batches, self.rows, self.dtype = micro_batches, rows, dtype
        self.stores_first = stores_first
        self.segments: list[Segments] = []
        self.slot: Optional[torch.Tensor] = None
        self.count = 0  # micro-batches begun since the last flush

    def attach(self, module: torch.nn.Module) -> int:
        """Buffers for, and a pointer to this merger in, every RoutedExperts under `module`;
        returns how many."""
        experts = [m for m in module.modules() if isinstance(m, RoutedExperts)]
        for m in experts:
            if self.slot is None:
                self.slot = torch.zeros(1, dtype=torch.int64, device=m.fc1.device)
                torch._dynamo.mark_static_address(self.slot)
            m.fc1_segments, m.fc2_segments = (
                Segments(w, self.micro_batches, self.rows, self.slot, self.dtype)
                for w in (m.fc1, m.fc2))
            self.segments += [m.fc1_segments, m.fc2_segments]
            m.weight_grad_merger = self
        return len(experts)

    def begin_micro_batch(self) -> None:
        """Before a micro-batch's forward: its backward stashes into the next segment."""
        if self.count == self.micro_batches:
            raise RuntimeError(f"ExpertGradMerger holds {self.micro_batches} micro-batches and "
                               "was not flushed: call flush() after each step's last backward, "
                               "or make it with more micro_batches")
        self.slot.fill_(self.count)
        self.count += 1

    @torch.no_grad()
    def flush(self) -> None:
        """Each weight's gradient over the step's micro-batches, written once into its fp32
        `main_grad` (stored when `stores_first` says its sum is not yet this step's, else
        added), or added to its `.grad`."""
        held, self.count = self.count, 0
        if not held:
            return
        for seg in self.segments:
            operands = (seg.grad_y[:held], seg.x[:held], seg.ends[:held])
            weight = seg.weight
            main_grad = getattr(weight, "main_grad", None)
            if main_grad is not None and main_grad.dtype == torch.float32:
                store = self.stores_first is not None and self.stores_first(weight)
                grouped_wgrad_segments(*operands, main_grad, accumulate=not store)
            else:
                grad_EOI = torch.empty(weight.shape, dtype=torch.float32, device=weight.device)
                grouped_wgrad_segments(*operands, grad_EOI, accumulate=False)
                accumulate_weight_grad(weight, grad_EOI.to(weight.dtype))
