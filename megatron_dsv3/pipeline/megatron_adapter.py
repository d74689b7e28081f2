"""DualPipe / DualPipeV behind Megatron-Core's `forward_backward_func` interface.

  PipelineConfig(schedule, pipeline_parallel_size)   "1f1b" | "dualpipe" | "dualpipev", checked
        at construction; `.check(num_microbatches, num_layers)` for a step's settings
  get_dualpipe_forward_backward_func(schedule_name, group=...)
        a callable with the keyword signature and return value of the function Megatron's
        `get_forward_backward_func()` returns, running the named bidirectional schedule
  get_forward_backward_func(pipeline_config, group=...)   selection by config: Megatron's own
        function for "1f1b", ours for the other two
  forward_step(data_iterator, model, *, mtp_lambda)   the `forward_step_func` for
        DeepSeekV3Stage chunks (bind the MTP weight: functools.partial(forward_step,
        mtp_lambda=...))

How Megatron's contract maps onto the two-chunk schedules:
  * `model` is the rank's two stage modules [chunk 0, chunk 1] (stages.stages_from_model),
    as for Megatron's interleaved schedule; `data_iterator` is a list of two iterators, one per
    chunk, each yielding the micro-batches in the order that chunk runs them (DualPipeV: 0..M-1
    for both chunks; DualPipe: 0..M/2-1 for chunk 0, M/2..M-1 for chunk 1:
    the schedule class's `microbatches_of_chunk`). Only chunks holding stage 0 or the last stage read
    theirs; the others may be None.
  * Each forward of chunk c calls `forward_step_func(data_iterator[c], model[c])` after
    `model[c].set_input_tensor(received hidden states)` (stages after the first), exactly as
    Megatron's schedules do; on the last stage the returned `loss_func(output)` gives
    (loss, loss_dict) or (loss, num_tokens, loss_dict), normalised as Megatron does (divided by
    num_microbatches, or by num_tokens and num_microbatches unless calculate_per_token_loss),
    and scaled by `config.grad_scale_func` for the backward when one is set.
  * Returns the loss dicts of the micro-batches whose loss this rank computed, in micro-batch
    order: DualPipeV: all M on pipeline rank 0 (which holds the last stage), [] elsewhere;
    DualPipe: micro-batches 0..M/2-1 on rank PP-1, M/2..M-1 on rank 0 (with PP=2 both ranks are
    ends), [] on the middle ranks. Megatron's 1F1B returns them on rank PP-1.
  * After a training step DualPipe's mirrored copies hold the full gradient
    (`DualPipe.reduce_mirrored_grads`); then `config.finalize_model_grads_func`, if set,
    runs as in Megatron. The routers' balance-loss gradient scale is set to 1 /
    num_microbatches (times the grad scale; `moe.balance.set_balance_loss_scale`), as Megatron
    sets its MoEAuxLossAutoScaler's.
  * Not supported (a clear error): collect_non_loss_data, adjust_tensor_shapes_fn, a
    p2p_communicator, decoder_seq_length, force_all_reduce, variable sequence lengths. Megatron DDP's
    no_sync/grad-sync hooks are not driven: gradients are complete after the call and the
    caller reduces them over data parallelism.
  * The chunks' F&B overlap (DeepSeekV3Stage with overlap_moe) works through the wrapper that
    runs forward_step_func: the wrapper shows the schedule its chunk's layer stack.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.nn as nn

from ..moe.balance import set_balance_loss_scale
from ..weight_grad import WeightGradStore
from .comm import TensorSpec
from .schedules import SCHEDULES, schedule_class
from .stages import DeepSeekV3Stage, StagePlan
from .trace import Tracer

MEGATRON_SCHEDULE = "1f1b"  # Megatron's own forward_backward_func (no pipelining at PP=1)


@dataclass(frozen=True)
class PipelineConfig:
    """Which pipeline schedule runs a step, on how many pipeline ranks."""
    schedule: str = MEGATRON_SCHEDULE
    pipeline_parallel_size: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "schedule", self.schedule.lower())
        pp = self.pipeline_parallel_size
        names = [MEGATRON_SCHEDULE, *sorted(SCHEDULES)]
        if self.schedule not in names:
            raise ValueError(f"PipelineConfig.schedule={self.schedule!r} is invalid: use one of "
                             f"{names}")
        if not isinstance(pp, int) or pp < 1:
            raise ValueError(f"PipelineConfig.pipeline_parallel_size={pp!r} is invalid: it must "
                             "be a positive integer")
        if self.schedule != MEGATRON_SCHEDULE:
            try:
                schedule_class(self.schedule).validate(pp)
            except ValueError as err:
                raise ValueError(f"PipelineConfig.pipeline_parallel_size={pp} is invalid for "
                                 f"schedule={self.schedule!r}: {err}") from None

    @property
    def num_stages(self) -> int:
        """Model stages: the schedule's rule (DualPipeV 2 PP, DualPipe PP), PP for 1F1B."""
        if self.schedule == MEGATRON_SCHEDULE:
            return self.pipeline_parallel_size
        return schedule_class(self.schedule).num_stages(self.pipeline_parallel_size)

    def check(self, num_microbatches: Optional[int] = None,
              num_layers: Optional[int] = None) -> None:
        """Raise ValueError naming the setting and the fix for an impossible step."""
        if self.schedule == MEGATRON_SCHEDULE:
            return
        if num_microbatches is not None:
            schedule_class(self.schedule).validate(self.pipeline_parallel_size, num_microbatches)
        if num_layers is not None:
            StagePlan(self.schedule, self.pipeline_parallel_size, num_layers)


