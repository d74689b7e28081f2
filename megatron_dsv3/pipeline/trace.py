"""What a pipeline schedule ran, when: per-rank timeline, bubble fraction, the paper's formulas.

  ScheduledOp(op, chunk, microbatch, paired)   one entry of a rank's order; op is
        F  forward                      B  backward for inputs only (its W comes later)
        BW backward for inputs+weights  W  the deferred weight gradients of one earlier B
        paired: run as one overlapped F&B step together with its neighbour in the order
  Tracer                 records TraceEvents (op, chunk, micro-batch, start, end) on one rank;
                         `executed_order()` for tests, `to_dict()` / `write_json()` for files
  bubble_fraction(...)   idle / total over the step, idle = time not covered by any op
  idle_by_phase(...)     that idle split into the fill/drain ramps and the steady state
  draw_timeline(traces, path)   PNG, one row per rank (matplotlib, headless)
  write_trace_files(tracer, dir) all ranks' JSON, the PNG and a summary, written by rank 0
  ChunkTimes, measured_chunk_times(events), paper_bubble(schedule, num_ranks, times)
                         the DualPipe paper's bubble formulas from measured F, B, W, F&B

Design notes
  * On CPU, time is the host clock (`time.perf_counter`, one clock for all processes of a
    host) from a barrier at the start of the step, so the ranks' rows line up.
  * On GPU, time is the device's: a CUDA event (with timing) recorded on the current stream at
    every op boundary and one at the origin (right after the barrier); `finish()` synchronizes
    once and converts them to seconds from the origin. Nothing synchronizes during the step,
    so a traced step runs like an untraced one (the host stays ahead of the device) and an
    op's span is when the device ran it. Idle is then device time between ops: waits for a
    p2p receive (the stream waits on it before the next op's first kernel), and the host
    falling behind (a host sync, e.g. MoE dispatch sizes). An earlier version synchronized the
    device at every boundary, which added every host gap to the idle time (35 ms per step
    at PP=2, M=4 on H200s, 1.6x the paper's bubble).
  * Communication waits are not events: they show up as idle time, like the paper's bubble.
  * An overlapped F&B step is recorded as its two ops with the same start and end.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, NamedTuple, Optional, Sequence

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


def busy_time(events: Sequence[TraceEvent]) -> float:
    """Length of the union of the events' [start, end] intervals."""
    total, covered_until = 0.0, float("-inf")
    for start, end in sorted((e.start, e.end) for e in events):
        if end > covered_until:
            total += end - max(start, covered_until)
            covered_until = end
    return total


def bubble_fraction(events: Sequence[TraceEvent], start: float, end: float) -> float:
    """Idle time / (end - start): the share of the step in which this rank ran no op."""
    if end <= start:
        raise ValueError(f"bubble_fraction over an empty span: start={start}, end={end}")
    return 1.0 - busy_time(events) / (end - start)


def idle_by_phase(events: Sequence[TraceEvent], duration: float) -> dict[str, float]:
    """A rank's idle time split at its steady state, the span of its overlapped F&B steps:
    `ramp` before the first and after the last (the schedule's fill and drain, which the
    paper's formula counts with equal chunk times), `steady` between them (waits when the
    ranks' F&B steps take different times: unequal stages, routing that differs per
    micro-batch). Without F&B steps everything is `ramp`."""
    paired = [e for e in events if e.paired]
    if not paired:
        return {"ramp": duration - busy_time(events), "steady": 0.0}
    start, end = min(e.start for e in paired), max(e.end for e in paired)
    inside = [e for e in events if e.start >= start and e.end <= end]
    steady = (end - start) - busy_time(inside)
    return {"ramp": duration - busy_time(events) - steady, "steady": steady}


def events_from_dict(trace: dict) -> list[TraceEvent]:
    return [TraceEvent(**e) for e in trace["events"]]


def load_trace(path: Path) -> dict:
    return json.loads(Path(path).read_text())


# ---- the paper's bubble formulas ----------------------------------------------------------

@dataclass(frozen=True)
class ChunkTimes:
    """Execution times of one chunk, as in the DualPipe paper's table: F forward, B full
    backward (inputs and weights), W backward for weights only, F_and_B two mutually
    overlapped forward and backward chunks (no overlap: F + B)."""
    F: float
    B: float
    W: float
    F_and_B: Optional[float] = None

    @property
    def overlapped(self) -> float:
        return self.F + self.B if self.F_and_B is None else self.F_and_B


