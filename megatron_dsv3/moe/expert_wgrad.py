"""The routed experts' weight gradients of several micro-batches in one grouped GEMM.

With 64 small experts and 4,096-token micro-batches an expert sees ~400 rows per micro-batch,
so each micro-batch's weight-gradient GEMM dW_e = dY_e^T X_e is short on rows and its result
then goes through a pass over every expert weight to be summed into the step's gradient. Both
are memory-bound. Collected over the micro-batches of an optimizer step instead, the same sum

    dW_e = sum_m dY_{m,e}^T X_{m,e} = [dY_{1,e}; ...; dY_{M,e}]^T [X_{1,e}; ...; X_{M,e}]

is one GEMM per expert with M times the rows (its K dimension), accumulated in fp32 inside the
GEMM, and one addition into the gradient per step instead of one per micro-batch. The price is
memory: each micro-batch's X and dY of every expert projection are kept until the flush (the
proxy preset: ~0.4 GB per MoE layer and micro-batch).

  merger = ExpertGradMerger()
  attach_expert_grad_merger(model, merger)   # every RoutedExperts of the model
  for each micro-batch: loss.backward()       # dX as usual; (dY, X) of each projection kept
  merger.flush()                              # dW of all of them, added to main_grad / .grad

The rows of micro-batch m are sorted by expert; the flush interleaves them expert-major,
(e, m) in order, with one stable sort of row keys on the device (no host sync), then runs
`torch._grouped_mm` once per projection (`grouped_mm`), or one matmul per expert (`loop`,
the CPU reference).
"""

from __future__ import annotations

import torch

from ..weight_grad import accumulate_weight_grad
from .experts import Groups, RoutedExperts, row_bounds


class ExpertGradMerger:
    """Per expert weight, the (dY, X, groups, impl) of each micro-batch since the last flush.

    `copy_operands`: keep copies, for operands that live in memory a later replay overwrites:
    under CUDA graphs (torch.compile's "reduce-overhead") the experts' input comes out of the
    compiled router's graph and the gradient of their output out of the compiled combine's
    backward graph, and the next micro-batch replays both."""

    def __init__(self, copy_operands: bool = False) -> None:
        self._pending: dict[int, tuple[torch.Tensor, list]] = {}
        self.copy_operands = copy_operands

    def add(self, weight: torch.Tensor, grad_y_NO: torch.Tensor, x_NI: torch.Tensor,
            groups: Groups, impl: str) -> None:
        """Keep one micro-batch's operands of `weight`'s gradient (called by the experts'
        autograd backward instead of computing it)."""
        if self.copy_operands:
            grad_y_NO, x_NI = grad_y_NO.clone(), x_NI.clone()
        self._pending.setdefault(id(weight), (weight, []))[1].append(
            (grad_y_NO, x_NI, groups, impl))

    def __len__(self) -> int:
        """Expert weights with kept operands."""
        return len(self._pending)

    @torch.no_grad()
    def flush(self) -> None:
        """Each kept weight's gradient over its micro-batches, added once into its `main_grad`
        (or `.grad`); the operands are released."""
        pending, self._pending = self._pending, {}
        for weight, items in pending.values():
            impl = items[0][3]
            grad_EOI = (_merged_grouped_mm(items) if impl == "grouped_mm"
                        else _merged_loop(items))
            accumulate_weight_grad(weight, grad_EOI.to(weight.dtype))


def _merged_loop(items: list) -> torch.Tensor:
    """Reference: per expert, its rows of every micro-batch stacked, one matmul."""
    bounds = [row_bounds(counts) for _, _, counts, _ in items]
    grads = []
    for e in range(len(bounds[0])):
        dy = torch.cat([item[0][rows[e][0]:rows[e][1]] for item, rows in zip(items, bounds)])
        x = torch.cat([item[1][rows[e][0]:rows[e][1]] for item, rows in zip(items, bounds)])
        grads.append(dy.t() @ x)
    return torch.stack(grads)


def _merged_grouped_mm(items: list) -> torch.Tensor:
    """All micro-batches' rows reordered expert-major, then one grouped GEMM (no host sync)."""
    if len(items) == 1:
        dy_NO, x_NI, offsets_E, _ = items[0]
        return torch._grouped_mm(dy_NO.t(), x_NI, offs=offsets_E)
    num_micro = len(items)
    counts_ME = torch.stack([torch.diff(offsets_E.long(), prepend=offsets_E.new_zeros(1).long())
                             for _, _, offsets_E, _ in items])
    num_experts = counts_ME.shape[1]
    expert_ids = torch.arange(num_experts, device=counts_ME.device)
    # each row's key (its expert, then its micro-batch); a stable sort keeps the rows of one
    # expert and micro-batch in their order
    keys = torch.cat([torch.repeat_interleave(expert_ids * num_micro + m, counts_ME[m],
                                              output_size=item[0].shape[0])
                      for m, item in enumerate(items)])
    order = torch.sort(keys, stable=True).indices
    dy_RO = torch.cat([item[0] for item in items]).index_select(0, order)
    x_RI = torch.cat([item[1] for item in items]).index_select(0, order)
    offsets = counts_ME.sum(0).cumsum(0).to(torch.int32)
    return torch._grouped_mm(dy_RO.t(), x_RI, offs=offsets)


def attach_expert_grad_merger(module: torch.nn.Module, merger) -> int:
    """Point every routed-experts module under `module` at `merger` (None detaches); returns
    how many."""
    experts = [m for m in module.modules() if isinstance(m, RoutedExperts)]
    for m in experts:
        m.weight_grad_merger = merger
    return len(experts)
