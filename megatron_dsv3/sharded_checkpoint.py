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

A TP split with stride 2 (SwiGLU's fused [gate; up]) is saved as the TP ranks hold it, so a
checkpoint resumes at the same TP size; loading it at another TP size is not supported yet.
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
    if tp_split:
        offsets.append((prepend + tensor.partition_dim, tp_rank, tp_size))
    if getattr(tensor, "expert_parallel", False):
        if ep_size > 1:
            offsets.append((prepend, ep_rank, ep_size))
        replica_id = (0, 0 if tp_split else tp_rank, ranks["expt_dp"])
    else:
        replica_id = (0, 0 if tp_split else tp_rank, ranks["dp"])
    return ShardedTensor.from_rank_offsets(key, tensor, *offsets, replica_id=replica_id,
                                           prepend_axis_num=prepend)


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
