"""Pipeline stages for the parity tests: built from a full model's weights, and their weights
or gradients read back under the full model's names."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

from megatron_dsv3.config import to_megatron_config
from megatron_dsv3.model import build_model
from megatron_dsv3.parallel import gather_state_dict, load_full_state_dict, whole_model_groups
from megatron_dsv3.pipeline.stages import StagePlan, stages_from_model


def build_rank_stages(cfg, plan: StagePlan, rank: int, full_state_dict: dict, *,
                      pg_collection=None, overlap_moe=None):
    """The pipeline rank's two stages holding the weights of `full_state_dict` (a full TP=1,
    EP=1 model's state dict, e.g. of a seeded single process), sharded over
    `pg_collection.tp` and `.ep` (default: Megatron's groups)."""
    if pg_collection is None:
        from megatron.core.process_groups_config import ProcessGroupCollection

        pg_collection = ProcessGroupCollection.use_mpu_process_groups()
    tp, ep = pg_collection.tp.size(), pg_collection.ep.size()
    with whole_model_groups(pg_collection) as groups:
        model = build_model(cfg, pg_collection=groups, megatron_config=to_megatron_config(
            cfg, tensor_parallel_size=tp, expert_parallel_size=ep, use_cpu_initialization=True,
            perform_initialization=False))
    load_full_state_dict(model, full_state_dict, pg_collection.tp, pg_collection.ep)
    return stages_from_model(model, plan, rank, overlap_moe=overlap_moe)


def local_state(stages: Sequence, *, grads: bool = False,
                include_mirrors: bool = False) -> dict[str, torch.Tensor]:
    """{full-model name: tensor} of this rank's stage parameters (grads=True: their gradients,
    parameters without one left out). DualPipe's mirror copies are skipped unless asked for:
    each stage is reported by the rank holding its chunk-0 copy."""
    out = {}
    for stage in stages:
        if stage.is_mirror and not include_mirrors:
            continue
        for name, param in stage.named_parameters():
            tensor = param.grad if grads else param.data
            if tensor is not None:
                out[stage.full_name(name)] = tensor.detach().clone()
    return out


def gather_stage_state(stages: Sequence, group, *, grads: bool = False, tp_group=None,
                       ep_group=None) -> dict[str, torch.Tensor]:
    """The whole model's parameters (or gradients) under full names, on every rank: each
    stage's TP-split tensors assembled over `tp_group`, its routed-expert shards over
    `ep_group`, then the stages of the pipeline `group` (mirror copies left out). A CPU copy;
    every rank of the three groups must call. Parameters without a gradient are left out."""
    local = {}
    for stage in stages:
        if stage.is_mirror:
            continue
        full = gather_state_dict(stage, tp_group, grads=grads, ep_group=ep_group)
        local.update({stage.full_name(name): t.cpu() for name, t in full.items()})
    parts: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, local, group=group)
    whole: dict[str, torch.Tensor] = {}
    for part in parts:
        whole.update(part)
    return whole
