"""How the model is sharded, apart from what it computes.

  init_distributed(tp, ep, pipeline_parallel_size=pp)
                              torch.distributed (gloo on CPU, NCCL on GPU) + Megatron's groups
  whole_model_groups(pg)      context: the groups to build the whole model with on a pipeline
                              rank (DualPipe / DualPipeV cut their stages from it)
  duplicate_group(group)      the same ranks on a new communicator (e.g. for MoE counts)
  from_rank0(value)           rank 0's value on every rank (a picklable object; as is alone)
  shard_state_dict(full, model, tp_group, ep_group)
                              the slice of a full (TP=1, EP=1) state dict this rank's model holds
  load_full_state_dict(model, full, tp_group, ep_group)
                              load that slice; an error names what does not fit
  gather_state_dict(model, tp_group, ep_group)
                              the full tensors from every TP/EP rank's slices (values or grads)

Which dimension of a parameter is split over TP, and with which stride, is read from Megatron's
own parameter metadata (`tensor_model_parallel`, `partition_dim`, `partition_stride`), which
Megatron's parallel layers and ours (`layers.mark_tensor_parallel`) set. A stride-s split cuts
the full dimension into s * tp chunks and gives rank r chunks r, r + tp, ... (so a fused
[gate; up] weight keeps [gate_r; up_r] on rank r). Routed-expert weights also carry
`expert_parallel = True` (`moe.experts.mark_expert_parallel`): their dim 0 indexes experts and
EP rank p holds the contiguous block p of P (independent of their TP split along another dim).

Rank layout: Megatron's own `initialize_model_parallel(TP, PP, EP)`, which carves the world in
the order tp-cp-ep-dp-pp (CP = 1, expert TP = TP), PP outermost:
    WORLD = PP x DP x TP,   rank = tp_rank + TP * (dp_rank + DP * pp_rank)
    dp_rank = ep_rank + EP * expt_dp_rank   (EP carved out of each stage's DP)
Each rank's groups (`ProcessGroupCollection`):
  tp       the TP consecutive ranks of one (pp, dp) position
  pp       the PP ranks of one (dp, tp) position, group rank = pipeline rank: one pipeline, whose
           ranks hold the stage chunks of DualPipe / DualPipeV (their p2p peers are group ranks)
  dp       replicas of this rank's non-expert weights: the DP ranks of one (pp, tp) position,
           i.e. the ranks holding the same stages (world / (TP * PP) of them); contains the EP group
  ep       ranks holding different experts of the same stages (EP consecutive DP ranks)
  expt_dp  replicas of one expert shard (DP / EP ranks of the same stages)
E.g. 4 processes, PP=2 x EP=2: pipelines {0, 2} and {1, 3}; stage ranks (dp = ep) {0, 1} and
{2, 3}; expt_dp of one rank each. PP=2 x TP=2: tp {0, 1} and {2, 3}; pipelines {0, 2}, {1, 3}.
With PP = 1 this is the TP x DP layout, the pp groups of one rank each.
"""

from __future__ import annotations

import copy
import datetime
import os
from contextlib import contextmanager
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.process_groups_config import ProcessGroupCollection

from .megatron_compat import one_pipeline_stage


