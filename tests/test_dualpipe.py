"""DualPipe and DualPipeV on toy stages: parity with a single-process run, executed order,
bad settings, the B/W split, the bubble helpers.

Tolerances: the pipelined runs execute, per micro-batch and per stage, the same fp32 ops on
the same data as the single-process run, and each parameter accumulates its micro-batches'
weight gradients in the same order (W steps of a chunk run in its backward order), so losses,
outputs and gradients are compared bit for bit. The one exception is DualPipe against a run
that sums all micro-batches in one sequence: DualPipe sums each direction's half on its own
copy and adds the two halves (`reduce_mirrored_grads`), a different association of the same
fp32 sum, so that comparison uses FP32_REORDER, and the exact comparison is against the same
single-process run summed in two halves.
"""

from __future__ import annotations

import datetime
import json
import os
from collections import deque

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers.deferred_linear import DeferredWgradLinear
from helpers.schedule_oracle import expected_order
from megatron_dsv3.pipeline import DualPipe, DualPipeV, P2PComm, TensorSpec, Tracer, schedule_class
from megatron_dsv3.pipeline.fb_overlap import PAIR_BEGIN, PiecewiseLayers
from megatron_dsv3.pipeline.stages import StagePlan
from megatron_dsv3.pipeline.trace import ScheduledOp, TraceEvent, bubble_fraction
from megatron_dsv3.profiling.timeline import (ChunkTimes, draw_timeline, idle_by_phase,
                                              measured_chunk_times, paper_bubble,
                                              write_trace_files)
from megatron_dsv3.weight_grad import WeightGradStore
from helpers.gloo import run_gloo
from helpers.tolerance import FP32_REORDER, assert_close, assert_equal

MICROBATCH_SHAPE = (2, 3, 16)  # [batch, seq, hidden] of one micro-batch, fp32
HIDDEN = MICROBATCH_SHAPE[-1]
SCHEDULES = {"DualPipeV": DualPipeV, "DualPipe": DualPipe}


# ---- toy model ----------------------------------------------------------------------------

class ToyStage(nn.Module):
    """x + W2 gelu(W1 (g * x) + b1): two deferrable linears and one parameter (g) whose
    gradient is computed during B, so both kinds of parameters are checked."""

    def __init__(self, stage_index: int, seed: int = 0) -> None:
        super().__init__()
        self.stage_index = stage_index
        generator = torch.Generator().manual_seed(1000 * seed + stage_index)
        self.gain = nn.Parameter(1 + 0.1 * torch.randn(HIDDEN, generator=generator))
        self.up = DeferredWgradLinear(HIDDEN, 2 * HIDDEN, bias=True)
        self.down = DeferredWgradLinear(2 * HIDDEN, HIDDEN, bias=False)
        with torch.no_grad():
            for param in (self.up.weight, self.up.bias, self.down.weight):
                param.copy_(0.2 * torch.randn(param.shape, generator=generator))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(F.gelu(self.up(self.gain * x)))


class _LayerCall(nn.Module):
    """A stage's block with TransformerLayer's call convention, as PiecewiseLayers calls it."""

    def __init__(self, block) -> None:
        super().__init__()
        self._block = block

    def forward(self, hidden_states: torch.Tensor, **unused):
        return self._block(hidden_states), None


class ToyStageWithOverlap(ToyStage):
    """Runs its block through a PiecewiseLayers, so the schedule's F&B steps take the overlap
    path (fb_overlap.forward_backward: B's backward stops at B's layer stack and runs inside
    A's forward); the stack's trace counts those interleavings."""

    def __init__(self, stage_index: int, seed: int = 0) -> None:
        super().__init__(stage_index, seed)
        self.trace: list = []
        self.piecewise_layers = PiecewiseLayers([_LayerCall(super().forward)], trace=self.trace)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.piecewise_layers(x)

    @property
    def overlap_calls(self) -> int:
        return self.trace.count(PAIR_BEGIN)


def loss_fn(outputs: tuple, labels: tuple) -> torch.Tensor:
    return F.mse_loss(outputs[0], labels[0])


