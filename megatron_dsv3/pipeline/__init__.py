"""Bidirectional pipeline schedules (DualPipe, DualPipeV) with zero-bubble weight-gradient
deferral, on any stage modules; see DESIGN.md section 5.

  dualpipev.DualPipeV, dualpipe.DualPipe   the schedules (one `step()` each)
  weight_grad     WeightGradStore, DeferredWgradLinear: backward split into B and W
  overlap         the F&B contract (`overlapped_forward_backward`) for stage modules
  comm            P2PComm (lazy batched isend/irecv), TensorSpec, CommStream
  trace           Tracer, bubble fraction, timeline picture, the paper's bubble formulas
  executor        the per-rank machinery the schedules share (ChunkExecutor, StepResult)
  stages          stage-module checks, equal layer split
  schedule_class(name)   the schedule a config names: 'dualpipe' | 'dualpipev'
  model_stages    DeepSeek-V3 cut into stages (StagePlan, DeepSeekV3Stage, build_rank_stages)
  moe_overlap     MoE layers as attention / dispatch / MLP / combine pieces; the F&B hook
  megatron_adapter  PipelineConfig, get_forward_backward_func: Megatron's interface

Plugging a model in (the contract `model_stages` follows for DeepSeek-V3):
  * Cut the model into stages (DualPipeV: 2*PP, DualPipe: PP; `split_layers`), each an
    nn.Module `stage(*inputs) -> hidden` with `stage_index` set. Stage 0 embeds; the last
    stage's outputs go to `loss_fn(outputs, labels[m])`, which may be a bound method of the
    last stage (final norm, output head, MTP, cross-entropy), so those parameters belong to
    that stage. Whatever the loss needs (labels, loss mask, MTP tokens) travels in labels[m];
    the last stage sits on rank 0 (DualPipeV) or on both end ranks (DualPipe).
  * Messages between stages are fixed tensors (`TensorSpec`, e.g. [seq, micro_batch, hidden]
    bf16); their gradients have the same specs.
  * Linear layers that should move their weight gradient into W use `linear_deferred_wgrad`
    / `DeferredWgradLinear` and expose `weight_grad_store`; the schedule attaches its store.
  * A stage class that can interleave two micro-batches implements
    `overlapped_forward_backward(fwd, bwd)` (overlap.py); without it F&B runs F then B.
  * DualPipe keeps two copies of every stage: `sync_mirrored_parameters()` after loading
    weights, `reduce_mirrored_grads()` after each step and before data-parallel reduction;
    count each stage once in the gradient norm and save only the chunk-0 copies.
"""

from .comm import CommStream, P2PComm, TensorSpec
from .dualpipe import DualPipe, validate_dualpipe
from .dualpipev import DualPipeV, validate_dualpipev
from .executor import StepResult
from .overlap import BackwardWork, ForwardWork, run_backward, run_forward
from .stages import split_layers
from .trace import (ChunkTimes, ScheduledOp, Tracer, draw_timeline, paper_bubble,
                    write_trace_files)
from .weight_grad import (DeferredWgradLinear, WeightGradStore, attach_weight_grad_store,
                          linear_deferred_wgrad)

SCHEDULES = {"dualpipe": DualPipe, "dualpipev": DualPipeV}


def schedule_class(name: str) -> type:
    """The schedule a config names ("dualpipe" or "dualpipev", any case)."""
    try:
        return SCHEDULES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown pipeline schedule {name!r}; use one of "
                         f"{sorted(SCHEDULES)}") from None


__all__ = ["SCHEDULES", "BackwardWork", "ChunkTimes", "CommStream", "DeferredWgradLinear",
           "DualPipe", "DualPipeV", "ForwardWork", "P2PComm", "ScheduledOp", "StepResult",
           "TensorSpec", "Tracer", "WeightGradStore", "attach_weight_grad_store",
           "draw_timeline", "linear_deferred_wgrad", "paper_bubble", "run_backward",
           "run_forward", "schedule_class", "split_layers", "validate_dualpipe",
           "validate_dualpipev", "write_trace_files"]