def init_distributed(tensor_parallel_size: int = 1, expert_parallel_size: int = 1, *,
                     pipeline_parallel_size: int = 1, backend: Optional[str] = None,
                     seed: int = 1234, timeout_s: float = 600) -> ProcessGroupCollection:
    """Initialise torch.distributed from the launcher's environment (torchrun sets RANK,
    WORLD_SIZE, MASTER_ADDR/PORT; a plain `python` run is a world of one) and Megatron's
    tensor / pipeline / data / expert-parallel groups (expert TP = TP; layout in the module
    docstring). Returns the process groups the model takes: `.tp`, `.pp`, `.dp`, `.ep`,
    `.expt_dp`, `.tp_ep`, ...

    With pipeline_parallel_size > 1 Megatron's groups describe the pipeline, but the whole
    model is built on every rank and cut into DualPipe(V) stages: build it inside
    `whole_model_groups(pg)`.

    On GPU, Megatron's parallel layers initialise their weights under its CUDA RNG tracker,
    which is seeded here (`seed`); on CPU they draw from torch's global generator.

    `timeout_s` bounds how long a collective waits for its peers, on the world group and on
    every Megatron group (whose own default is 30 minutes): a rank that hangs becomes an error
    on the others (gloo raises RuntimeError "Timed out waiting ..."; NCCL's watchdog aborts
    the process) instead of a silent wait. Groups created later with `dist.new_group` and no
    timeout get torch's default (30 min gloo, 10 min NCCL), not this one."""
    if not timeout_s > 0:
        raise ValueError(f"timeout_s={timeout_s!r} is invalid: it must be a positive number of "
                         "seconds (how long a collective waits for its peers)")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    check_parallel_sizes(world_size, tensor_parallel_size, expert_parallel_size,
                         pipeline_parallel_size)
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if world_size == 1 and "TORCHELASTIC_RUN_ID" not in os.environ:
            # a plain process alone needs no agreed port: a MASTER_PORT left in the shell by
            # another job would only make the rendezvous fail with EADDRINUSE
            os.environ["MASTER_PORT"] = str(_free_port())
        elif "MASTER_PORT" not in os.environ:
            os.environ["MASTER_PORT"] = str(_free_port())
        dist.init_process_group(backend or ("nccl" if use_cuda else "gloo"), rank=rank,
                                world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tensor_parallel_size,
            pipeline_model_parallel_size=pipeline_parallel_size,
            expert_model_parallel_size=expert_parallel_size,
            # Megatron's groups get their own timeout (default 30 min), not the world's
            distributed_timeout_minutes=timeout_s / 60)
    sizes = (parallel_state.get_tensor_model_parallel_world_size(),
             parallel_state.get_expert_model_parallel_world_size(),
             parallel_state.get_pipeline_model_parallel_world_size())
    wanted = (tensor_parallel_size, expert_parallel_size, pipeline_parallel_size)
    if sizes != wanted:
        raise RuntimeError(f"Megatron's groups are already initialised with (TP, EP, PP) = "
                           f"{sizes}, not the requested {wanted}; call shutdown_distributed() "
                           "(or parallel_state.destroy_model_parallel()) first")
    if use_cuda:
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(seed)
    return ProcessGroupCollection.use_mpu_process_groups()