class _ForwardStepChunk(nn.Module):
    """A stage as the schedule sees it: its forward runs Megatron's forward_step_func; its
    layer stack is the chunk's (the F&B step interleaves through it)."""

    def __init__(self, chunk: nn.Module) -> None:
        super().__init__()
        self.chunk = chunk  # what forward_step_func gets: the stage, or Megatron's wrapping of it
        self.stage = unwrapped_stage(chunk)
        self.stage_index = self.stage.stage_index
        self.forward_step_func: Optional[Callable] = None
        self.data_iterator: Optional[Iterator] = None
        self.loss_funcs: list[Callable] = []

    def forward(self, *inputs: torch.Tensor):
        if inputs:
            self.stage.set_input_tensor(inputs[0])
        output, loss_func = self.forward_step_func(self.data_iterator, self.chunk)
        if loss_func is not None:
            self.loss_funcs.append(loss_func)
        return output

    @property
    def piecewise_layers(self):
        """The chunk's layer stack, through which the schedule's F&B steps interleave."""
        return getattr(self.stage, "piecewise_layers", None)


def find_stage(chunk: nn.Module) -> Optional[DeepSeekV3Stage]:
    """The stage module inside Megatron's wrappers of a model chunk (DDP, Float16Module: each
    holds the next as `.module`); None if the chunk is no stage."""
    inner = chunk
    while not isinstance(inner, DeepSeekV3Stage) and isinstance(getattr(inner, "module", None),
                                                                nn.Module):
        inner = inner.module
    return inner if isinstance(inner, DeepSeekV3Stage) else None


def unwrapped_stage(chunk: nn.Module) -> DeepSeekV3Stage:
    stage = find_stage(chunk)
    if stage is None:
        raise ValueError(f"{type(chunk).__name__} is no pipeline stage: the bidirectional "
                         "schedules run the modules of stages.stages_from_model (wrapped or not)")
    return stage


