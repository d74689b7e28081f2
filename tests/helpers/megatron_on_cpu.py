"""Megatron-Core's DistributedDataParallel and DistributedOptimizer on the CPU, in a process of
its own (one rank, gloo: run_gloo's, forked from a server that has imported torch and Megatron).

Megatron-Core 0.19.2 builds them for CUDA only (tensors made with device="cuda", a check of
`param.type()` for "torch.cuda.*", CUDA streams around the gradient reduction); the rank runs
them on the CPU under a TorchFunctionMode that moves those tensors to the CPU and with the
stream calls made no-ops. A test gives a body of code, run after that set-up with torch, the
distributed group and Megatron's DDP classes at hand (DDP, DistributedDataParallelConfig,
TransformerConfig, MegatronModule); an assertion failing in it fails the test with the rank's
traceback.
"""

from __future__ import annotations

import contextlib
import textwrap

import torch
from torch.overrides import TorchFunctionMode

from helpers.dist_save import results_queue_by_fork
from helpers.gloo import run_gloo


class _NoStream:
    def __getattr__(self, name):
        return lambda *args, **kwargs: None


class _OnCpu(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "cuda" in str(kwargs.get("device", "")):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            return func(*args).replace("torch.", "torch.cuda.", 1)
        if func is torch.Tensor.cuda:
            return args[0]
        return func(*args, **kwargs)


def _rank(rank: int, world_size: int, body: str) -> str:
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.cuda.current_stream = lambda *args, **kwargs: _NoStream()
    torch.cuda.stream = lambda *args, **kwargs: contextlib.nullcontext()
    _OnCpu().__enter__()
    from megatron.core.distributed import DistributedDataParallel as DDP
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.module import MegatronModule

    from megatron_dsv3.parallel import init_distributed

    init_distributed(backend="gloo")
    results_queue_by_fork()  # Megatron's torch_dist writer, without its 5 s spawn
    scope = {"torch": torch, "DDP": DDP, "DistributedDataParallelConfig":
             DistributedDataParallelConfig, "TransformerConfig": TransformerConfig,
             "MegatronModule": MegatronModule}
    exec(compile(textwrap.dedent(body), "<megatron_on_cpu body>", "exec"), scope)
    return "done"


def run_megatron_on_cpu(body: str, timeout_s: float = 300.0) -> None:
    """Run `body` (code, any indentation) on one rank with Megatron's DDP usable on the CPU;
    its failures fail the caller."""
    assert run_gloo(_rank, 1, body, timeout_s=timeout_s) == ["done"]
