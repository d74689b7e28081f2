"""How the model is sharded, apart from what it computes.

  init_distributed(tp)        torch.distributed (gloo on CPU, NCCL on GPU) + Megatron's groups
  shard_state_dict(full, model)   the slice of a full (TP=1) state dict this rank's model holds
  gather_state_dict(model)    the full tensors from every TP rank's slices (values or grads)

Which dimension of a parameter is split, and with which stride, is read from Megatron's own
parameter metadata (`tensor_model_parallel`, `partition_dim`, `partition_stride`), which
Megatron's parallel layers and ours (`layers.mark_tensor_parallel`) set. A stride-s split cuts
the full dimension into s * tp chunks and gives rank r chunks r, r + tp, ... (so a fused
[gate; up] weight keeps [gate_r; up_r] on rank r).
"""

from __future__ import annotations

import datetime
import os
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.process_groups_config import ProcessGroupCollection


def init_distributed(tensor_parallel_size: int = 1, *, backend: Optional[str] = None,
                     seed: int = 1234, timeout_s: int = 600) -> ProcessGroupCollection:
    """Initialise torch.distributed from the launcher's environment (torchrun sets RANK,
    WORLD_SIZE, MASTER_ADDR/PORT; a plain `python` run is a world of one) and Megatron's
    tensor/data-parallel groups. Returns the process groups the model takes.

    On GPU, Megatron's parallel layers initialise their weights under its CUDA RNG tracker,
    which is seeded here (`seed`); on CPU they draw from torch's global generator."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world_size % tensor_parallel_size != 0:
        raise ValueError(f"tensor_parallel_size={tensor_parallel_size} is invalid: it must "
                         f"divide the number of processes WORLD_SIZE={world_size}")
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        dist.init_process_group(backend or ("nccl" if use_cuda else "gloo"), rank=rank,
                                world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tensor_parallel_size)
    if use_cuda:
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(seed)
    return ProcessGroupCollection.use_mpu_process_groups()


def shutdown_distributed() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _split_spec(param: torch.Tensor) -> Optional[tuple[int, int]]:
    if getattr(param, "tensor_model_parallel", False):
        return param.partition_dim, getattr(param, "partition_stride", 1)
    return None


def shard_tensor(full: torch.Tensor, dim: int, stride: int, rank: int, size: int) -> torch.Tensor:
    chunks = full.chunk(stride * size, dim=dim)
    return torch.cat(chunks[rank::size], dim=dim)


def unshard_tensor(parts: list[torch.Tensor], dim: int, stride: int) -> torch.Tensor:
    """Inverse of `shard_tensor` given every rank's slice in rank order."""
    pieces = [part.chunk(stride, dim=dim) for part in parts]
    return torch.cat([pieces[r][s] for s in range(stride) for r in range(len(parts))], dim=dim)


@torch.no_grad()
def shard_state_dict(full_state_dict: dict, model: torch.nn.Module, tp_group) -> dict:
    """This TP rank's state dict from a full one (keys as in `model.state_dict()`)."""
    rank, size = tp_group.rank(), tp_group.size()
    params = dict(model.named_parameters())
    local = {}
    for name, value in model.state_dict().items():
        if name not in full_state_dict:
            continue
        full = full_state_dict[name]
        spec = _split_spec(params[name]) if name in params else None
        local[name] = full if spec is None else shard_tensor(full, spec[0], spec[1], rank, size)
        if local[name].shape != value.shape:
            raise ValueError(f"{name}: shard shape {tuple(local[name].shape)} does not match the "
                             f"model's {tuple(value.shape)}; was the full state dict built for "
                             "the same config?")
    return local


@torch.no_grad()
def gather_state_dict(model: torch.nn.Module, tp_group, *, grads: bool = False) -> dict:
    """Full tensors of every parameter (or its gradient) assembled from all TP ranks."""
    out = {}
    for name, param in model.named_parameters():
        tensor = param.grad if grads else param.data
        if tensor is None:
            continue
        spec = _split_spec(param)
        if spec is None or tp_group.size() == 1:
            out[name] = tensor.detach().clone()
            continue
        parts = [torch.empty_like(tensor) for _ in range(tp_group.size())]
        dist.all_gather(parts, tensor.contiguous(), group=tp_group)
        out[name] = unshard_tensor(parts, spec[0], spec[1])
    return out
