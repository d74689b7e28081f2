"""Checkpoints of the training job: one torch file per rank, verified, published atomically.

`checkpoints/step_<N>/rank_<r>.pt` holds everything a resumed run needs to repeat an
uninterrupted one bit for bit on CPU: the weights (with the routers' `expert_bias`; with PP
this rank's two stages), the AdamW state, step, tokens seen and every RNG state (torch, Python,
NumPy; on GPU the CUDA generator and Megatron's CUDA RNG tracker). Beside them `meta.json` (the
config a resume must match, read before the model is built) and `manifest.json`: every file's
size and digest (sha256 of the sha256s of its 64 MiB blocks, hashed on several threads in one
streaming read of the file just written).

Saving. Nothing non-finite is saved: a NaN or Inf in any rank's weights or AdamW state refuses
the save (`TrainError` naming the step, the rank and the tensor) and `latest` stays where it was.
The files are written to `step_<N>.tmp/`, the manifest last, then the folder is renamed to
`step_<N>` and the `latest` marker replaced by a rename (`_publish`). Every crash leaves `latest`
on a complete checkpoint, or (one window of a re-save of the step it names) naming a folder that
is gone while the complete `step_<N>` is there for the fallback below to take. No fsync: after a
power loss a checkpoint the kernel had not written fails its digest and is skipped.

Resuming (`find_checkpoint`). A step folder named explicitly must verify, or the resume stops
naming the folder and what is wrong. `--resume auto`, a run folder or a checkpoints/ folder take
`latest` if it verifies, else the newest step folder that does (none newer than the one `latest`
names: a run resumed from an older step left those behind), with a warning naming each folder
skipped and why; none intact is an error. Every rank checks its own file's digest and the
results are gathered, so all ranks agree on the folder. `load_checkpoint` then refuses a file
holding a NaN or Inf. Folders without a manifest were written before checkpoints carried one:
they load (their payload format is unchanged, CHECKPOINT_FORMAT 1) with a warning that they
cannot be verified.

A resume refuses a checkpoint of another model config, number of processes or data stream
(`RESUME_INVARIANT_ARGS`), saying what differs, from `meta.json` before anything is built (with
--preset left out the model config is the checkpoint's own, args.py: how a run started with
--init-from resumes); and a run never starts in a folder holding another run (`check_out_dir`);
--init-from with --resume auto over a run is refused, naming both flags.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
import sys
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist

from ..checkpoint.digest import (DIGEST_DESCRIPTION, MANIFEST, all_gather_from_ranks,
                                 file_digest, file_entry)
from .args import IMPLEMENTATION_CHOICES, TrainError, build_parser, config_without
from .step import Run

CHECKPOINT_FORMAT = 1  # of the rank files' payload
MANIFEST_FORMAT = 1
META, LATEST = "meta.json", "latest"
_STEP_FOLDER = re.compile(r"step_(\d+)")
_LATEST_TARGET = re.compile(r"step_(\d+)(\.tmp)?")  # a re-save points `latest` at its .tmp
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


# How an optimizer's step runs, not what it has learnt: kept as this run built it when a state
# from another run is loaded (torch's load_state_dict takes the saved groups' values)
_IMPLEMENTATION_KEYS = ("fused", "foreach", "capturable", "differentiable")


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """`optimizer.load_state_dict(state)`, keeping this run's choice of implementation: a
    checkpoint of a bf16 run (MasterAdamW, unfused) loads into an fp32 run's fused AdamW on a
    GPU without turning it into the slow single-tensor loop, and the other way round."""
    built = [{k: g[k] for k in _IMPLEMENTATION_KEYS if k in g} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, keep in zip(optimizer.param_groups, built):
        group.update(keep)


def _set_rng_states(states: dict, device: torch.device) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    if device.type == "cuda" and "cuda" in states:
        from megatron.core.tensor_parallel import get_cuda_rng_tracker

        torch.cuda.set_rng_state(states["cuda"], device)
        get_cuda_rng_tracker().set_states(states["megatron_cuda_tracker"])


# ----------------------------------------------------------------------------------------------
# Ranks agreeing (every helper works without torch.distributed too: a world of one)
# ----------------------------------------------------------------------------------------------
def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _decided_on_rank0(fn: Callable, *args):
    """fn(*args) evaluated on rank 0 only; every rank returns its result, or raises its error
    (a TrainError or OSError there becomes the same TrainError everywhere, no rank left
    waiting)."""
    box = [None, None]
    if _rank() == 0:
        try:
            box[0] = fn(*args)
        except (TrainError, OSError) as err:
            box[1] = str(err)
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        raise TrainError(box[1])
    return box[0]


def _warn(message: str) -> None:
    if _rank() == 0:
        print(f"warning: {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# Digests and the finite check
# ----------------------------------------------------------------------------------------------
def _floating_tensors(prefix: str, obj) -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() or obj.is_complex():
            yield prefix, obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from _floating_tensors(f"{prefix}.{key}", value)
    elif isinstance(obj, (list, tuple)):
        for index, value in enumerate(obj):
            yield from _floating_tensors(f"{prefix}.{index}", value)


def first_non_finite(payload: dict) -> Optional[str]:
    """The name of the first tensor of the payload's model or optimizer state that holds a NaN
    or an Inf ('model.<parameter>', 'optimizer.state.<index>.<exp_avg...>'), or None."""
    named = [*_floating_tensors("model", payload.get("model", {})),
             *_floating_tensors("optimizer", payload.get("optimizer", {}))]
    # A NaN or Inf anywhere makes the sum non-finite, so a finite sum proves a tensor finite; the
    # sum reads the tensor at memory speed (torch.isfinite(t).all() is 50x slower on CPU). A
    # non-finite sum is confirmed element-wise: finite values may overflow it.
    by_device: dict = {}  # one host sync per device, not one per tensor
    for index, (_, tensor) in enumerate(named):
        by_device.setdefault(tensor.device, []).append((index, torch.isfinite(tensor.sum())))
    suspects = sorted(index for flags in by_device.values()
                      for (index, _), ok in zip(flags, torch.stack([f for _, f in flags]).tolist(),
                                                strict=True)
                      if not ok)
    return next((named[i][0] for i in suspects if not torch.isfinite(named[i][1]).all()), None)


# ----------------------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------------------
def checkpoint_payload(run: Run) -> dict:
    return {
        "format": CHECKPOINT_FORMAT,
        "step": run.step,
        "tokens_seen": run.tokens_seen,
        "model": run.model_state_dict(),  # fp32 weights, whatever the parameters' dtype
        "optimizer": run.optimizer.state_dict(),
        "rng": _rng_states(run.device),
        "model_config": dataclasses.asdict(run.cfg),
        "train_args": {k: (str(v) if isinstance(v, Path) else v)
                       for k, v in vars(run.args).items()},
        "world_size": dist.get_world_size() if dist.is_initialized() else 1,
        "wandb_id": run.wandb_id,
    }


def save_checkpoint(checkpoint_dir: Path, step: int, payload: dict, *, rank: int = 0) -> Path:
    """Write `step_<step>/` with one file per rank, its meta.json and manifest.json, then point
    `latest` at it (every rank calls it with its own payload).

    Refused (TrainError, nothing written, `latest` unmoved) if any rank's weights or AdamW state
    hold a NaN or Inf. A rank that cannot write its file raises its OSError, the others a
    TrainError naming it. Crash-safe: see `_publish`."""
    _refuse_non_finite(payload, step, checkpoint_dir, rank)
    final, staging = checkpoint_dir / f"step_{step}", checkpoint_dir / f"step_{step}.tmp"
    if rank == 0:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        _finish_interrupted_publish(checkpoint_dir)  # `latest` may name a staging folder
        for stale in checkpoint_dir.glob("step_*.tmp"):  # crashed saves' (`latest` names none)
            shutil.rmtree(stale, ignore_errors=True)
        staging.mkdir()
    _barrier()
    path = _rank_file(staging, rank)
    partial = path.with_suffix(".partial")
    error: Optional[OSError] = None
    try:
        torch.save(payload, partial)
        entry = file_entry(partial)
        os.replace(partial, path)
    except OSError as err:
        error, entry = err, None
    written = all_gather_from_ranks((path.name, entry, None if error is None else f"rank {rank}: {error}"))
    if error is not None:
        raise error
    failures = [failure for _, _, failure in written if failure]
    if failures:
        raise TrainError(f"the checkpoint of step {step} was not saved to {checkpoint_dir}: "
                         + "; ".join(failures) + "; 'latest' is unchanged")
    if rank == 0:
        meta = {k: payload[k] for k in ("step", "tokens_seen", "model_config", "train_args",
                                        "world_size")}
        meta["manifest_format"] = MANIFEST_FORMAT  # this folder has a manifest: never skip it
        (staging / META).write_text(json.dumps(meta, indent=1, default=str))
        files = {META: file_entry(staging / META)}
        files.update((name, entry) for name, entry, _ in written)
        manifest = {"manifest_format": MANIFEST_FORMAT, "step": step, "world_size": len(written),
                    "digest": DIGEST_DESCRIPTION,
                    "files": files}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1))  # last: complete now
        _publish(checkpoint_dir, staging, final)
    _barrier()
    return final


def _refuse_non_finite(payload: dict, step: int, checkpoint_dir: Path, rank: int) -> None:
    bad = first_non_finite(payload)
    reports = [r for r in all_gather_from_ranks(None if bad is None else f"rank {rank}'s {bad}") if r]
    if reports:
        more = f" (and on {len(reports) - 1} other ranks)" if len(reports) > 1 else ""
        raise TrainError(
            f"refusing to save the checkpoint of step {step} to {checkpoint_dir}: "
            f"{reports[0]} holds NaN or Inf{more}. The run diverged at or before step {step}; "
            "'latest' stays on the last finite checkpoint: resume from it (--resume auto), e.g. "
            "with a lower --lr or --clip-grad")


def _latest_name(checkpoint_dir: Path) -> Optional[str]:
    marker = checkpoint_dir / LATEST
    try:
        return marker.read_text().strip() if marker.is_file() else None
    except (OSError, UnicodeDecodeError):
        return None


def _point_latest_at(checkpoint_dir: Path, name: str) -> None:
    marker = checkpoint_dir / f"{LATEST}.tmp"
    marker.write_text(name + "\n")
    os.replace(marker, checkpoint_dir / LATEST)


def _publish(checkpoint_dir: Path, staging: Path, final: Path) -> None:
    """Rename the complete `staging` folder to `final` and point `latest` at it.

    A crash between any two operations leaves `latest` on a complete folder, but for one window:
    `latest` names the staging folder just renamed to `final`, and `find_checkpoint` falls back
    to `final` itself, complete and of the same step."""
    if final.exists():  # a re-save: never delete the folder `latest` names
        if _latest_name(checkpoint_dir) == final.name:
            _point_latest_at(checkpoint_dir, staging.name)
        shutil.rmtree(final)
    os.replace(staging, final)
    _point_latest_at(checkpoint_dir, final.name)


def _finish_interrupted_publish(checkpoint_dir: Path) -> None:
    """A save that crashed inside `_publish` left `latest` on its complete staging folder:
    publish that one first, so that clearing this save's staging folder deletes nothing that
    `latest` names."""
    name = _latest_name(checkpoint_dir)
    match = _LATEST_TARGET.fullmatch(name or "")
    if match and match[2] and (checkpoint_dir / name).is_dir():
        _publish(checkpoint_dir, checkpoint_dir / name, checkpoint_dir / f"step_{match[1]}")


# ----------------------------------------------------------------------------------------------
# Verifying and finding the checkpoint to resume from
# ----------------------------------------------------------------------------------------------
def verify_checkpoint(step_dir: Path, rank: Optional[int] = None) -> list[str]:
    """What is wrong with the step folder; [] if it is intact (or has no manifest: written
    before checkpoints carried one, it cannot be verified).

    rank None: every file. rank r: what rank r of a resuming job checks, so that together the
    ranks read each file once: rank 0 the manifest and every file's size, and its meta.json;
    each rank its own file's digest. A rank file the manifest does not list (another number of
    processes) is left to `check_resumable`."""
    checks_folder = rank is None or rank == 0
    try:
        manifest = json.loads((step_dir / MANIFEST).read_text())
        files = {name: {"bytes": int(entry["bytes"]),
                        "sha256_of_blocks": str(entry["sha256_of_blocks"])}
                 for name, entry in manifest["files"].items()}
    except FileNotFoundError:
        if _is_unverifiable(step_dir):
            return []
        return [f"no {MANIFEST}: its save did not complete"] if checks_folder else []
    except (OSError, ValueError, KeyError, TypeError) as err:
        return [f"{MANIFEST} is unreadable ({err})"] if checks_folder else []
    problems = []
    if checks_folder:
        for name, entry in files.items():
            problem = _size_problem(step_dir / name, entry["bytes"])
            if problem:
                problems.append(problem)
    own = (list(files) if rank is None
           else [_rank_file(step_dir, rank).name] + ([META] if rank == 0 else []))
    for name in own:
        path = step_dir / name
        if name not in files or _size_problem(path, files[name]["bytes"]):
            continue  # not this run's rank, or its size is already reported
        try:
            digest = file_digest(path)
        except OSError as err:
            problems.append(f"{name} cannot be read ({err})")
            continue
        if digest != files[name]["sha256_of_blocks"]:
            problems.append(f"{name}: its contents differ from the digest in {MANIFEST} (the "
                            "file was damaged or changed after it was written)")
    return problems


def _size_problem(path: Path, expected: int) -> Optional[str]:
    if not path.is_file():
        return f"{path.name} is missing"
    size = path.stat().st_size
    if size != expected:
        return f"{path.name} is truncated or overwritten: {size} bytes, {expected} when saved"
    return None


def _is_unverifiable(step_dir: Path) -> bool:
    """A folder written before checkpoints carried a manifest: its meta.json (which since then
    says `manifest_format`) and rank files, no manifest."""
    if (step_dir / MANIFEST).exists() or not _rank_file(step_dir, 0).is_file():
        return False
    try:
        return "manifest_format" not in json.loads((step_dir / META).read_text())
    except (OSError, ValueError):
        return False


def _verified_by_every_rank(step_dir: Path) -> list[str]:
    """verify_checkpoint over all ranks, each checking its share; the same list on every rank."""
    problems = []
    for rank_problems in all_gather_from_ranks(verify_checkpoint(step_dir, _rank())):
        problems += [p for p in rank_problems if p not in problems]
    return problems


def _step_folders(root: Path) -> list[tuple[int, Path]]:
    """The published step folders in `root`, the newest first."""
    if not root.is_dir():
        return []
    found = [(int(m[1]), p) for p in root.iterdir()
             if p.is_dir() and (m := _STEP_FOLDER.fullmatch(p.name))]
    return sorted(found, reverse=True)


def _locate(resume: str, out_dir: Optional[Path]) -> tuple[Optional[Path], Optional[Path]]:
    """(checkpoints folder to search, None), or (None, the step folder --resume names)."""
    if resume == "auto":
        return out_dir / "checkpoints", None
    path = Path(resume)
    for root in (path, path / "checkpoints"):
        if (root / LATEST).is_file() or _step_folders(root):
            return root, None
    if path.is_dir() and any((path / name).exists()
                             for name in (MANIFEST, META, _rank_file(path, 0).name)):
        return None, path
    raise TrainError(f"--resume {resume} is invalid: it is neither a checkpoint folder "
                     "(step_<N>/ with rank_*.pt files) nor a run or checkpoints/ folder "
                     "with a 'latest' marker or step folders")


def _candidates(root: Path) -> tuple[list[Path], list[str]]:
    """The step folders to try in order: the one `latest` names, then the others from the
    newest, none newer than latest's step; and notes on what `latest` names but cannot be
    tried."""
    notes, named, newest = [], None, None
    name = _latest_name(root)
    if name is not None:
        match = _LATEST_TARGET.fullmatch(name)
        if match is None:
            notes.append(f"{root / LATEST}: names {name!r}, not a step folder")
        else:
            newest = int(match[1])
            if (root / name).is_dir():
                named = root / name
            else:
                notes.append(f"{root / name}: missing, though '{LATEST}' names it")
    others = [p for step, p in _step_folders(root)
              if p != named and (newest is None or step <= newest)]
    return ([named] if named else []) + others, notes


def find_checkpoint(resume: Optional[str], out_dir: Optional[Path]) -> Optional[Path]:
    """The verified step folder to resume from, the same on every rank; None to start fresh
    ('auto' and no checkpoint in out_dir/checkpoints). See the module's "Resuming"."""
    if resume is None:
        return None
    root, named = _decided_on_rank0(_locate, resume, out_dir)
    if named is not None:
        problems = _verified_by_every_rank(named)
        if problems:
            raise TrainError(f"--resume {resume}: the checkpoint {named} is damaged: "
                             + "; ".join(problems) + ". Resume from another one: an older "
                             "step folder, or the run folder (its newest intact checkpoint)")
        return _chosen(named, [], resume)
    candidates, skipped = _decided_on_rank0(_candidates, root)
    for step_dir in candidates:
        problems = _verified_by_every_rank(step_dir)
        if not problems:
            return _chosen(step_dir, skipped, resume)
        skipped.append(f"{step_dir}: " + "; ".join(problems))
    if skipped:
        raise TrainError(f"--resume {resume}: no intact checkpoint in {root}:\n  "
                         + "\n  ".join(skipped) + "\nResume from a copy of these checkpoints "
                         "(--resume <its folder>), or start a new --out-dir without --resume")
    return None


