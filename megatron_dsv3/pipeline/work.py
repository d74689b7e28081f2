"""One chunk's forward and backward as data: what the executor runs, alone or as one F&B step.

  ForwardWork    `outputs = module(*inputs)`, then, on the last stage, `loss_fn(outputs, labels)`
  BackwardWork   the backward from the loss (last stage) or from outputs with their gradients
  run_forward / run_backward   run one of them

An F&B step hands a ForwardWork of one micro-batch and a BackwardWork of another to
`fb_overlap.forward_backward`, which interleaves them when both stage modules run their
layers through a `PiecewiseLayers`, and runs them one after the other otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn as nn

Tensors = tuple[torch.Tensor, ...]
LossFn = Callable[[Tensors, tuple], torch.Tensor]


@dataclass
class ForwardWork:
    """A forward chunk: `outputs = module(*inputs)`, then, on the last stage only,
    `loss = loss_fn(outputs, labels)`."""
    module: nn.Module
    inputs: tuple[Any, ...]
    loss_fn: Optional[LossFn]   # set only on the last stage of the pipeline
    labels: tuple[Any, ...]     # the micro-batch's labels on the last stage, else ()
    chunk: int                  # local chunk index (0 or 1) and global micro-batch id,
    microbatch: int             # for logging/tracing inside a hook


@dataclass
class BackwardWork:
    """A backward chunk: from `loss` on the last stage, else from `outputs` with `output_grads`."""
    module: nn.Module
    loss: Optional[torch.Tensor]
    outputs: Tensors
    output_grads: Tensors
    chunk: int
    microbatch: int


def as_tensors(value: Any) -> tuple:
    """A stage's return value (or a micro-batch's inputs/labels) as a tuple."""
    if isinstance(value, tuple):
        return value
    if isinstance(value, list):
        return tuple(value)
    return (value,)


def run_forward(work: ForwardWork) -> tuple[Tensors, Optional[torch.Tensor]]:
    outputs = as_tensors(work.module(*work.inputs))
    loss = work.loss_fn(outputs, work.labels) if work.loss_fn is not None else None
    if loss is not None and loss.dim() != 0:
        raise ValueError(f"loss_fn returned shape {tuple(loss.shape)}; it must return a scalar "
                         "(the micro-batch's loss, already scaled as the step should sum it)")
    return outputs, loss


def run_backward(work: BackwardWork) -> None:
    if work.loss is not None:
        work.loss.backward()
        return
    pairs = [(o, g) for o, g in zip(work.outputs, work.output_grads) if o.requires_grad]
    if pairs:
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