def make_data(num_microbatches: int) -> tuple[list, list]:
    generator = torch.Generator().manual_seed(7)
    inputs = [torch.randn(MICROBATCH_SHAPE, generator=generator) for _ in range(num_microbatches)]
    labels = [torch.randn(MICROBATCH_SHAPE, generator=generator) for _ in range(num_microbatches)]
    return inputs, labels


def reference_run(num_stages: int, microbatches: range, inputs, labels):
    """Single process, whole model, micro-batches in order; gradients of the sum of losses."""
    model = nn.Sequential(*[ToyStage(s) for s in range(num_stages)])
    losses, outputs = {}, {}
    for mb in microbatches:
        out = model(inputs[mb])
        loss = loss_fn((out,), (labels[mb],))
        loss.backward()
        losses[mb], outputs[mb] = loss.detach(), out.detach()
    grads = [{n: p.grad for n, p in stage.named_parameters()} for stage in model]
    return losses, outputs, grads


# ---- multi-rank parity (gloo) -------------------------------------------------------------

def _check_step(name: str, num_ranks: int, rank: int, num_microbatches: int,
                with_overlap: bool, trace_dir: str) -> dict:
    schedule_cls = SCHEDULES[name]
    group = torch.distributed.group.WORLD
    stage_cls = ToyStageWithOverlap if with_overlap else ToyStage
    stages = schedule_cls.stages_of_rank(rank, num_ranks)
    if name == "DualPipe":
        # the mirrored copy starts from other weights: sync_mirrored_parameters must fix that
        modules = (stage_cls(stages[0]), stage_cls(stages[1], seed=99))
    else:
        modules = (stage_cls(stages[0]), stage_cls(stages[1]))
    pipe = schedule_cls(modules, p2p_specs=[TensorSpec(MICROBATCH_SHAPE)], group=group)
    if name == "DualPipe":
        pipe.sync_mirrored_parameters()
    inputs, labels = make_data(num_microbatches)
    ctx = f"{name} PP={num_ranks} M={num_microbatches} rank {rank} overlap={with_overlap}"

    tracer = Tracer()
    result = pipe.step(num_microbatches, inputs=inputs, labels=labels, loss_fn=loss_fn,
                       tracer=tracer)
    expected = expected_order(schedule_cls, rank, num_ranks, num_microbatches)
    assert tracer.executed_order() == expected, \
        f"{ctx}: executed order\n{tracer.executed_order()}\n!= expected\n{expected}"
    summary = write_trace_files(tracer, trace_dir)
    if with_overlap:
        pairs = sum(op.paired for op in expected if op.op == "F")
        calls = sum(m.overlap_calls for m in modules)
        assert calls == pairs > 0, f"{ctx}: {calls} F&B steps interleaved of {pairs}"
    if name == "DualPipe":
        pipe.reduce_mirrored_grads()

    # reference: all micro-batches in order (DualPipeV); each direction's half in order,
    # the two halves added (DualPipe), and the plain all-in-order sum within FP32_REORDER
    num_stages = 2 * num_ranks if name == "DualPipeV" else num_ranks
    if name == "DualPipeV":
        ref_losses, ref_outputs, ref_grads = reference_run(num_stages, range(num_microbatches),
                                                           inputs, labels)
    else:
        half = num_microbatches // 2
        l0, o0, g0 = reference_run(num_stages, range(half), inputs, labels)
        l1, o1, g1 = reference_run(num_stages, range(half, num_microbatches), inputs, labels)
        ref_losses, ref_outputs = {**l0, **l1}, {**o0, **o1}
        ref_grads = [{n: g0[s][n] + g1[s][n] for n in g0[s]} for s in range(num_stages)]
        _, _, plain_grads = reference_run(num_stages, range(num_microbatches), inputs, labels)
    for chunk, (module, stage) in enumerate(zip(modules, stages)):
        for pname, param in module.named_parameters():
            where = f"{ctx} stage {stage} {pname}"
            assert_equal(param.grad, ref_grads[stage][pname], where)
            if name == "DualPipe":
                assert_close(param.grad, plain_grads[stage][pname], FP32_REORDER,
                             "two halves summed apart, then added", where)
    if result.losses is not None:
        for mb, loss in zip(result.microbatches, result.losses):
            assert_equal(loss, ref_losses[mb], f"{ctx} loss of micro-batch {mb}")

    # forward only (inference): same losses and outputs, only the forwards in the same order
    with torch.no_grad():
        tracer_fwd = Tracer()
        result_fwd = pipe.step(num_microbatches, inputs=inputs, labels=labels, loss_fn=loss_fn,
                               return_outputs=True, tracer=tracer_fwd)
    assert tracer_fwd.executed_order() == expected_order(schedule_cls, rank, num_ranks,
                                                         num_microbatches, forward_only=True), ctx
    assert result_fwd.microbatches == result.microbatches, ctx
    if result_fwd.losses is not None:
        for i, mb in enumerate(result_fwd.microbatches):
            assert_equal(result_fwd.losses[i], ref_losses[mb], f"{ctx} forward-only loss {mb}")
            assert_equal(result_fwd.outputs[i][0], ref_outputs[mb], f"{ctx} output {mb}")
    return summary


