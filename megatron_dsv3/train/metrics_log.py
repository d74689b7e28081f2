"""What rank 0 writes while the job trains: metrics.jsonl, the Weights & Biases run, the plots.

metrics.jsonl has one JSON line per optimizer step (a resumed run keeps the history up to the
resumed step, from the checkpoint's run folder if it is another one). W&B runs offline without
an API key; `wandb` is imported only when a run logs to it, matplotlib only by `write_plots`, at
the end.

W&B after an interruption. A resumed run continues the W&B run of its checkpoint (the same id),
but W&B holds only what it had written: offline every start writes its own
`wandb/offline-run-<time>-<id>/run-<id>.wandb` with only what it logs itself, and a `kill -9`
loses the records not yet written out in whole 32 KiB blocks (measured with wandb 0.31: 60 steps
logged 0.1 s apart, 53 in the file; 50 logged at once, none). `start_wandb` therefore logs again,
first and in order (W&B steps must increase), the metrics.jsonl records up to the resumed step
that neither the earlier .wandb files of this run in the run folder (`read_wandb_log`) nor, when
online, the server (`starting_step`) hold.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import struct
import sys
import uuid
import zlib
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist

from ..moe.balance import layer_label
from .step import Run


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
    """The W&B run (offline without WANDB_API_KEY), its history complete up to the resumed step:
    the records of metrics.jsonl (which `MetricsLog` has just written) that W&B lacks are logged
    again first."""
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
    written = _last_wandb_step(out_dir / "wandb", run.wandb_id)  # before init adds a file
    wandb_run = wandb.init(project=run.args.wandb_project, name=out_dir.name, dir=str(out_dir),
                           id=run.wandb_id, resume="allow", config=config)
    # online, a resumed run starts at the server's last step + 1 (offline: at 0)
    known = max(written, getattr(wandb_run, "starting_step", 0) - 1)
    missing = [r for r in _read_jsonl(out_dir / "metrics.jsonl") if known < r["step"] <= run.step]
    for record in missing:
        wandb_run.log(record, step=record["step"])
    if missing:
        print(f"W&B: logged steps {missing[0]['step']}-{missing[-1]['step']} again from "
              "metrics.jsonl (the interrupted run had not written them)", file=sys.stderr)
    if known > run.step:
        print(f"W&B: run {run.wandb_id} already holds steps up to {known}, past the resumed step "
              f"{run.step}: W&B keeps those and ignores this run's steps {run.step + 1}-{known} "
              "(its steps only increase)", file=sys.stderr)
    return wandb_run


# The .wandb file (wandb's transaction log, read by `wandb sync`): a 7-byte header, then LevelDB's
# log format: 32 KiB blocks of records <crc32 (of the type byte, then the data), length, type>,
# a record larger than a block's rest split into FIRST, MIDDLE..., LAST pieces; each record a
# serialized wandb_internal_pb2.Record.
_WANDB_HEADER = b":W&B"
_WANDB_BLOCK_BYTES = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def read_wandb_log(path: Path) -> list[tuple[int, object]]:
    """The records of a .wandb file as (offset where the record ends, wandb_internal_pb2.Record),
    up to the first one that was not completely written (a killed run's file ends there)."""
    from wandb.proto import wandb_internal_pb2

    records = []
    for end, data in _log_records(path.read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        records.append((end, record))
    return records


def _log_records(data: bytes) -> Iterator[tuple[int, bytes]]:
    if not data.startswith(_WANDB_HEADER):
        raise ValueError(f"not a .wandb file (it starts with {data[:7]!r})")
    pos, pieces = 7, []
    while True:
        if _WANDB_BLOCK_BYTES - pos % _WANDB_BLOCK_BYTES < 7:  # a block's zero-filled trailer
            pos += _WANDB_BLOCK_BYTES - pos % _WANDB_BLOCK_BYTES
        if pos + 7 > len(data):
            return
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        body = data[pos + 7:pos + 7 + length]
        if (kind not in (_FULL, _FIRST, _MIDDLE, _LAST) or len(body) < length
                or zlib.crc32(body, zlib.crc32(bytes([kind]))) != crc):
            return  # not written, or damaged: what follows cannot be trusted
        pos += 7 + length
        pieces = [body] if kind in (_FULL, _FIRST) else pieces + [body]
        if kind in (_FULL, _LAST):
            yield pos, b"".join(pieces)


def wandb_history(path: Path) -> list[dict]:
    """The history rows (one per `log` call, with its `_step`) a .wandb file holds."""
    return [history_row(record) for _, record in read_wandb_log(path)
            if record.WhichOneof("record_type") == "history"]


def history_row(record) -> dict:
    """The metrics of a history record, by name ('_step' included)."""
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json)
            for item in record.history.item}


def _last_wandb_step(wandb_dir: Path, run_id: str) -> int:
    """The last step the earlier .wandb files of W&B run `run_id` in `wandb_dir` hold (0: none);
    a file that cannot be read counts as empty (its steps are then logged again)."""
    last = 0
    for path in sorted(wandb_dir.glob(f"*-{run_id}/run-{run_id}.wandb")):
        try:
            last = max([last] + [row.get("_step", 0) for row in wandb_history(path)])
        except (OSError, ValueError) as err:
            print(f"W&B: cannot read {path} ({err}); its steps are logged again",
                  file=sys.stderr)
    return last


def write_plots(out_dir: Path, records: list[dict], names: list[str],
                recent_loads: collections.deque) -> None:
    from .plots import plot_loss_curve

    plot_loss_curve(records, out_dir / "loss_curve.png")
    write_expert_load(out_dir, records, names, recent_loads)


def write_expert_load(out_dir: Path, records: list[dict], names: list[str],
                      recent_loads: collections.deque) -> Path:
    """expert_load.json and expert_load.png (the heatmap of the loads summed over the last
    steps, and each layer's imbalance over training); returns the image's path."""
    from .plots import plot_expert_load

    loads = (torch.stack(list(recent_loads)).sum(0).numpy() if recent_loads
             else np.zeros((0, 0)))
    labels = [layer_label(n) for n in names]
    (out_dir / "expert_load.json").write_text(json.dumps(
        {"layers": labels, "window_steps": len(recent_loads), "loads": loads.tolist()}))
    path = out_dir / "expert_load.png"
    plot_expert_load(labels, loads, records, path, window_steps=len(recent_loads))
    return path


def expert_load_image(out_dir: Path, records: list[dict], names: list[str],
                      recent_loads: collections.deque):
    """The expert-load figure as a wandb.Image (W&B copies the file when it is logged)."""
    import wandb

    return wandb.Image(str(write_expert_load(out_dir, records, names, recent_loads)))
