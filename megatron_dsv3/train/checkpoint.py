"""Checkpoints of the training job: one torch file per rank, written atomically; resuming.

`checkpoints/step_<N>/rank_<r>.pt` holds everything a resumed run needs to repeat an
uninterrupted one bit for bit on CPU: the weights (with the routers' `expert_bias`; with PP
this rank's two stages), the AdamW state, step, tokens seen and every RNG state (torch, Python,
NumPy; on GPU the CUDA generator and Megatron's CUDA RNG tracker). The files are written to
`step_<N>.tmp/` and renamed, then a `latest` marker is replaced by a rename, so a crash leaves
`latest` on the previous complete checkpoint. A resume refuses a checkpoint of another model
config, number of processes or data stream (`RESUME_INVARIANT_ARGS`), saying what differs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from .args import TrainError, build_parser
from .step import Run

CHECKPOINT_FORMAT = 1
# Arguments that fix the data stream and the model: a resume must keep them.
RESUME_INVARIANT_ARGS = ("preset", "micro_batch_size", "grad_accum", "seq_len", "seed",
                         "tensor_parallel_size", "expert_parallel_size",
                         "pipeline_parallel_size", "pipeline_schedule")


def _rank_file(step_dir: Path, rank: int) -> Path:
    return step_dir / f"rank_{rank:05d}.pt"


def _rng_states(device: torch.device) -> dict:
    states = {"torch": torch.get_rng_state(), "python": random.getstate(),
              "numpy": np.random.get_state()}
    if device.type == "cuda":
        from megatron.core.tensor_parallel import get_cuda_rng_tracker

        states["cuda"] = torch.cuda.get_rng_state(device)
        states["megatron_cuda_tracker"] = get_cuda_rng_tracker().get_states()
    return states


def _set_rng_states(states: dict, device: torch.device) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    if device.type == "cuda" and "cuda" in states:
        from megatron.core.tensor_parallel import get_cuda_rng_tracker

        torch.cuda.set_rng_state(states["cuda"], device)
        get_cuda_rng_tracker().set_states(states["megatron_cuda_tracker"])


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def checkpoint_payload(run: Run) -> dict:
    return {
        "format": CHECKPOINT_FORMAT,
        "step": run.step,
        "tokens_seen": run.tokens_seen,
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "rng": _rng_states(run.device),
        "model_config": dataclasses.asdict(run.cfg),
        "train_args": {k: (str(v) if isinstance(v, Path) else v)
                       for k, v in vars(run.args).items()},
        "world_size": dist.get_world_size() if dist.is_initialized() else 1,
        "wandb_id": run.wandb_id,
    }


def save_checkpoint(checkpoint_dir: Path, step: int, payload: dict, *, rank: int = 0) -> Path:
    """Write `step_<step>/` with one file per rank, then point `latest` at it.

    Atomic: files are written under `step_<step>.tmp/` (each as `.partial`, then renamed), the
    folder is renamed to `step_<step>` once every rank is done, and `latest` is replaced by a
    rename; a crash at any point leaves `latest` on the previous complete checkpoint."""
    final, tmp = checkpoint_dir / f"step_{step}", checkpoint_dir / f"step_{step}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    partial = _rank_file(tmp, rank).with_suffix(".partial")
    torch.save(payload, partial)
    os.replace(partial, _rank_file(tmp, rank))
    _barrier()
    if rank == 0:
        meta = {k: payload[k] for k in ("step", "tokens_seen", "model_config", "train_args",
                                        "world_size")}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        marker = checkpoint_dir / "latest.tmp"
        marker.write_text(final.name + "\n")
        os.replace(marker, checkpoint_dir / "latest")
    _barrier()
    return final


def find_checkpoint(resume: Optional[str], out_dir: Optional[Path]) -> Optional[Path]:
    """The step folder to resume from, or None to start fresh ('auto' with no checkpoint)."""
    if resume is None:
        return None
    if resume == "auto":
        marker = out_dir / "checkpoints" / "latest"
        return out_dir / "checkpoints" / marker.read_text().strip() if marker.exists() else None
    path = Path(resume)
    for root in (path, path / "checkpoints"):
        if (root / "latest").is_file():
            return root / (root / "latest").read_text().strip()
    if _rank_file(path, 0).is_file():
        return path
    raise TrainError(f"--resume {resume} is invalid: it is neither a checkpoint folder "
                            "(step_<N>/ with rank_*.pt files) nor a run or checkpoints/ folder "
                            "with a 'latest' marker")


def check_resumable(saved: dict, run: Run, step_dir: Path) -> None:
    """Refuse a checkpoint of another model, TP/world size or data stream, saying what differs."""
    problems = []
    current_cfg = _without_implementation_choices(dataclasses.asdict(run.cfg))
    saved_cfg = _without_implementation_choices(saved["model_config"])
    for key in sorted(set(current_cfg) | set(saved_cfg)):
        if json.dumps(current_cfg.get(key), default=str) != json.dumps(saved_cfg.get(key),
                                                                        default=str):
            problems.append(f"model config '{key}': checkpoint {saved_cfg.get(key)!r}, "
                            f"now {current_cfg.get(key)!r}")
    world = dist.get_world_size() if dist.is_initialized() else 1
    if saved["world_size"] != world:
        problems.append(f"number of processes: checkpoint {saved['world_size']}, now {world} "
                        "(launch with the checkpoint's NPROC)")
    defaults = build_parser()
    for key in RESUME_INVARIANT_ARGS:
        # A flag added after the checkpoint was written had its default value then.
        was = saved["train_args"].get(key, defaults.get_default(key))
        now = getattr(run.args, key)
        if was != now:
            problems.append(f"--{key.replace('_', '-')}: checkpoint {was!r}, now {now!r}")
    if problems:
        raise TrainError(f"cannot resume from {step_dir}: it was written by a different run.\n  "
                         + "\n  ".join(problems)
                         + "\nPass the checkpoint's values, or start a new --out-dir without "
                           "--resume.")


def _without_implementation_choices(cfg_dict: dict) -> dict:
    """The model config minus how it is computed (experts_impl, attention_impl,
    linear_backend), which may differ between machines resuming the same run."""
    out = {}
    for key, value in cfg_dict.items():
        if key.endswith("_impl") or key == "linear_backend":
            continue
        out[key] = _without_implementation_choices(value) if isinstance(value, dict) else value
    return out


def load_checkpoint(run: Run, step_dir: Path) -> None:
    rank = dist.get_rank() if dist.is_initialized() else 0
    path = _rank_file(step_dir, rank)
    if not path.is_file():
        raise TrainError(f"--resume: {path} is missing; was {step_dir} written with as "
                                "many processes as this run has?")
    saved = torch.load(path, map_location=run.device, weights_only=False)
    if saved.get("format") != CHECKPOINT_FORMAT:
        raise TrainError(f"{path} has checkpoint format {saved.get('format')}, this code reads "
                         f"{CHECKPOINT_FORMAT}")
    check_resumable(saved, run, step_dir)
    run.model.load_state_dict(saved["model"])
    run.optimizer.load_state_dict(saved["optimizer"])
    _set_rng_states(saved["rng"], run.device)
    run.step, run.tokens_seen = saved["step"], saved["tokens_seen"]
    run.wandb_id = saved["wandb_id"]