def _chosen(step_dir: Path, skipped: list[str], resume: str) -> Path:
    for note in skipped:
        _warn(f"--resume {resume}: skipped {note}")
    if skipped:
        _warn(f"--resume {resume}: resuming from {step_dir}, the newest intact checkpoint")
    if _is_unverifiable(step_dir):
        _warn(f"{step_dir} has no {MANIFEST} (it was written before checkpoints carried "
              "digests): its files cannot be verified; loading it as it is")
    return step_dir


def run_folder_of(resume: str) -> Path:
    """The run folder holding what --resume names (a run, checkpoints/ or step folder)."""
    path = Path(resume)
    if (path / "checkpoints").is_dir():
        return path
    if (path / LATEST).is_file() or _step_folders(path):
        return path.parent
    return path.parent.parent


def read_meta(step_dir: Path) -> dict:
    try:
        return json.loads((step_dir / META).read_text())
    except (OSError, ValueError) as err:
        raise TrainError(f"cannot resume from {step_dir}: its {META} is unreadable ({err})"
                         ) from err


# ----------------------------------------------------------------------------------------------
# What a resume must match; where a run may start
# ----------------------------------------------------------------------------------------------
def check_resumable(saved: dict, cfg, args, step_dir: Path) -> None:
    """Refuse a checkpoint of another model, TP/world size or data stream, saying what differs.

    `saved` is the checkpoint's payload or its meta.json (what setup reads before building the
    model); `cfg` and `args` are the run's."""
    problems = []
    # the model minus how it is computed, which may differ between machines or phases
    # resuming the same run (the same weights in other GEMMs)
    current_cfg = config_without(dataclasses.asdict(cfg), IMPLEMENTATION_CHOICES)
    saved_cfg = config_without(saved["model_config"], IMPLEMENTATION_CHOICES)
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
        now = getattr(args, key)
        if was != now:
            problems.append(f"--{key.replace('_', '-')}: checkpoint {was!r}, now {now!r}")
    if problems:
        raise TrainError(f"cannot resume from {step_dir}: it was written by a different run.\n  "
                         + "\n  ".join(problems)
                         + "\nPass the checkpoint's values (leave --preset out to take the "
                           "checkpoint's model config), or start a new --out-dir without "
                           "--resume.")