class DualPipeForwardBackward:
    """`forward_backward_func` running DualPipe or DualPipeV (see the module docstring)."""

    def __init__(self, schedule_name: str, *, group=None,
                 weight_grad_store: Optional[WeightGradStore] = None,
                 tracer: Optional[Tracer] = None) -> None:
        self.schedule_name = schedule_name.lower()
        if self.schedule_name not in SCHEDULES:
            raise ValueError(f"schedule_name={schedule_name!r} is invalid for the bidirectional "
                             f"adapter: use one of {sorted(SCHEDULES)} (or "
                             f"'{MEGATRON_SCHEDULE}' through get_forward_backward_func)")
        self.group = group
        self.weight_grad_store = weight_grad_store
        self.tracer = tracer  # records each step's ops when set (trace.py)
        self.pipe = None
        self._key = None
        self._wrappers: tuple[_ForwardStepChunk, ...] = ()

    def _schedule(self, model: Sequence[nn.Module], specs: list[TensorSpec], group):
        key = (tuple(id(m) for m in model), tuple(specs), id(group))
        if key != self._key:
            self._wrappers = tuple(_ForwardStepChunk(m) for m in model)
            self.pipe = schedule_class(self.schedule_name)(
                self._wrappers, p2p_specs=specs, group=group,
                weight_grad_store=self.weight_grad_store)
            self._key = key
        return self.pipe

    def __call__(self, *, forward_step_func, data_iterator, model, num_microbatches: int,
                 seq_length: int, micro_batch_size: int, decoder_seq_length=None,
                 forward_only: bool = False, collect_non_loss_data: bool = False,
                 first_val_step=None, adjust_tensor_shapes_fn=None, p2p_communicator=None,
                 pg_collection=None, force_all_reduce: bool = False) -> list:
        name = self.schedule_name
        for arg, value in (("collect_non_loss_data", collect_non_loss_data),
                           ("force_all_reduce", force_all_reduce),
                           ("adjust_tensor_shapes_fn", adjust_tensor_shapes_fn),
                           ("p2p_communicator", p2p_communicator),
                           ("decoder_seq_length", decoder_seq_length)):
            if value:
                raise ValueError(f"{name} forward_backward_func: {arg}={value!r} is not "
                                 "supported; leave it at its default")
        if not isinstance(model, (list, tuple)) or len(model) != 2:
            raise ValueError(f"{name} forward_backward_func: model must be the rank's two stage "
                             "modules [chunk 0, chunk 1] (stages.stages_from_model), got "
                             f"{type(model).__name__}")
        if data_iterator is None:
            data_iterator = [None, None]  # a middle rank: neither chunk reads data
        if not isinstance(data_iterator, (list, tuple)) or len(data_iterator) != 2:
            raise ValueError(f"{name} forward_backward_func: data_iterator must be a list of two "
                             "iterators, one per chunk, each yielding that chunk's micro-batches "
                             "in its order (the schedule's microbatches_of_chunk)")
        config = model[0].config
        if getattr(config, "variable_seq_lengths", False):
            raise ValueError(f"{name} forward_backward_func: config.variable_seq_lengths=True is "
                             "not supported: every micro-batch must have seq_length tokens")
        group = self.group
        if group is None and pg_collection is not None:
            group = pg_collection.pp
        if group is None:
            raise ValueError(f"{name} forward_backward_func: no pipeline group; pass group= to "
                             "get_dualpipe_forward_backward_func or pg_collection with .pp")
        specs = [TensorSpec((seq_length, micro_batch_size, config.hidden_size),
                            config.params_dtype)]
        pipe = self._schedule(model, specs, group)
        grad_scale = 1.0
        if config.grad_scale_func is not None:
            grad_scale = float(config.grad_scale_func(torch.ones(())))
        for chunk in model:
            set_balance_loss_scale(chunk, grad_scale / num_microbatches)
        store: list = []
        for wrapper, iterator in zip(self._wrappers, data_iterator):
            wrapper.forward_step_func, wrapper.data_iterator = forward_step_func, iterator
            wrapper.loss_funcs = []
        holds_first = any(w.stage.is_first for w in self._wrappers)
        last = [w for w in self._wrappers if w.stage.is_last]
        # forward_step_func reads the data itself: the schedule's inputs/labels are empty
        empty = [()] * num_microbatches

        def loss_fn(outputs: tuple, _labels: tuple) -> torch.Tensor:
            loss_func = last[0].loss_funcs.pop(0)
            return _megatron_loss(loss_func, outputs[0], config, num_microbatches, store)

        with torch.no_grad() if forward_only else torch.enable_grad():
            pipe.step(num_microbatches, inputs=empty if holds_first else None,
                      labels=empty if last else None, loss_fn=loss_fn if last else None,
                      tracer=self.tracer)
        if not forward_only:
            pipe.reduce_mirrored_grads()  # DualPipe's two copies of a stage; else nothing
            if getattr(config, "finalize_model_grads_func", None) is not None:
                config.finalize_model_grads_func(list(model), None, pg_collection=pg_collection)
        return store