def _bad_step_settings(name: str, num_ranks: int, rank: int) -> None:
    """Errors raised on every rank before any communication (so no rank hangs)."""
    schedule_cls = SCHEDULES[name]
    stages = schedule_cls.stages_of_rank(rank, num_ranks)
    pipe = schedule_cls((ToyStage(stages[0]), ToyStage(stages[1])),
                        p2p_specs=[TensorSpec(MICROBATCH_SHAPE)])
    inputs, labels = make_data(2 * num_ranks)
    with pytest.raises(ValueError, match="num_microbatches >= 2"):
        pipe.step(2 * num_ranks - 2, inputs=inputs, labels=labels, loss_fn=loss_fn)
    if rank == 0:
        with pytest.raises(ValueError, match="needs inputs"):
            pipe.step(2 * num_ranks, labels=labels, loss_fn=loss_fn)
        with pytest.raises(ValueError, match="needs loss_fn and labels"):
            pipe.step(2 * num_ranks, inputs=inputs)
    wrong = (ToyStage(stages[1]), ToyStage(stages[0])) if stages[0] != stages[1] else None
    if wrong is not None:
        with pytest.raises(ValueError, match=f"chunk 0 must hold stage {stages[0]}"):
            schedule_cls(wrong, p2p_specs=[TensorSpec(MICROBATCH_SHAPE)])
    with pytest.raises(ValueError, match="takes two stage modules"):
        schedule_cls([ToyStage(stages[0])], p2p_specs=[TensorSpec(MICROBATCH_SHAPE)])
    same = ToyStage(stages[0])
    with pytest.raises(ValueError, match="same module object"):
        schedule_cls([same, same], p2p_specs=[TensorSpec(MICROBATCH_SHAPE)])


def _pipeline_worker(rank: int, world_size: int, cases: list, trace_dir: str) -> list:
    # a short timeout turns a schedule that deadlocks into an error instead of a hung test
    torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    try:
        for name in SCHEDULES:
            _bad_step_settings(name, world_size, rank)
        return [_check_step(name, world_size, rank, num_microbatches, with_overlap,
                            os.path.join(trace_dir, f"case{case}"))
                for case, (name, num_microbatches, with_overlap) in enumerate(cases)]
    finally:
        torch.distributed.destroy_process_group()


def _cases(pp: int) -> list:
    return [("DualPipeV", 2 * pp, False), ("DualPipeV", 2 * pp + 3, True),
            ("DualPipe", 2 * pp, True), ("DualPipe", 2 * pp + 4, False)]