def check_parallel_sizes(world_size: int, tensor_parallel_size: int = 1,
                         expert_parallel_size: int = 1, pipeline_parallel_size: int = 1) -> int:
    """Raise ValueError naming the size and the fix unless WORLD = PP x DP x TP with EP dividing
    DP; returns DP."""
    for name, value in (("tensor_parallel_size", tensor_parallel_size),
                        ("expert_parallel_size", expert_parallel_size),
                        ("pipeline_parallel_size", pipeline_parallel_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} is invalid: it must be a positive integer")
    model_parallel = tensor_parallel_size * pipeline_parallel_size
    if world_size % model_parallel != 0:
        raise ValueError(f"tensor_parallel_size={tensor_parallel_size} x pipeline_parallel_size="
                         f"{pipeline_parallel_size} = {model_parallel} is invalid: it must "
                         f"divide the number of processes WORLD_SIZE={world_size}; launch a "
                         f"multiple of {model_parallel} processes")
    data_parallel_size = world_size // model_parallel
    if data_parallel_size % expert_parallel_size != 0:
        raise ValueError(f"expert_parallel_size={expert_parallel_size} is invalid: it must "
                         f"divide the data-parallel size WORLD_SIZE / (TP * PP) = {world_size} / "
                         f"({tensor_parallel_size} * {pipeline_parallel_size}) = "
                         f"{data_parallel_size} (EP groups are carved out of the DP ranks that "
                         "hold the same stages)")
    return data_parallel_size


@contextmanager
def whole_model_groups(pg: ProcessGroupCollection) -> Iterator[ProcessGroupCollection]:
    """The groups to build the whole model with on a rank of a pipeline: a copy of `pg` without
    a pipeline group (`pp = None`, which Megatron reads as rank 0 of 1: every decoder layer,
    the embedding and the output head), while Megatron's global pipeline rank and size read 0
    and 1 (its MTP placement reads those, not `pg.pp`). TP and EP stay the rank's: the model
    holds this rank's TP/EP shards. With PP = 1 this is `pg` itself and changes nothing."""
    if pg.pp is None or pg.pp.size() == 1:
        yield pg
        return
    whole = copy.copy(pg)
    whole.pp = None
    with one_pipeline_stage():
        yield whole


def duplicate_group(group: dist.ProcessGroup) -> dist.ProcessGroup:
    """A new group of the same ranks as `group` (its own communicator: its collectives do not
    queue behind `group`'s). Collective over the world: every rank calls it with its own group
    of the same kind (e.g. its EP group); each gets the copy of its own."""
    mine = tuple(dist.get_process_group_ranks(group))
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    copy_of_mine = None
    for ranks in sorted(set(everyone)):  # every rank creates every group, in the same order
        created = dist.new_group(list(ranks))
        if ranks == mine:
            copy_of_mine = created
    return copy_of_mine


def from_rank0(value):
    """Rank 0's `value` on every rank of the default group (a run name's time stamp, a W&B id):
    the value itself where torch.distributed is not initialised."""
    box = [value]
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    return box[0]


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


EXPERT_DIM = 0  # routed-expert weights are [experts, ...]


def is_expert_parallel(param: torch.Tensor) -> bool:
    return getattr(param, "expert_parallel", False)


def _size(group) -> int:
    return 1 if group is None else group.size()


def shard_tensor(full: torch.Tensor, dim: int, stride: int, rank: int, size: int) -> torch.Tensor:
    chunks = full.chunk(stride * size, dim=dim)
    return torch.cat(chunks[rank::size], dim=dim)


def unshard_tensor(parts: list[torch.Tensor], dim: int, stride: int) -> torch.Tensor:
    """Inverse of `shard_tensor` given every rank's slice in rank order."""
    pieces = [part.chunk(stride, dim=dim) for part in parts]
    return torch.cat([pieces[r][s] for s in range(stride) for r in range(len(parts))], dim=dim)


@torch.no_grad()
def shard_state_dict(full_state_dict: dict, model: torch.nn.Module, tp_group,
                     ep_group=None) -> dict:
    """This rank's state dict from a full one (keys as in `model.state_dict()`): TP-split
    parameters sliced over `tp_group`, expert-parallel ones also over `ep_group` (dim 0)."""
    params = dict(model.named_parameters())
    local = {}
    for name, value in model.state_dict().items():
        if name not in full_state_dict:
            continue
        tensor = full_state_dict[name]
        param = params.get(name)
        if param is not None and is_expert_parallel(param) and _size(ep_group) > 1:
            tensor = shard_tensor(tensor, EXPERT_DIM, 1, ep_group.rank(), ep_group.size())
        spec = _split_spec(param) if param is not None else None
        if spec is not None and _size(tp_group) > 1:
            tensor = shard_tensor(tensor, spec[0], spec[1], tp_group.rank(), tp_group.size())
        local[name] = tensor
        if local[name].shape != value.shape:
            raise ValueError(f"{name}: shard shape {tuple(local[name].shape)} does not match the "
                             f"model's {tuple(value.shape)}; was the full state dict built for "
                             "the same config, and are tp_group / ep_group the model's?")
    return local


def load_full_state_dict(model: torch.nn.Module, full_state_dict: dict, tp_group,
                         ep_group=None) -> None:
    """Load this rank's slice of a full (TP=1, EP=1) state dict into `model` (its TP/EP
    shard); every parameter and buffer must be there (Transformer Engine's `_extra_state`
    entries may be missing)."""
    missing, unexpected = model.load_state_dict(
        shard_state_dict(full_state_dict, model, tp_group, ep_group), strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise ValueError(f"the full state dict does not fit this model: missing={missing}, "
                         f"unexpected={unexpected}; was it saved from a model of the same "
                         "config (layers, experts, MTP depth)?")


def _all_gather(tensor: torch.Tensor, group) -> list[torch.Tensor]:
    parts = [torch.empty_like(tensor) for _ in range(group.size())]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return parts


@torch.no_grad()
def gather_state_dict(model: torch.nn.Module, tp_group, *, grads: bool = False,
                      ep_group=None) -> dict:
    """Full tensors of every parameter (or its gradient) assembled from all TP ranks and, for
    expert-parallel parameters, all EP ranks. Every rank of both groups must call it."""
    out = {}
    for name, param in model.named_parameters():
        tensor = param.grad if grads else param.data
        if tensor is None:
            continue
        tensor = tensor.detach()
        spec = _split_spec(param)
        if spec is not None and _size(tp_group) > 1:
            tensor = unshard_tensor(_all_gather(tensor, tp_group), spec[0], spec[1])
        if is_expert_parallel(param) and _size(ep_group) > 1:
            tensor = torch.cat(_all_gather(tensor, ep_group), dim=EXPERT_DIM)
        out[name] = tensor.clone()
    return out
