"""What a pipeline schedule ran, when: the ops of one step on one rank, with their times.

  ScheduledOp(op, chunk, microbatch, paired)   one entry of a rank's order; op is
        F  forward                      B  backward for inputs only (its W comes later)
        BW backward for inputs+weights  W  the deferred weight gradients of one earlier B
        paired: run as one overlapped F&B step together with its neighbour in the order
  Tracer                 records TraceEvents (op, chunk, micro-batch, start, end) on one rank;
                         `executed_order()`, `to_dict()` / `write_json()` for files
  bubble_fraction(...)   idle / total over the step, idle = time not covered by any op
The analysis of traces (timelines, idle by phase, the paper's bubble formulas) is in
megatron_dsv3.profiling.timeline.

Design notes
  * On CPU, time is the host clock (`time.perf_counter`, one clock for all processes of a
    host) from a barrier at the start of the step, so the ranks' rows line up.
  * On GPU, time is the device's: a CUDA event (with timing) recorded on the current stream at
    every op boundary and one at the origin (right after the barrier); `finish()` synchronizes
    once and converts them to seconds from the origin. Nothing synchronizes during the step,
    so a traced step runs like an untraced one (the host stays ahead of the device) and an
    op's span is when the device ran it. Idle is then device time between ops: waits for a
    p2p receive (the stream waits on it before the next op's first kernel), and the host
    falling behind (a host sync, e.g. MoE dispatch sizes). Synchronizing the device at every
    boundary instead would add every host gap to the idle time.
  * Communication waits are not events: they show up as idle time, like the paper's bubble.
  * An overlapped F&B step is recorded as its two ops with the same start and end.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple, Optional, Sequence

import torch
import torch.distributed as dist

FORWARD, BACKWARD_INPUT, BACKWARD_FULL, WEIGHT = "F", "B", "BW", "W"


class ScheduledOp(NamedTuple):
    op: str
    chunk: int
    microbatch: int
    paired: bool = False


@dataclass(frozen=True)
class TraceEvent:
    op: str
    chunk: int
    microbatch: int
    start: float
    end: float
    paired: bool = False


class Tracer:
    """Per-rank event recorder; pass one to a schedule's `step(..., tracer=...)`. The events of
    a step are complete after `finish()` (on GPU they are device timestamps read there)."""

    def __init__(self) -> None:
        self.events: list[TraceEvent] = []
        self.meta: dict = {}
        self._origin = 0.0
        self._end: Optional[float] = None
        self._cuda = False
        self._marks: list = []   # GPU: (ops, start event, end event) until finish()
        self._origin_event = self._end_event = None

    def _mark(self):
        """Now: a host time (CPU) or a recorded CUDA event (GPU)."""
        if self._cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter() - self._origin

    def begin(self, group: Optional[dist.ProcessGroup], device: torch.device, **meta) -> None:
        """Start a step: clear, align the ranks (barrier on `group`), set the time origin."""
        self.events, self._marks = [], []
        self.meta = dict(meta)
        self._end = None
        self._cuda = torch.device(device).type == "cuda"
        if group is not None:
            dist.barrier(group=group)
        if self._cuda:
            torch.cuda.synchronize(device)   # the origin: the device has drained, as the host
            self._origin_event = self._mark()
        else:
            self._origin = 0.0
            self._origin = self._mark()

    def finish(self) -> None:
        if not self._cuda:
            self._end = self._mark()
            return
        self._end_event = self._mark()
        self._end_event.synchronize()

        def seconds(event) -> float:
            return self._origin_event.elapsed_time(event) / 1e3

        self.events = [TraceEvent(o.op, o.chunk, o.microbatch, seconds(start), seconds(end),
                                  o.paired)
                       for ops, start, end in self._marks for o in ops]
        self._marks = []
        self._end = seconds(self._end_event)

    @contextmanager
    def span(self, *ops: ScheduledOp) -> Iterator[None]:
        """Record `ops` (one op, or the two of an F&B step) as running over this block."""
        start = self._mark()
        yield
        end = self._mark()
        if self._cuda:
            self._marks.append((ops, start, end))
        else:
            self.events.extend(TraceEvent(o.op, o.chunk, o.microbatch, start, end, o.paired)
                               for o in ops)

    def executed_order(self) -> list[ScheduledOp]:
        return [ScheduledOp(e.op, e.chunk, e.microbatch, e.paired) for e in self.events]

    def duration(self) -> float:
        if self._end is None:
            raise RuntimeError("Tracer.duration(): the step has not finished")
        return self._end

    def bubble_fraction(self) -> float:
        return bubble_fraction(self.events, 0.0, self.duration())

    def to_dict(self) -> dict:
        return {**self.meta, "duration": self.duration(), "bubble_fraction": self.bubble_fraction(),
                "events": [asdict(e) for e in self.events]}

    def write_json(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))


def interval_union(intervals: Iterable[tuple[float, float]]) -> float:
    """Length of the union of [start, end] intervals (overlaps counted once)."""
    total, covered_until = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > covered_until:
            total += end - max(start, covered_until)
            covered_until = end
    return total


def busy_time(events: Sequence[TraceEvent]) -> float:
    """Length of the union of the events' [start, end] intervals."""
    return interval_union((e.start, e.end) for e in events)


def bubble_fraction(events: Sequence[TraceEvent], start: float, end: float) -> float:
    """Idle time / (end - start): the share of the step in which this rank ran no op."""
    if end <= start:
        raise ValueError(f"bubble_fraction over an empty span: start={start}, end={end}")
    return 1.0 - busy_time(events) / (end - start)