@pytest.mark.multiprocess
# pp=2: the same checks on fewer ranks (extended); pp=4 holds every rule of both schedules
@pytest.mark.parametrize("pp", [pytest.param(2, marks=pytest.mark.extended), 4])
def test_dualpipe_and_dualpipev_match_single_process_and_expected_order(pp, tmp_path):
    summaries = run_gloo(_pipeline_worker, pp, _cases(pp), str(tmp_path))
    # rank 0 wrote every rank's timeline (JSON), the picture and a summary per case
    for case, (name, num_microbatches, _) in enumerate(_cases(pp)):
        summary = summaries[0][case]
        assert all(s[case] is None for s in summaries[1:])
        assert (summary["schedule"], summary["num_microbatches"]) == (name, num_microbatches)
        assert all(0.0 <= b < 1.0 for b in summary["bubble_fraction"]), summary
        assert summary["paper_bubble_time"] == paper_bubble(
            name.lower(), pp, ChunkTimes(**summary["chunk_times"]))
        case_dir = tmp_path / f"case{case}"
        for rank in range(pp):
            trace = json.loads((case_dir / f"trace_rank{rank}.json").read_text())
            order = [ScheduledOp(e["op"], e["chunk"], e["microbatch"], e["paired"])
                     for e in trace["events"]]
            assert order == expected_order(SCHEDULES[name], rank, pp, num_microbatches)
        assert (case_dir / "timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- the schedules' orders, without processes ---------------------------------------------

def _stage_placement(name: str, num_ranks: int, num_microbatches: int):
    """(rank, chunk, micro-batch) -> stage along that micro-batch's path, and the stage count."""
    if name == "DualPipeV":
        return (lambda r, c, mb: r if c == 0 else 2 * num_ranks - 1 - r), 2 * num_ranks
    return (lambda r, c, mb: r if c == 0 else num_ranks - 1 - r), num_ranks


def _run_orders(name: str, num_ranks: int, num_microbatches: int) -> int:
    """Execute every rank's expected order in lock-step, each op only once its inputs exist
    (F after the previous stage's F; B after this stage's F and the next stage's B; W after its
    B; the two ops of an F&B step together). Returns the number of rounds; fails on a deadlock,
    a missing or a repeated op."""
    orders = [expected_order(SCHEDULES[name], r, num_ranks, num_microbatches)
              for r in range(num_ranks)]
    stage_of, num_stages = _stage_placement(name, num_ranks, num_microbatches)
    queues = [deque(order) for order in orders]
    done: set = set()

    def ready(rank: int, op: ScheduledOp) -> bool:
        s, mb = stage_of(rank, op.chunk, op.microbatch), op.microbatch
        if op.op == "F":
            return s == 0 or ("F", s - 1, mb) in done
        if op.op in ("B", "BW"):
            return ("F", s, mb) in done and (s == num_stages - 1 or ("B", s + 1, mb) in done)
        return ("B", s, mb) in done

    rounds = 0
    while any(queues):
        finished = []
        for rank, queue in enumerate(queues):
            if not queue:
                continue
            step = [queue[0], queue[1]] if queue[0].paired else [queue[0]]
            if all(ready(rank, op) for op in step):
                for op in step:
                    queue.popleft()
                    s = stage_of(rank, op.chunk, op.microbatch)
                    kinds = {"F": ["F"], "B": ["B"], "BW": ["B", "W"], "W": ["W"]}[op.op]
                    finished += [(kind, s, op.microbatch) for kind in kinds]
        assert finished, f"{name} PP={num_ranks} M={num_microbatches}: deadlock at " \
                         f"{[q[0] if q else None for q in queues]}"
        for key in finished:
            assert key not in done, f"{name} PP={num_ranks} M={num_microbatches}: {key} twice"
            done.add(key)
        rounds += 1
    assert len(done) == 3 * num_stages * num_microbatches  # every F, B and W of every stage
    return rounds


@pytest.mark.parametrize("name,num_ranks", [("DualPipeV", 2), ("DualPipeV", 3), ("DualPipeV", 4),
                                            ("DualPipeV", 8), ("DualPipe", 2), ("DualPipe", 4),
                                            ("DualPipe", 8)])
def test_expected_orders_run_every_op_once_without_deadlock(name, num_ranks):
    step = 2 if name == "DualPipe" else 1
    for num_microbatches in range(2 * num_ranks, 2 * num_ranks + 8, step):
        _run_orders(name, num_ranks, num_microbatches)


def test_dualpipev_order_for_two_ranks_reads_like_the_schedule():
    """Hand-written order of rank 1 (the turn) of DualPipeV, PP=2, M=4 (a regression anchor)."""
    F, B, BW, W = "F", "B", "BW", "W"
    ops = [(F, 0, 0), (F, 1, 0), (F, 0, 1), (F, 1, 1),                   # step 2
           (F, 0, 2), (BW, 1, 0), (F, 1, 2, True), (BW, 0, 0, True),       # step 4, i = 0
           (F, 0, 3, True), (BW, 1, 1, True), (F, 1, 3, True), (BW, 0, 1, True),
           (BW, 1, 2), (BW, 0, 2), (B, 1, 3), (B, 0, 3),                   # step 6
           (W, 1, 3), (W, 0, 3)]                                           # step 8
    assert expected_order(DualPipeV, 1, 2, 4) == [ScheduledOp(*op) for op in ops]


# ---- bad settings -------------------------------------------------------------------------

def test_bad_settings_raise_with_the_fix():
    with pytest.raises(ValueError, match="num_microbatches >= 2 \\* pipeline ranks = 8"):
        DualPipeV.validate(4, 7)
    with pytest.raises(ValueError, match="at least 2 pipeline ranks"):
        DualPipeV.validate(1, 4)
    with pytest.raises(ValueError, match="even number of pipeline ranks"):
        DualPipe.validate(3, 12)
    with pytest.raises(ValueError, match="even num_microbatches"):
        DualPipe.validate(4, 9)
    with pytest.raises(ValueError, match="num_microbatches >= 2 \\* pipeline ranks = 8"):
        DualPipe.validate(4, 6)
    DualPipeV.validate(3, 6)
    DualPipe.validate(4, 8)
    with pytest.raises(ValueError, match="does not split into the 8 stages of dualpipev"):
        StagePlan("dualpipev", 4, 61)
    assert StagePlan("dualpipe", 4, 8).layer_ranges == [range(0, 2), range(2, 4), range(4, 6),
                                                        range(6, 8)]
    with pytest.raises(ValueError, match="unknown pipeline schedule 'zb'"):
        schedule_class("zb")
    assert schedule_class("DualPipeV") is DualPipeV
    # a stage output of the wrong shape is refused before it reaches (and hangs) the peer
    comm = P2PComm(None, [TensorSpec(MICROBATCH_SHAPE)], torch.device("cpu"))
    with pytest.raises(ValueError, match="p2p spec says \\(2, 3, 16\\)"):
        comm.post_send([torch.zeros(2, 3, 8)], peer=1)


# ---- B/W split ----------------------------------------------------------------------------

def test_deferred_weight_grad_b_then_w_equals_plain_backward():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8)
    grad_y = torch.randn(2, 5, 6)
    plain = DeferredWgradLinear(8, 6, bias=True)
    split = DeferredWgradLinear(8, 6, bias=True, store=WeightGradStore())
    split.load_state_dict(plain.state_dict())
    store = split.weight_grad_store
    for step in range(2):  # the second step accumulates onto existing gradients
        x_plain, x_split = x.clone().requires_grad_(), x.clone().requires_grad_()
        plain(x_plain).backward(grad_y)
        with store.deferring(label=("B", step)):
            split(x_split).backward(grad_y)
        # B: the input gradient is there, the weight gradient is not yet
        assert_equal(x_split.grad, x_plain.grad, "input grad after B")
        if step == 0:
            assert split.weight.grad is None and split.bias.grad is None
        assert len(store) == 1 and store.run_next() == ("B", step)  # W
        assert_equal(split.weight.grad, plain.weight.grad, f"weight grad, step {step}")
        assert_equal(split.bias.grad, plain.bias.grad, f"bias grad, step {step}")
    # the same math as F.linear (a different matmul kernel for the weight gradient)
    x_ref = x.clone().requires_grad_()
    weight = plain.weight.detach().clone().requires_grad_()
    bias = plain.bias.detach().clone().requires_grad_()
    F.linear(x_ref, weight, bias).backward(grad_y)
    assert_close(plain.weight.grad / 2, weight.grad, FP32_REORDER, "mm kernel order", "dW")
    assert_close(x_plain.grad, x_ref.grad, FP32_REORDER, "mm kernel order", "dX")


