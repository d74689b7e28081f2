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
