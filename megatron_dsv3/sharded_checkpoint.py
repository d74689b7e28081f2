"""Our modules in Megatron's distributed checkpoint (`megatron.core.dist_checkpointing`, what
Megatron's loop saves with `--save` in its default torch_dist format).

Megatron asks every module of the model for `sharded_state_dict(prefix, sharded_offsets,
metadata)`: each tensor as a `ShardedTensor` that says which slice of the global tensor this
rank holds and which rank writes it. A module without the method falls back to Megatron's
default, which treats its whole subtree as replicated: wrong for the tensor-parallel linears
inside our MLA and MoE layers and for routed experts split over expert-parallel ranks (every
EP rank would write a different tensor under one key), and Megatron's MTP block calls the method
on its layers directly (our MTPLayer had none: the first save failed). `sharded_state_dict_of`
gives our modules the method (`ShardedCheckpointable`):

  * a child with its own method (Megatron's linears, norms, TransformerLayer) answers itself;
  * a tensor marked expert-parallel (moe/experts.py) is split along dim 0 over the EP group,
    its TP split (if any) along its partition dim, one copy per expert-data-parallel group;
  * a tensor marked tensor-parallel is split along its partition dim, one copy per DP group;
  * any other tensor (norm weights, the router weight and its expert bias) is replicated.

A TP split with stride 2 (SwiGLU's fused [gate; up], each rank holding [gate_r; up_r]) is saved
as its two halves, each split over TP (`swiglu_sharded`, for the routed experts' fc1; Megatron's
`apply_swiglu_sharded_factory` for the MLPs' linear_fc1, as Megatron's own MLP does): the
checkpoint holds the global [gate; up] whatever the TP size, and loads at another one.
"""

from __future__ import annotations

from typing import Optional

import torch


def _ranks():
    from megatron.core import parallel_state as ps

    return {"tp": (ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()),
            "ep": (ps.get_expert_model_parallel_rank(), ps.get_expert_model_parallel_world_size()),
            "dp": ps.get_data_parallel_rank(with_context_parallel=True),
            "expt_dp": ps.get_expert_data_parallel_rank()}


def sharded_tensor(key: str, tensor: torch.Tensor, sharded_offsets=(), ranks=None):
    """The ShardedTensor of one of our tensors under `key` (module docstring's rules)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    ranks = ranks or _ranks()
    (tp_rank, tp_size), (ep_rank, ep_size) = ranks["tp"], ranks["ep"]
    prepend = len(sharded_offsets)
    offsets = list(sharded_offsets)
    tp_split = bool(getattr(tensor, "tensor_model_parallel", False)) and tp_size > 1
    if getattr(tensor, "expert_parallel", False):
        if ep_size > 1:
            offsets.append((prepend, ep_rank, ep_size))
        replica_id = (0, 0 if tp_split else tp_rank, ranks["expt_dp"])
    else:
        replica_id = (0, 0 if tp_split else tp_rank, ranks["dp"])
    if tp_split and getattr(tensor, "partition_stride", 1) == 2:
        return swiglu_sharded(key, tensor, offsets, prepend + tensor.partition_dim,
                              (tp_rank, tp_size), replica_id, prepend)
    if tp_split:
        offsets.append((prepend + tensor.partition_dim, tp_rank, tp_size))
    return ShardedTensor.from_rank_offsets(key, tensor, *offsets, replica_id=replica_id,
                                           prepend_axis_num=prepend)


def swiglu_sharded(key: str, tensor: torch.Tensor, offsets: list, axis: int, tp, replica_id,
                   prepend: int):
    """A [gate_r; up_r] TP shard (along global `axis`) saved as gate_r at slot r and up_r at
    slot tp + r of 2 x tp slots: the global tensor is [gate; up] at any TP size."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    tp_rank, tp_size = tp
    local_axis = axis - prepend

    def build(key, data, replica_id, flattened_range):
        gate, up = torch.chunk(data, 2, dim=local_axis)
        return [ShardedTensor.from_rank_offsets(key, half, *offsets, (axis, slot, 2 * tp_size),
                                                replica_id=replica_id, prepend_axis_num=prepend)
                for half, slot in ((gate, tp_rank), (up, tp_size + tp_rank))]

    def merge(halves):
        return torch.cat(halves, dim=local_axis)

    return ShardedTensorFactory(key, tensor, build, merge, replica_id)


def sharded_state_dict_of(module: torch.nn.Module, prefix: str = "", sharded_offsets=(),
                          metadata: Optional[dict] = None) -> dict:
    """Megatron's sharded state dict of `module`, one of ours (module docstring)."""
    out = {}
    ranks = _ranks()
    for name, tensor in module.state_dict(keep_vars=True).items():
        if "." in name:
            continue  # a child's, below
        if name.endswith("_extra_state"):
            raise NotImplementedError(f"{type(module).__name__} has extra state {name!r}: "
                                      "give it a sharded_state_dict of its own")
        out[prefix + name] = sharded_tensor(prefix + name, tensor, sharded_offsets, ranks)
    for name, child in module.named_children():
        child_prefix = f"{prefix}{name}."
        if hasattr(child, "sharded_state_dict"):
            out.update(child.sharded_state_dict(prefix=child_prefix,
                                                sharded_offsets=sharded_offsets,
                                                metadata=metadata))
        else:
            out.update(sharded_state_dict_of(child, child_prefix, sharded_offsets, metadata))
    return out


class ShardedCheckpointable:
    """Mixin: the module's `sharded_state_dict` is `sharded_state_dict_of`'s."""

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(),
                           metadata: Optional[dict] = None) -> dict:
        return sharded_state_dict_of(self, prefix, sharded_offsets, metadata)
