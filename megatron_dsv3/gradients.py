"""The gradients of one optimizer step across ranks: reduction, global norm, clipping; the
rules that go with the process groups of parallel.py (which parameter is replicated over which
group), for any training loop.

Each function takes the process groups as an argument (`pg.dp`, `pg.expt_dp`, `pg.tp`, `pg.ep`,
`pg.pp`, from `parallel.init_distributed`); with a pipeline `dp`, `expt_dp` and `ep` are among
the ranks holding the same stages (Megatron's own layout) and `pp` is this rank's pipeline.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from .parallel import is_expert_parallel


def _all_reduce_sum(grads: list[torch.Tensor], group, scale: float) -> None:
    """grad <- scale * sum over `group` of grad, in one flat buffer."""
    if not grads:
        return
    if group.size() == 1:
        if scale != 1.0:
            torch._foreach_mul_(grads, scale)
        return
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat, group=group)
    flat *= scale
    for grad, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        grad.copy_(synced)


def reduce_gradients(params: list[torch.Tensor], pg) -> None:
    """Each gradient becomes that of the DP mean of the replicas' losses, L = 1/DP sum_r L_r.
    With a pipeline, `pg.dp` and `pg.expt_dp` are those of the ranks holding the same stages
    (Megatron's groups), so each stage's parameters are reduced over their own replicas.

    A non-expert parameter is replicated on every DP rank r, whose gradient is dL_r/dtheta:
    sum over DP, divide by DP. A routed expert lives on one rank of each EP group; the
    all-to-all backward has already summed into it the gradients of the EP group's EP losses
    (dispatch sent it their tokens), so summing over its replicas, the expert-data-parallel
    group (DP / EP ranks), gives sum_r dL_r/dW over all DP ranks: divide by DP too, not by
    the expt_dp size (Megatron's DDP: pre-scale edp/dp, then average over edp). With EP = 1
    expt_dp is the DP group and both rules coincide."""
    dp = pg.dp.size()
    _all_reduce_sum([p.grad for p in params if not is_expert_parallel(p)], pg.dp, 1.0 / dp)
    _all_reduce_sum([p.grad for p in params if is_expert_parallel(p)], pg.expt_dp, 1.0 / dp)


def global_grad_norm(params: list[torch.Tensor], pg) -> torch.Tensor:
    """L2 norm of the whole model's gradient, each distinct shard counted once: squares of
    TP-split parameters summed over the TP group, those of routed-expert shards over TP and
    then EP (expert TP = TP), replicated parameters (identical on every TP rank) once; with a
    pipeline (`pg.pp` larger than 1) the stages' squares are summed over it, so `params` must
    hold each stage once (not DualPipe's mirror copies).
    Accumulated in float64: an fp32 norm of the 262k-element tiny embedding is off by ~1e-5
    relative, and differently for each shard shape, which would blur TP/EP parity."""
    def sum_of_squares(grads):
        if not grads:
            return torch.zeros((), dtype=torch.float64, device=params[0].device)
        return torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float64)).pow(2).sum()

    def squares(expert: bool, tp_split: bool):
        return sum_of_squares([p.grad for p in params if is_expert_parallel(p) == expert
                               and getattr(p, "tensor_model_parallel", False) == tp_split])

    tp_split_sq = torch.stack([squares(expert=False, tp_split=True),
                               squares(expert=True, tp_split=True)])
    if pg.tp.size() > 1:
        dist.all_reduce(tp_split_sq, group=pg.tp)
    expert_sq = tp_split_sq[1] + squares(expert=True, tp_split=False)
    if pg.ep.size() > 1:
        dist.all_reduce(expert_sq, group=pg.ep)
    total_sq = tp_split_sq[0] + squares(expert=False, tp_split=False) + expert_sq
    pp = getattr(pg, "pp", None)
    if pp is not None and pp.size() > 1:
        dist.all_reduce(total_sq, group=pp)
    return total_sq.sqrt().float()


def clip_gradients(params: list[torch.Tensor], max_norm: float, pg,
                   norm_params: Optional[list[torch.Tensor]] = None,
                   optimizer: Optional[torch.optim.Optimizer] = None) -> torch.Tensor:
    """Scale gradients so their global norm is at most max_norm (0: no clipping); returns the
    norm before clipping. The norm is over `norm_params` (default: `params`), the scaling
    applies to `params` (DualPipe: the norm counts each stage once, both copies are scaled).

    `optimizer`: when it is torch's fused Adam/AdamW (or one that says `applies_grad_scale`),
    the scaling happens inside its next step instead of in a pass of its own over every
    gradient: its `grad_scale`, by which the fused kernel divides each gradient as it reads it
    (the hook torch's AMP unscaling uses), is set to 1 / the clipping factor."""
    norm = global_grad_norm(params if norm_params is None else norm_params, pg)
    fused = optimizer is not None and scales_inside(optimizer)
    if fused:
        optimizer.grad_scale = None
    if max_norm > 0:
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        if fused:
            optimizer.grad_scale = (1.0 / scale).float()
        else:
            torch._foreach_mul_([p.grad for p in params], scale)
    return norm


def scales_inside(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `optimizer` divides the gradients by its `grad_scale` inside its step: torch's
    Adam and AdamW with fused=True, or an optimizer that says so (`applies_grad_scale`)."""
    return getattr(optimizer, "applies_grad_scale", False) or (
        isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW)
        and bool(optimizer.defaults.get("fused")))
