"""What rank 0 writes while the job trains: metrics.jsonl, the Weights & Biases run, the plots.

metrics.jsonl has one JSON line per optimizer step (a resumed run keeps the history up to the
resumed step, from the checkpoint's run folder if it is another one). W&B runs offline without
an API key; `wandb` is imported only when a run logs to it, matplotlib only by `write_plots`, at
the end.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import uuid
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from .step import Run, layer_label

LOAD_WINDOW_STEPS = 20  # expert_load.png shows the loads summed over the last this many steps


class MetricsLog:
    """Appends one JSON line per step; on resume keeps the history up to the resumed step."""

    def __init__(self, out_dir: Path, start_step: int, history_from: Optional[Path]):
        self.path = out_dir / "metrics.jsonl"
        source = history_from if history_from is not None else self.path
        kept = [r for r in _read_jsonl(source) if r["step"] <= start_step] if start_step else []
        self.records = kept
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def append(self, record: dict) -> None:
        self.records.append(record)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def merge_into_last(self, extra: dict) -> None:
        """Add eval results to the last step's record (rewrites the file's last line)."""
        self.records[-1].update(extra)
        self.path.write_text("".join(json.dumps(r) + "\n" for r in self.records))


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def start_wandb(run: Run, out_dir: Path):
    if run.args.no_wandb:
        return None
    if "WANDB_API_KEY" not in os.environ:
        os.environ.setdefault("WANDB_MODE", "offline")
    import wandb

    run.wandb_id = run.wandb_id or uuid.uuid4().hex[:8]
    config = {"model": dataclasses.asdict(run.cfg),
              "train": {k: (str(v) if isinstance(v, Path) else v)
                        for k, v in vars(run.args).items()},
              "world_size": dist.get_world_size(), "tensor_parallel": run.pg.tp.size(),
              "expert_parallel": run.pg.ep.size(), "data_parallel": run.pg.dp.size(),
              "pipeline_parallel": run.args.pipeline_parallel_size,
              "device": str(run.device)}
    return wandb.init(project=run.args.wandb_project, name=out_dir.name, dir=str(out_dir),
                      id=run.wandb_id, resume="allow", config=config)


def write_plots(out_dir: Path, records: list[dict], names: list[str],
                recent_loads: collections.deque) -> None:
    from .plots import plot_expert_load, plot_loss_curve

    plot_loss_curve(records, out_dir / "loss_curve.png")
    loads = (torch.stack(list(recent_loads)).sum(0).numpy() if recent_loads
             else np.zeros((0, 0)))
    labels = [layer_label(n) for n in names]
    (out_dir / "expert_load.json").write_text(json.dumps(
        {"layers": labels, "window_steps": len(recent_loads), "loads": loads.tolist()}))
    plot_expert_load(labels, loads, records, out_dir / "expert_load.png",
                     window_steps=len(recent_loads))