def paper_bubble(schedule: str, num_ranks: int, times: ChunkTimes) -> float:
    """Bubble time of one step (DeepSeek-V3 report, table 2; DualPipe README):
         1f1b       (PP-1)(F+B)
         zb1p       (PP-1)(F+B-2W)
         dualpipe   (PP/2-1)(F&B+B-3W)
         dualpipev  DualPipe on 2*PP ranks (DualPipeV is DualPipe cut in half): (PP-1)(F&B+B-3W)
    """
    pp = num_ranks
    if schedule == "1f1b":
        return (pp - 1) * (times.F + times.B)
    if schedule == "zb1p":
        return (pp - 1) * (times.F + times.B - 2 * times.W)
    if schedule == "dualpipe":
        if pp % 2:
            raise ValueError(f"DualPipe needs an even number of ranks, got num_ranks={pp}")
        return (pp // 2 - 1) * (times.overlapped + times.B - 3 * times.W)
    if schedule == "dualpipev":
        return paper_bubble("dualpipe", 2 * pp, times)
    raise ValueError(f"paper_bubble: unknown schedule {schedule!r}; use one of "
                     "'1f1b', 'zb1p', 'dualpipe', 'dualpipev'")


def measured_chunk_times(events: Sequence[TraceEvent]) -> ChunkTimes:
    """Mean F, full B, W and F&B durations from a trace. A full backward is a BW event, or,
    when every backward was split, mean B + mean W; F&B is the span of the paired steps."""
    def mean(values: list[float]) -> Optional[float]:
        return sum(values) / len(values) if values else None

    def durations(op: str, paired: bool) -> list[float]:
        return [e.end - e.start for e in events if e.op == op and e.paired == paired]

    forward = mean(durations(FORWARD, False))
    weight = mean(durations(WEIGHT, False)) or 0.0
    backward = mean(durations(BACKWARD_FULL, False))
    if backward is None:
        split = mean(durations(BACKWARD_INPUT, False))
        backward = None if split is None else split + weight
    if forward is None or backward is None:
        raise ValueError("measured_chunk_times: the trace has no unpaired F or no backward")
    return ChunkTimes(forward, backward, weight, mean(durations(FORWARD, True)))


def write_trace_files(tracer: Tracer, directory: Path,
                      group: Optional[dist.ProcessGroup] = None) -> Optional[dict]:
    """Gather every rank's trace of the last step on group rank 0, which writes
    `trace_rank{r}.json`, `timeline.png` and `summary.json` (bubble fraction and idle time
    per rank, measured chunk times, the paper's bubble time for them). Returns the summary on
    group rank 0, None elsewhere. Every rank of `group` must call it."""
    traces: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(traces, tracer.to_dict(), group=group)
    if dist.get_rank(group) != 0:
        return None
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for rank, trace in enumerate(traces):
        (directory / f"trace_rank{rank}.json").write_text(json.dumps(trace, indent=1))
    meta = traces[0]
    title = (f"{meta.get('schedule', '?')}, PP={len(traces)}, "
             f"{meta.get('num_microbatches', '?')} micro-batches")
    draw_timeline(traces, directory / "timeline.png", title)
    summary = {"schedule": meta.get("schedule"), "num_ranks": len(traces),
               "num_microbatches": meta.get("num_microbatches"),
               "bubble_fraction": [t["bubble_fraction"] for t in traces],
               "idle_time": [t["bubble_fraction"] * t["duration"] for t in traces],
               "duration": [t["duration"] for t in traces]}
    try:
        times = measured_chunk_times([e for t in traces for e in events_from_dict(t)])
    except ValueError:  # forward only: no backward to time
        times = None
    if times is not None:
        summary["chunk_times"] = asdict(times)
        schedule = str(meta.get("schedule", "")).lower()
        if schedule in ("dualpipe", "dualpipev"):
            summary["paper_bubble_time"] = paper_bubble(schedule, len(traces), times)
    (directory / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


# ---- picture ------------------------------------------------------------------------------

_COLORS = {FORWARD: "#4c72b0", BACKWARD_INPUT: "#55a868", BACKWARD_FULL: "#c44e52",
           WEIGHT: "#8172b2"}


def draw_timeline(traces: Sequence[dict], path: Path, title: str = "") -> None:
    """PNG of the ranks' timelines (traces as `Tracer.to_dict()`, index = rank). Chunk 1 is
    drawn hatched; the two ops of an F&B step share their slot (F top half, B bottom half)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    num_ranks = len(traces)
    end = max(t["duration"] for t in traces)
    fig, ax = plt.subplots(figsize=(14, 0.7 * num_ranks + 1.5))
    for rank, trace in enumerate(traces):
        y = num_ranks - 1 - rank
        for e in events_from_dict(trace):
            bottom, height = y + 0.1, 0.8
            if e.paired:
                height = 0.4
                bottom = y + (0.5 if e.op == FORWARD else 0.1)
            ax.broken_barh([(e.start, e.end - e.start)], (bottom, height),
                           facecolors=_COLORS[e.op], edgecolor="black", linewidth=0.3,
                           hatch="//" if e.chunk == 1 else None)
            if e.end - e.start > end / 150:
                ax.text((e.start + e.end) / 2, bottom + height / 2, str(e.microbatch),
                        ha="center", va="center", fontsize=6, color="white")
    ax.set_yticks([num_ranks - 1 - r + 0.5 for r in range(num_ranks)])
    ax.set_yticklabels([f"rank {r}\nbubble {t['bubble_fraction']:.0%}"
                        for r, t in enumerate(traces)])
    ax.set_xlim(0, end)
    ax.set_xlabel("seconds from the start of the step")
    ax.set_title((title or "pipeline schedule") + "\nnumbers: micro-batch; hatched: chunk 1; "
                 "half-height pairs: one overlapped F&B step", loc="left", fontsize=9)
    ax.legend(handles=[Patch(color=c, label=op) for op, c in _COLORS.items()],
              loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=4, fontsize=7, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
