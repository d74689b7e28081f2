"""What a GRPO checkpoint holds, saved and found through the training job's safe checkpoints.

Saving is train/checkpoint.py's `save_checkpoint`: one file per rank in
`checkpoints/step_<N>/`, a manifest of digests, published atomically, refused (nothing
written, `latest` unmoved) when any rank's weights or AdamW state hold a NaN or Inf. Finding
the one to resume from is its `find_checkpoint` (`latest` if it verifies, else the newest
intact step folder).

Each rank file holds the policy's FULL weights (gathered from the TP shards: every rank of a
TP group writes the same tensors), so a GRPO step folder reads like a TP = 1 training-job
checkpoint: `read_dsv3_checkpoint`, `python -m megatron_dsv3.inference --checkpoint`,
`python -m megatron_dsv3.train --init-from` and another GRPO run's --init-from take it. The
parallel sizes are therefore kept under "grpo_parallel", not in "train_args" (whose
tensor_parallel_size would mark the file as one rank's slice). Beside the weights: this
rank's AdamW state (of its shard), the step, the completion tokens trained on, the W&B id,
and the run's arguments. The reference model is not saved: it is the --init-from file, read
again on resume.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from ..train.args import TrainError
from ..train.checkpoint import (CHECKPOINT_FORMAT, first_non_finite, load_optimizer_state,
                                save_checkpoint)

PARALLEL_FLAGS = ("tensor_parallel_size",)
# What a resumed run must share with its checkpoint: the model it started from, the data
# stream (problems are drawn from seed and step), the world's layout.
RESUME_INVARIANT_ARGS = ("init_from", "seed", "prompts_per_step", "group_size",
                         "max_operand", "operators", "problem_style")


def _plain(value):
    return str(value) if isinstance(value, Path) else value


def save(out_dir: Path, step: int, *, policy_state: dict, optimizer, cfg, args,
         tokens_seen: int, wandb_id: Optional[str]) -> Path:
    """checkpoints/step_<step>/ (every rank calls it; see the module docstring)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    grpo_args = {k: _plain(v) for k, v in vars(args).items()}
    payload = {
        "format": CHECKPOINT_FORMAT,
        "kind": "grpo",
        "step": step,
        "tokens_seen": tokens_seen,
        "model": policy_state,
        "optimizer": optimizer.state_dict(),
        "model_config": dataclasses.asdict(cfg),
        "train_args": {k: v for k, v in grpo_args.items() if k not in PARALLEL_FLAGS},
        "grpo_parallel": {k: grpo_args[k] for k in PARALLEL_FLAGS},
        "world_size": dist.get_world_size() if dist.is_initialized() else 1,
        "wandb_id": wandb_id,
    }
    return save_checkpoint(out_dir / "checkpoints", step, payload, rank=rank)


def load(step_dir: Path, args) -> dict:
    """This rank's payload of a verified step folder, after refusing a file that is missing,
    of another format, not a GRPO checkpoint, non-finite, or of another run (its
    RESUME_INVARIANT_ARGS, its world size, its TP size); every rank refuses alike."""
    from ..checkpoint.digest import all_gather_from_ranks

    rank = dist.get_rank() if dist.is_initialized() else 0
    path = step_dir / f"rank_{rank:05d}.pt"
    saved, problem = None, None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 -- a missing or damaged file fails in many ways
        problem = f"{path} cannot be loaded ({type(err).__name__}: {err})"
    if saved is not None:
        problem = _problem(saved, path, args)
    problems = [p for p in all_gather_from_ranks(problem) if p]
    if problems:
        raise TrainError(f"cannot resume from {step_dir}: " + "; ".join(problems))
    return saved


def _problem(saved: dict, path: Path, args) -> Optional[str]:
    if saved.get("format") != CHECKPOINT_FORMAT or saved.get("kind") != "grpo":
        return (f"{path} is not a GRPO checkpoint of this code (format {saved.get('format')}, "
                f"kind {saved.get('kind')!r}); start a GRPO run from it with --init-from")
    bad = first_non_finite(saved)
    if bad:
        return f"{path}: {bad} holds NaN or Inf; pass an older step folder to --resume"
    differs = []
    for key in RESUME_INVARIANT_ARGS:
        was, now = saved["train_args"].get(key), _plain(getattr(args, key))
        if was != now:
            differs.append(f"--{key.replace('_', '-')}: checkpoint {was!r}, now {now!r}")
    for key in PARALLEL_FLAGS:
        was, now = saved["grpo_parallel"][key], getattr(args, key)
        if was != now:
            differs.append(f"--{key.replace('_', '-')}: checkpoint {was}, now {now}")
    world = dist.get_world_size() if dist.is_initialized() else 1
    if saved["world_size"] != world:
        differs.append(f"number of processes: checkpoint {saved['world_size']}, now {world}")
    if differs:
        return (f"{path} was written by a different run (" + "; ".join(differs)
                + "): pass the checkpoint's values, or start a new --out-dir")
    return None


def restore(saved: dict, policy, optimizer, pg) -> None:
    """Load a payload's full weights (this rank's TP slice) and its AdamW state."""
    from ..parallel import load_full_state_dict

    load_full_state_dict(policy, saved["model"], pg.tp, pg.ep)
    load_optimizer_state(optimizer, saved["optimizer"])