def test_deferred_weight_grad_goes_to_main_grad_and_store_refuses_misuse():
    layer = DeferredWgradLinear(4, 3, bias=False, store=WeightGradStore())
    layer.weight.main_grad = torch.zeros(3, 4)  # as Megatron's DDP sets it
    x = torch.randn(5, 4)
    with layer.weight_grad_store.deferring():
        layer(x).sum().backward()
    layer.weight_grad_store.run_next()
    assert layer.weight.grad is None
    assert_equal(layer.weight.main_grad, torch.ones(5, 3).t() @ x, "main_grad")
    store = WeightGradStore()
    with pytest.raises(RuntimeError, match="no deferred weight gradients"):
        store.run_next()
    with pytest.raises(RuntimeError, match="does not nest"):
        with store.deferring(), store.deferring():
            pass


# ---- bubble helpers -----------------------------------------------------------------------

def test_paper_bubble_formulas_on_known_numbers():
    times = ChunkTimes(F=1.0, B=2.0, W=0.5, F_and_B=2.5)
    assert paper_bubble("1f1b", 8, times) == 7 * 3.0
    assert paper_bubble("zb1p", 8, times) == 7 * 2.0
    assert paper_bubble("dualpipe", 8, times) == 3 * (2.5 + 2.0 - 1.5)
    assert paper_bubble("dualpipev", 4, times) == paper_bubble("dualpipe", 8, times)
    assert paper_bubble("dualpipe", 4, ChunkTimes(F=1.0, B=2.0, W=0.5)) == 1 * (3.0 + 2.0 - 1.5)
    with pytest.raises(ValueError, match="even number of pipeline ranks"):
        paper_bubble("dualpipe", 3, times)
    with pytest.raises(ValueError, match="unknown schedule"):
        paper_bubble("gpipe", 4, times)


