"""Pipeline traces analysed: timelines, idle time by phase, the paper's bubble formulas.

  idle_by_phase(events, duration)  a rank's idle time split into the fill/drain ramps and the
                                   steady state
  ChunkTimes, measured_chunk_times(events), paper_bubble(schedule, num_ranks, times)
                                   the DualPipe paper's bubble times from measured F, B, W, F&B
  draw_timeline(traces, path)      PNG, one row per rank (matplotlib, headless)
  write_trace_files(tracer, dir)   all ranks' JSON, the PNG and a summary, written by rank 0

Traces are what `pipeline.trace.Tracer` records (`Tracer.to_dict()`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch.distributed as dist

from ..pipeline.schedules import SCHEDULES, schedule_class
from ..pipeline.trace import (BACKWARD_FULL, BACKWARD_INPUT, FORWARD, WEIGHT, TraceEvent, Tracer,
                              busy_time)


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


BASELINE_BUBBLES = {  # the report's table 2 for the schedules we compare against
    "1f1b": lambda pp, t: (pp - 1) * (t.F + t.B),
    "zb1p": lambda pp, t: (pp - 1) * (t.F + t.B - 2 * t.W),
}


def paper_bubble(schedule: str, num_ranks: int, times: ChunkTimes) -> float:
    """Bubble time of one step (DeepSeek-V3 report, table 2; DualPipe README): 1f1b
    (PP-1)(F+B), zb1p (PP-1)(F+B-2W), and each of our schedules' own formula
    (`paper_bubble` of its class)."""
    if schedule in BASELINE_BUBBLES:
        return BASELINE_BUBBLES[schedule](num_ranks, times)
    if schedule.lower() not in SCHEDULES:
        raise ValueError(f"paper_bubble: unknown schedule {schedule!r}; use one of "
                         f"{sorted(BASELINE_BUBBLES) + sorted(SCHEDULES)}")
    return schedule_class(schedule).paper_bubble(num_ranks, times.overlapped, times.B, times.W)


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
        if schedule in SCHEDULES:
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