def _megatron_loss(loss_func: Callable, output, config, num_microbatches: int,
                   store: list) -> torch.Tensor:
    """Megatron's forward_step_calc_loss normalisation, then the grad scale of backward_step."""
    outputs = loss_func(output)
    if len(outputs) == 3:
        loss, num_tokens, reduced = outputs
        if not config.calculate_per_token_loss:
            loss = loss / torch.clamp(num_tokens, min=1) / num_microbatches
    elif len(outputs) == 2:
        loss, reduced = outputs
        loss = loss / num_microbatches
    else:
        raise ValueError(f"loss_func returned {len(outputs)} values; Megatron's contract is "
                         "(loss, loss_dict) or (loss, num_tokens, loss_dict)")
    store.append(reduced)
    if config.grad_scale_func is not None and torch.is_grad_enabled():
        loss = config.grad_scale_func(loss)
    return loss


def get_dualpipe_forward_backward_func(schedule_name: str, *, group=None,
                                       weight_grad_store: Optional[WeightGradStore] = None,
                                       tracer: Optional[Tracer] = None
                                       ) -> DualPipeForwardBackward:
    """A callable with the signature and return value of Megatron's forward_backward_func
    running `schedule_name` ("dualpipe" or "dualpipev") over the pipeline `group` (default:
    the call's `pg_collection.pp`). It builds its schedule on the first call and reuses it
    while `model` and the message shape stay the same."""
    return DualPipeForwardBackward(schedule_name, group=group,
                                   weight_grad_store=weight_grad_store, tracer=tracer)


def get_forward_backward_func(pipeline: PipelineConfig, *, group=None) -> Callable:
    """The forward_backward_func `pipeline.schedule` names: Megatron's own for "1f1b" (its
    no-pipelining function at PP=1; its 1F1B on Megatron-built stages otherwise), ours for
    "dualpipe" / "dualpipev"."""
    if pipeline.schedule == MEGATRON_SCHEDULE:
        from megatron.core.pipeline_parallel import get_forward_backward_func as megatron_func

        return megatron_func(pp_size=pipeline.pipeline_parallel_size)
    return get_dualpipe_forward_backward_func(pipeline.schedule, group=group)


def forward_step(data_iterator: Optional[Iterator], model: nn.Module, *, mtp_lambda: float):
    """Megatron `forward_step_func` for a DeepSeekV3Stage chunk, with the MTP loss weight bound
    by the caller (`functools.partial(forward_step, mtp_lambda=cfg.mtp.loss_weight(tokens))`):
    the micro-batch (input_ids, labels) comes from the chunk's iterator on stage 0 and the
    last stage; the last stage returns a loss_func giving (loss, {"lm loss", "mtp loss",
    "mtp ce"}), "mtp ce" each depth's unweighted CE [D]."""
    needs_batch = model.is_first or model.is_last
    batch = next(data_iterator) if needs_batch else None
    output = model(batch[0] if model.is_first else None)
    if not model.is_last:
        return output, None
    return output, partial(_stage_loss_func, model, batch, mtp_lambda)


def _stage_loss_func(stage, batch, mtp_lambda: float, output):
    loss, lm, mtp, mtp_ce = stage.unscaled_loss((output,), batch, mtp_lambda)
    return loss, {"lm loss": lm.detach(), "mtp loss": mtp.detach(), "mtp ce": mtp_ce}
