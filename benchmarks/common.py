"""What the benchmark scripts share: the device (choosing it, synchronising it, its peak memory,
freeing it), the timing loop, Megatron's CUDA seed, the distributed set-up of a torchrun script,
and the JSON result (its header and the line printed / saved by `--json-out`).

A script makes the repository importable itself, before importing this module:

  REPO = Path(__file__).resolve().parents[1]
  sys.path.insert(0, str(REPO))
  from benchmarks.common import ...  # noqa: E402

which works for `python benchmarks/x.py`, `torchrun benchmarks/x.py` and a test loading the
script from its file (`importlib.util.spec_from_file_location`).
"""

from __future__ import annotations

import gc
import json
import os
import resource
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist


# ----------------------------------------------------------------------------------------------
# The device
# ----------------------------------------------------------------------------------------------
def resolve_device(requested: str) -> str:
    """`--device auto` -> cuda when a GPU is visible, else cpu; cpu and cuda stay."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def prepare_rank_device(requested: str) -> str:
    """`resolve_device` for one rank of a torchrun job. On CPU: no TorchDynamo (Megatron's
    jit_fuser) and the host's cores shared among the node's ranks; cuda without a GPU fails."""
    device = resolve_device(requested)
    if device == "cpu":
        os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # Megatron's jit_fuser on CPU
        torch.set_num_threads(max(1, (os.cpu_count() or 1)
                                  // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    elif not torch.cuda.is_available():
        raise SystemExit("--device cuda: no GPU is visible; use --device cpu for a logic check")
    return device


def sync(device: torch.device, *, barrier: bool = False) -> None:
    """Wait for the work queued on `device`; `barrier`: then for every rank of the world."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    if barrier:
        dist.barrier()


def peak_gib(device: torch.device) -> float:
    """Peak allocated GPU memory since the last reset; on CPU the process's max RSS (which
    never resets: meaningless per measurement)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def empty_cache(device: torch.device) -> None:
    """The CUDA caching allocator's free blocks back to the device."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def free_memory(device: torch.device) -> None:
    """Collect unreachable objects (reference cycles), then `empty_cache`."""
    gc.collect()
    empty_cache(device)


def seed_megatron_cuda_rng(seed: int, device: torch.device) -> None:
    """Reseed Megatron's CUDA RNG tracker, which the model's initialisers draw from on GPU (its
    expert stream depends on the EP rank only); on CPU they draw from torch's global generator,
    and this does nothing."""
    if device.type == "cuda":
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(seed)


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------
def time_steps(step_fn: Callable[[], object], steps: int, warmup: int, device: torch.device, *,
               barrier: bool = False, reset_peak_after_warmup: bool = False) -> list[float]:
    """Wall time of each of `steps` calls of `step_fn` after `warmup` untimed ones, the device
    synchronised before and after each. `barrier`: the ranks aligned too, so that a step lasts
    as long as its slowest rank. `reset_peak_after_warmup`: `peak_gib` then covers the timed
    steps only (not when `warmup` is 0)."""
    times = []
    for i in range(warmup + steps):
        sync(device, barrier=barrier)
        start = time.perf_counter()
        step_fn()
        sync(device, barrier=barrier)
        if i >= warmup:
            times.append(time.perf_counter() - start)
        if reset_peak_after_warmup and i == warmup - 1:
            reset_peak(device)
    return times


def mean_seconds(fn: Callable[[], object], repeat: int, device: torch.device,
                 warmup: int = 1) -> float:
    """Mean wall time of `repeat` back-to-back calls of `fn` after `warmup` untimed calls, the
    device synchronised only before and after them (what a kernel costs in a stream of
    launches). A compiled function with CUDA graphs wants warmup >= 3: its first calls compile,
    run eager and record the graphs, each far slower than a replay."""
    for _ in range(warmup):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync(device)
    return (time.perf_counter() - start) / repeat


# ----------------------------------------------------------------------------------------------
# Distributed set-up of a torchrun script
# ----------------------------------------------------------------------------------------------
@contextmanager
def distributed(device: str, seed: int, **parallel_sizes) -> Iterator[tuple]:
    """`init_distributed` (TP = 1, `parallel_sizes` as its keyword arguments; gloo on cpu) for
    the body, `shutdown_distributed` after it; yields (process groups, this rank's device)."""
    from megatron_dsv3.parallel import init_distributed, shutdown_distributed

    pg = init_distributed(tensor_parallel_size=1, backend="gloo" if device == "cpu" else None,
                          seed=seed, **parallel_sizes)
    rank_device = (torch.device("cuda", torch.cuda.current_device()) if device == "cuda"
                   else torch.device("cpu"))
    try:
        yield pg, rank_device
    finally:
        shutdown_distributed()


# ----------------------------------------------------------------------------------------------
# The JSON result
# ----------------------------------------------------------------------------------------------
def result_header(device: torch.device) -> dict:
    """The first keys of every result: date, torch version, device name."""
    return {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}


def write_json(path: Path, results: dict) -> None:
    """`results` as one JSON line in `path` (its folder created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results) + "\n")


def emit_json(results: dict, path: Optional[Path] = None) -> None:
    """`results` as one JSON line on stdout, and in `path` when given (`--json-out`)."""
    print(json.dumps(results))
    if path:
        write_json(path, results)
