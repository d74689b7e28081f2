"""How much of the expert-parallel all-to-all is hidden behind compute: the MoE pieces
and exchanges, time-stamped on the device, and the arithmetic on them.

  Clock           stamps relative to a step's start: CUDA events on the current stream (GPU),
                  the host clock (CPU)
  TimedTrace      PiecewiseLayers' trace list that also stamps each event; follows the
                  'pair.begin' / 'pair.end' markers of an F&B interleaving (`paired`)
  TimedExchange   moe.async_exchange.AsyncExchange that stamps each row all-to-all
  resolve_step    one step's pieces and exchanges in seconds (after its end)
  step_numbers    comm time C, exposed time X (and the strict X) of one step
  summarize       the fraction hidden over many steps: 1 - sum X / sum C

Used by benchmarks/pipeline_ep_overlap.py (one stage's MoE F&B step) and
benchmarks/pipeline_schedules.py (inside a DualPipe(V) pipeline with EP). Definitions, per rank:
  exchange   one row all-to-all (dispatch and combine in the forward, their gradients in the
             backward: 4 per MoE layer and micro-batch), from issue (the compute stream reached
             it: its rows are ready) to completion (GPU: an event the comm stream records after
             waiting for the NCCL work; CPU: the gloo work's completion callback)
  C          the length of the union of the exchanges' [issue, completion]
  X          the length of the union of [wait, completion] over exchanges completing after
             `wait`, when the compute stream reached the piece that needs the rows: the time
             compute stood still for communication
  strict X   X plus the part of each plan wait ('.plan.wait' piece) during which a row
             exchange was still in flight: the count exchange queues behind it on the same
             communicator (an upper bound: the device may still be computing what the host
             queued before the wait)
  paired     the exchange was issued inside an F&B interleaving (the schedules' steady state),
             not in a lone forward or backward (warm-up, cool-down), where nothing hides it
The count exchanges themselves (EP x experts/EP integers) are not counted as communication.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.distributed as dist

from ..moe.async_exchange import AsyncExchange
from ..pipeline.fb_overlap import PAIR_BEGIN, PAIR_END


class Clock:
    """Time stamps relative to the start of a step. On GPU a stamp is a CUDA event recorded
    on the current stream (resolved after the step's synchronize); on CPU the host time."""

    def __init__(self, device: torch.device, group=None) -> None:
        self.cuda = device.type == "cuda"
        self.group = group
        self._origin: Any = 0.0

    def begin(self) -> None:
        """Start a step: the device idle and the group's ranks aligned."""
        if self.cuda:
            torch.cuda.synchronize()
        dist.barrier(group=self.group)
        if self.cuda:
            self._origin = torch.cuda.Event(enable_timing=True)
            self._origin.record()
        else:
            self._origin = time.perf_counter()

    def stamp(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter() - self._origin

    def host_now(self) -> float:
        return time.perf_counter() - self._origin

    def seconds(self, stamp: Any) -> float:
        if isinstance(stamp, float):
            return stamp
        return self._origin.elapsed_time(stamp) / 1e3


class TimedTrace(list):
    """The pieces' event list (`PiecewiseLayers.trace`) that also stamps each event: a piece runs
    from its event to the next one. `paired` is True between 'pair.begin' and 'pair.end'."""

    def __init__(self, clock: Clock) -> None:
        super().__init__()
        self.clock = clock
        self.stamps: list = []
        self.paired = False

    def append(self, event: str) -> None:
        if event in (PAIR_BEGIN, PAIR_END):
            self.paired = event == PAIR_BEGIN
        super().append(event)
        self.stamps.append(self.clock.stamp())

    def clear(self) -> None:
        super().clear()
        self.stamps = []
        self.paired = False


@dataclass
class ExchangeTiming:
    name: str                 # e.g. "F0.dispatch", "B3.combine" (the piece that issued it)
    nbytes: int
    issue: Any = None
    completion: Any = None
    wait: Any = None
    resumed: Any = None       # after the wait (the compute stream may go on)
    paired: bool = False      # issued inside an F&B interleaving


class TimedExchange(AsyncExchange):
    """AsyncExchange with stamps: issue and wait on the compute stream,
    completion on the comm stream (GPU) or from the gloo work's callback (CPU). Timings go to
    `timings` (a list the caller may share between several exchanges)."""

    def __init__(self, clock: Clock, trace: TimedTrace,
                 timings: Optional[list["ExchangeTiming"]] = None, count_groups=None) -> None:
        super().__init__(count_groups)
        self.clock, self.trace = clock, trace
        self.timings: list[ExchangeTiming] = [] if timings is None else timings

    def start(self, rows, group, output_splits, input_splits):
        if group is None:
            return super().start(rows, group, output_splits, input_splits)
        name = next((e.rsplit(".", 1)[0] for e in reversed(self.trace)
                     if e not in (PAIR_BEGIN, PAIR_END)), "?")  # the piece that issued it
        timing = ExchangeTiming(name, rows.numel() * rows.element_size(), self.clock.stamp(),
                                paired=self.trace.paired)
        pending = super().start(rows, group, output_splits, input_splits)
        if self.clock.cuda:
            with pending.stream:  # the comm stream waits for the NCCL work, then stamps
                pending.work.wait()
                timing.completion = self.clock.stamp()
        else:
            clock = self.clock
            pending.work.get_future().then(
                lambda _: setattr(timing, "completion", clock.host_now()))
        pending.timing = timing
        self.timings.append(timing)
        return pending

    def finish(self, pending):
        timing = getattr(pending, "timing", None)
        if timing is not None:
            timing.wait = self.clock.stamp()
        output = super().finish(pending)
        if timing is not None:
            timing.resumed = self.clock.stamp()
        return output


@dataclass
class StepRecord:
    duration: float
    pieces: list[tuple[str, float, float]]            # (event, start, end) on the compute side
    exchanges: list[dict] = field(default_factory=list)


def union_length(intervals) -> float:
    total, covered = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > covered:
            total += end - max(start, covered)
            covered = end
    return total


def resolve_step(clock: Clock, trace: TimedTrace, timings: list[ExchangeTiming],
                 end: Any = None) -> StepRecord:
    """The step in seconds from its start. `end`: the step's last stamp (default: the trace's
    last event, which then marks the end and starts no piece)."""
    if clock.cuda:
        torch.cuda.synchronize()
    else:  # a gloo completion callback may still be on its way
        deadline = time.perf_counter() + 5.0
        while any(t.completion is None for t in timings) and time.perf_counter() < deadline:
            time.sleep(1e-4)
    times = [clock.seconds(s) for s in trace.stamps]
    if end is None:
        events, duration = list(trace[:-1]), times[-1]
    else:
        duration = clock.seconds(end)
        events, times = list(trace), times + [duration]
    pieces = [(event, times[k], times[k + 1]) for k, event in enumerate(events)
              if event not in (PAIR_BEGIN, PAIR_END)]
    exchanges = [{"name": t.name, "bytes": t.nbytes, "issue": clock.seconds(t.issue),
                  "completion": clock.seconds(t.completion), "wait": clock.seconds(t.wait),
                  "resumed": clock.seconds(t.resumed), "paired": t.paired} for t in timings]
    return StepRecord(duration, pieces, exchanges)


def step_numbers(record: StepRecord, paired_only: bool = False) -> dict:
    """comm time C, exposed time X (and the strict X) of one step (module docstring);
    paired_only: of the exchanges issued inside F&B interleavings only."""
    ex = [e for e in record.exchanges if e.get("paired") or not paired_only]
    comm = union_length([(e["issue"], e["completion"]) for e in ex])
    stalls = [(e["wait"], e["completion"]) for e in ex if e["completion"] > e["wait"]]
    blocked = []
    for name, start, end in record.pieces:
        if name.endswith(".plan.wait"):
            in_flight = [e["completion"] for e in ex
                         if e["issue"] < start < e["completion"]]
            if in_flight:
                blocked.append((start, min(end, max(in_flight))))
    per_piece: dict[str, float] = {}
    for name, start, end in record.pieces:
        kind = ".".join(name.split(".")[1:])  # attn.run, plan.wait, dispatch.wait, ...
        kind = f"{name[0]}.{kind}"
        per_piece[kind] = per_piece.get(kind, 0.0) + (end - start)
    return {"step_s": record.duration, "comm_s": comm, "exposed_s": union_length(stalls),
            "exposed_strict_s": union_length(stalls + blocked), "exchanges": len(ex),
            "bytes": sum(e["bytes"] for e in ex), "pieces_s": per_piece}


def summarize(steps: list[dict]) -> dict:
    comm = sum(s["comm_s"] for s in steps)
    exposed = sum(s["exposed_s"] for s in steps)
    strict = sum(s["exposed_strict_s"] for s in steps)
    kinds = sorted({k for s in steps for k in s["pieces_s"]})
    return {"step_s": statistics.median(s["step_s"] for s in steps),
            "step_times": [round(s["step_s"], 6) for s in steps],
            "comm_s": comm, "exposed_s": exposed, "exposed_strict_s": strict,
            "hidden_fraction": 1.0 - exposed / comm if comm > 0 else None,
            "hidden_fraction_strict": 1.0 - strict / comm if comm > 0 else None,
            "exchanges_per_step": steps[0]["exchanges"],
            "bytes_per_step": steps[0]["bytes"],
            "pieces_s_per_step": {k: sum(s["pieces_s"].get(k, 0.0) for s in steps) / len(steps)
                                  for k in kinds}}


__all__ = ["Clock", "ExchangeTiming", "StepRecord", "TimedExchange", "TimedTrace",
           "resolve_step", "step_numbers", "summarize", "union_length"]