def _run_files(out_dir: Path) -> list[str]:
    """What in `out_dir` belongs to a run: a metrics.jsonl with records, a non-empty
    checkpoints/ (a run that stopped before its first step left neither)."""
    held = []
    metrics = out_dir / "metrics.jsonl"
    if metrics.is_file():
        steps = sum(1 for line in metrics.read_text().splitlines() if line.strip())
        if steps:
            held.append(f"metrics.jsonl with {steps} steps")
    checkpoints = out_dir / "checkpoints"
    if checkpoints.is_dir():
        names = sorted(p.name for p in checkpoints.iterdir())
        if names:
            held.append("checkpoints/ with " + ", ".join(names[:6])
                        + (", ..." if len(names) > 6 else ""))
    return held


def check_out_dir(out_dir: Path, resume: Optional[str], step_dir: Optional[Path]) -> None:
    """Refuse to start in a folder that holds another run (it would rewrite its metrics.jsonl
    and move its `latest`), naming what is there and the fixes. Continuing the run of the folder
    (resuming from its own checkpoints) and starting in an empty or missing folder are fine."""
    held = _run_files(out_dir)
    if not held:
        return
    if step_dir is not None and step_dir.parent.parent.resolve() == out_dir.resolve():
        return
    what = f"--out-dir {out_dir} holds a run ({'; '.join(held)})"
    if resume is None:
        raise TrainError(f"{what}: starting a new one there would overwrite it. Pass --resume "
                         "auto to continue it, or a new --out-dir to start another run")
    if resume == "auto":
        raise TrainError(f"{what} but no checkpoint to resume from (it stopped before its first "
                         "save): pass a new --out-dir to start another run, or remove those "
                         "files to start again in this folder")
    raise TrainError(f"{what}, and --resume {resume} is a checkpoint of another folder: pass "
                     "--resume auto to continue the run in --out-dir, or a new --out-dir to "
                     f"continue {resume} there")


