"""The overlapped forward-and-backward (F&B) contract between a schedule and its stage modules.

In the steady state of DualPipe/DualPipeV a rank runs the forward chunk of one micro-batch and
the backward chunk of another as one step, so that the all-to-all of one (MoE dispatch and
combine) runs while the other computes. The schedule describes the two halves as data
(`ForwardWork`, `BackwardWork`) and calls

    outputs, loss = fwd.module.overlapped_forward_backward(fwd, bwd)

when the forward module's class defines that method (static, class or plain: it is looked up
on `fwd.module`, the backward module is `bwd.module`) and the backward module is an instance
of the same class; otherwise it runs `run_forward(fwd)` then `run_backward(bwd)`. A hook must:
  1. return exactly what `run_forward(fwd)` returns (outputs as a tuple, the loss when
     `fwd.loss_fn` is set, else None), and leave the same gradients as `run_backward(bwd)`:
     gradients of `bwd.module`'s parameters and `.grad` on the tensors `bwd` was fed with
     (the schedule reads the input gradients from there). Results must not depend on whether
     the hook exists: the CPU tests compare both against a single-process run.
  2. compute weight gradients together with input gradients: the schedule runs F&B with the
     weight-gradient store not deferring (the paper's F&B has no separate W).
  3. use no pipeline p2p communication (the schedule posts that around the call); it may use
     its own groups (expert parallel) and a `comm.CommStream`.

How our MoE stage implements it (`moe_overlap.py`, adopted by `model_stages.DeepSeekV3Stage`):
the stage runs its layers one by one; each layer's forward is four parts, attention ->
dispatch (all-to-all) -> experts (MLP) -> combine (all-to-all), and each part's output
is detached and re-attached (`requires_grad_`) so
the backward can also be run part by part (`torch.autograd.backward(part_output, grad)`).
Forward layer i of micro-batch A and backward layer L-1-i of micro-batch B then alternate,
e.g. A.attn | B.combine_bwd(comm), A.dispatch(comm) | B.mlp_bwd, A.mlp | B.dispatch_bwd(comm),
A.combine(comm) | B.attn_bwd, each communication part on the comm stream beside the other
micro-batch's compute part.
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


def find_overlap_hook(fwd_module: nn.Module, bwd_module: nn.Module) -> Optional[Callable]:
    """`fwd_module.overlapped_forward_backward` if both modules share a class that has one."""
    if type(bwd_module) is not type(fwd_module):
        return None
    if getattr(type(fwd_module), "overlapped_forward_backward", None) is None:
        return None
    return fwd_module.overlapped_forward_backward
