"""One tolerance policy, one difference helper, and a gloo multi-process runner for tests.

Tolerance policy (used by every test here):
  * exact (`assert_equal`) wherever both sides run the same operations in the same order;
  * otherwise `assert_close` on the relative error max|a - b| / max|b| (a scale-free number
    that is not fooled by tiny elements), with a bound that the test justifies in `why`:
      FP32_REORDER = 1e-5   fp32, same math, different summation order or fused kernels
      BF16 = 2e-2           bf16 storage (8 mantissa bits)
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import traceback
from typing import Callable

import torch

FP32_REORDER = 1e-5
BF16 = 2e-2


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().double(), expected.detach().double()
    if actual.shape != expected.shape:
        raise AssertionError(f"shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    scale = expected.abs().max().item()
    diff = (actual - expected).abs().max().item() if actual.numel() else 0.0
    return diff / scale if scale > 0 else diff


def assert_close(actual: torch.Tensor, expected: torch.Tensor, bound: float, why: str,
                 name: str = "") -> float:
    """Relative error below `bound`; `why` says where the difference may come from."""
    err = relative_error(actual, expected)
    if not err <= bound:
        raise AssertionError(f"{name}: relative error {err:.3e} exceeds {bound:.1e} ({why})")
    return err


def assert_equal(actual: torch.Tensor, expected: torch.Tensor, name: str = "") -> None:
    if not torch.equal(actual, expected):
        err = relative_error(actual.float(), expected.float())
        raise AssertionError(f"{name}: not bit-identical (relative error {err:.3e})")


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, queue) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      CUDA_VISIBLE_DEVICES="", TORCHDYNAMO_DISABLE="1")
    torch.set_num_threads(1)
    try:
        # Results travel as torch.save bytes: tensors put on a queue directly would be
        # shared through file descriptors that die with this process.
        buffer = io.BytesIO()
        torch.save(fn(rank, world_size, *args), buffer)
        queue.put((rank, "ok", buffer.getvalue()))
    except BaseException:  # noqa: BLE001 - the parent re-raises with the traceback
        queue.put((rank, "error", traceback.format_exc()))


def run_gloo(fn: Callable, world_size: int, *args, timeout_s: float = 600.0) -> list:
    """Run fn(rank, world_size, *args) in `world_size` CPU processes; return their results
    in rank order. fn initialises its own process group (e.g. `parallel.init_distributed`)
    from the environment set here, and must be a module-level (picklable) function."""
    from .parallel import _free_port

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue))
             for r in range(world_size)]
    for proc in procs:
        proc.start()
    results: dict[int, object] = {}
    errors = []
    try:
        for _ in range(world_size):
            rank, status, payload = queue.get(timeout=timeout_s)
            if status == "error":
                errors.append(f"rank {rank}:\n{payload}")
                break
            results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
    finally:
        for proc in procs:
            proc.join(timeout=5 if errors else timeout_s)
            if proc.is_alive():
                proc.kill()
    if errors:
        raise RuntimeError("a gloo worker failed\n" + "\n".join(errors))
    return [results[r] for r in range(world_size)]