def test_bubble_fraction_and_chunk_times_from_events(tmp_path):
    events = [TraceEvent("F", 0, 0, 0.0, 1.0), TraceEvent("B", 0, 0, 2.0, 3.0),
              TraceEvent("W", 0, 0, 3.0, 3.5),
              TraceEvent("F", 1, 1, 4.0, 6.0, True), TraceEvent("BW", 0, 1, 4.0, 6.0, True)]
    # busy: [0,1] + [2,3.5] + [4,6] = 4.5 of 8 (the F&B pair counts once)
    assert bubble_fraction(events, 0.0, 8.0) == pytest.approx(1 - 4.5 / 8)
    times = measured_chunk_times(events)
    assert (times.F, times.B, times.W, times.F_and_B) == (1.0, 1.5, 0.5, 2.0)
    trace = {"duration": 8.0, "bubble_fraction": 1 - 4.5 / 8,
             "events": [e.__dict__ for e in events]}
    (tmp_path / "trace.json").write_text(json.dumps(trace))
    draw_timeline([json.loads((tmp_path / "trace.json").read_text())], tmp_path / "t.png")
    assert os.path.getsize(tmp_path / "t.png") > 0


def test_idle_split_into_ramp_and_steady_state():
    # fill: F [0,1], idle 1; steady: pairs [2,4] and [4.5,6.5] (0.5 idle between them);
    # drain: idle 0.5, B [7,8], W [8,8.5], idle 1.5 to the end at 10
    events = [TraceEvent("F", 0, 0, 0.0, 1.0),
              TraceEvent("F", 1, 1, 2.0, 4.0, True), TraceEvent("BW", 0, 0, 2.0, 4.0, True),
              TraceEvent("F", 1, 2, 4.5, 6.5, True), TraceEvent("BW", 0, 1, 4.5, 6.5, True),
              TraceEvent("B", 0, 2, 7.0, 8.0), TraceEvent("W", 0, 2, 8.0, 8.5)]
    phases = idle_by_phase(events, 10.0)
    assert phases == pytest.approx({"ramp": 1.0 + 0.5 + 1.5, "steady": 0.5})
    assert phases["ramp"] + phases["steady"] == pytest.approx(
        bubble_fraction(events, 0.0, 10.0) * 10.0)
    # no F&B step: all of it is ramp
    assert idle_by_phase(events[:1], 2.0) == {"ramp": 1.0, "steady": 0.0}
