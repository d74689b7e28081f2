"""Bidirectional pipeline schedules (DualPipe, DualPipeV) with zero-bubble weight-gradient
deferral and the expert-parallel F&B overlap, on any stage modules (docs/pipeline.md).

  comm            P2PComm (lazy batched isend/irecv), TensorSpec
  work            ForwardWork / BackwardWork: one chunk's forward or backward as data
  fb_overlap      the F&B step: two micro-batches' MoE pieces interleaved (PiecewiseLayers)
  executor        the per-rank machinery the schedules share (ChunkExecutor, StepResult)
  trace           Tracer: the ops a step ran, when
  bidirectional   BidirectionalSchedule: the eight steps, and the rules each schedule owns
  dualpipe, dualpipev   the schedules (one `step()` each)
  schedules       SCHEDULES, schedule_class(name): the schedules by the name a config uses
  stages          DeepSeek-V3 cut into stages (StagePlan, DeepSeekV3Stage, stages_from_model)
  megatron_adapter  PipelineConfig, get_forward_backward_func: Megatron's interface

Plugging a model in (the contract `stages` follows for DeepSeek-V3):
  * Cut the model into stages (`num_stages(PP)` of the schedule class), each an nn.Module
    `stage(*inputs) -> hidden` with `stage_index` set. Stage 0 embeds; the last stage's outputs
    go to `loss_fn(outputs, labels[m])`, which may be a bound method of the last stage (final
    norm, output head, MTP, cross-entropy), so those parameters belong to that stage.
    Whatever the loss needs (labels, loss mask, MTP tokens) travels in labels[m]; the last
    stage sits on rank 0 (DualPipeV) or on both end ranks (DualPipe).
  * Messages between stages are fixed tensors (`TensorSpec`, e.g. [seq, micro_batch, hidden]
    bf16); their gradients have the same specs.
  * Layers whose weight gradient should move into W use `weight_grad.linear_deferred_wgrad`
    and expose `weight_grad_store`; the schedule attaches its store.
  * A stage that runs its decoder layers through `fb_overlap.PiecewiseLayers` (as
    `self.piecewise_layers`) gets the F&B overlap; without one, F&B runs F then B.
  * DualPipe keeps two copies of every stage: `sync_mirrored_parameters()` after loading
    weights, `reduce_mirrored_grads()` after each step and before data-parallel reduction;
    count each stage once in the gradient norm and save only the chunk-0 copies.
"""

from .comm import P2PComm, TensorSpec
from .dualpipe import DualPipe
from .dualpipev import DualPipeV
from .executor import StepResult
from .schedules import SCHEDULES, schedule_class
from .trace import ScheduledOp, Tracer

__all__ = ["SCHEDULES", "DualPipe", "DualPipeV", "P2PComm", "ScheduledOp", "StepResult",
           "TensorSpec", "Tracer", "schedule_class"]