def checkpoint_to_resume(args, cfg, out_dir: Path) -> Optional[Path]:
    """The verified step folder the run resumes from (None: a fresh start), after refusing an
    --out-dir holding another run and a checkpoint of another config: all of it before the
    corpus is read or the model built, and the same decision on every rank."""
    step_dir = find_checkpoint(args.resume, out_dir)
    if step_dir is not None and getattr(args, "init_from", None) is not None:
        raise TrainError(f"--init-from {args.init_from} and --resume {args.resume}: --out-dir "
                         f"{out_dir} holds a run to resume ({step_dir}), and --init-from starts "
                         "a new one from the file. Drop --init-from to continue that run (its "
                         "checkpoints hold the model config), or pass a new --out-dir to start "
                         "from the file")
    _decided_on_rank0(check_out_dir, out_dir, args.resume, step_dir)
    if step_dir is not None:
        check_resumable(_decided_on_rank0(read_meta, step_dir), cfg, args, step_dir)
    return step_dir


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------
def load_checkpoint(run: Run, step_dir: Path) -> None:
    """Load this rank's file of `step_dir` into the run; every rank refuses (TrainError) if any
    rank's file is missing, unreadable, of another format or holds a NaN or Inf."""
    rank = _rank()
    path = _rank_file(step_dir, rank)
    saved, problem = None, None
    if not path.is_file():
        problem = (f"{path} is missing; was {step_dir} written with as many processes as this "
                   "run has?")
    else:
        try:  # on the CPU: RNG states must be CPU tensors; the model's copy_ moves the rest
            saved = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err:  # noqa: BLE001 -- a damaged file fails in many ways
            problem = f"{path} cannot be loaded ({type(err).__name__}: {err})"
    if saved is not None and saved.get("format") != CHECKPOINT_FORMAT:
        problem = (f"{path} has checkpoint format {saved.get('format')}, this code reads "
                   f"{CHECKPOINT_FORMAT}")
    elif saved is not None and (bad := first_non_finite(saved)):
        problem = f"{path}: {bad} holds NaN or Inf"
    problems = [p for p in all_gather_from_ranks(problem) if p]
    if problems:
        raise TrainError(f"cannot resume from {step_dir}: " + "; ".join(problems)
                         + ". Pass an older step folder to --resume")
    check_resumable(saved, run.cfg, run.args, step_dir)
    run.load_model_state_dict(saved["model"])
    load_optimizer_state(run.optimizer, saved["optimizer"])
    _set_rng_states(saved["rng"], run.device)
    run.step, run.tokens_seen = saved["step"], saved["tokens_seen"]
    run.wandb_id = saved["wandb_id"]
