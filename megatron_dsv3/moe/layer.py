"""DeepSeekMoE layer and the dense FFN, as Megatron `TransformerLayer.mlp` modules.

  h'_t = sum_{shared} FFN^s(u_t) + sum_{routed} g_{i,t} FFN^r_i(u_t)   (the residual is added
                                                                         by TransformerLayer)
The routed path is four separable steps, so that expert parallelism (all-to-all) and the
DualPipe split (attention / dispatch / MLP / combine) can replace or interleave them:
  route     Router -> Routing (expert ids, gates, counts)
  dispatch  tokens permuted so each expert's rows are contiguous; with expert parallelism
            also sent to the rank holding the expert   (moe/dispatcher.py: LocalDispatcher,
                                                        AllToAllDispatcher when EP > 1)
  experts   grouped GEMM over the sorted rows of this rank's experts     (RoutedExperts)
  combine   rows sent home, un-permuted, weighted by the gates, summed per token
`DeepSeekMoE.forward` runs these as methods that the DualPipe split (moe/pieces.py) also calls
one by one, so the piecewise and the plain layer run the same code:
  route(u)                    router, gates (+ balance-loss injection), dispatch plan   [attn]
    = route_finish(route_start(u)): route_start launches the count exchange (EP), and
      route_finish waits for it and builds the plan               [attn | plan]
  dispatcher.send_rows        rows to the experts' ranks                        [dispatch]
  routed_experts, shared_experts_output                                            [MLP]
  dispatcher.return_rows      rows back                                          [combine]
  combine_output              un-permute, gate-weighted sum, TP reduce, + shared [combine]
The balance loss is injected on the gates (AuxLossInjector: identity forward, the loss's
gradient added in backward), so its gradient stays inside the attention-side piece. Its
gradient scale must match the main loss's normalisation: `moe.balance.set_balance_loss_scale`
(training without it is an error).
No token is ever dropped. Under tensor parallelism each rank computes its slice of every
expert's FFN width; the routed partial sums are all-reduced after combine, the shared
experts' by their own row-parallel output projection. Under expert parallelism (the
`pg_collection.ep` group, size P) EP rank p holds the experts [p*E/P, (p+1)*E/P); the router,
shared experts and everything else stay replicated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

from ..config import ModelConfig, from_megatron_config
from ..layers import copy_to_tp, get_backend, init_device, reduce_from_tp, tp_group_of
from ..sharded_checkpoint import ShardedCheckpointable
from .dispatcher import (  # noqa: F401 - DispatchState re-exported for callers of layer.py
    AllToAllDispatcher,
    AllToAllState,
    CountExchange,
    DispatchState,
    LocalDispatcher,
    PlanStart,
    experts_per_rank,
)
from .experts import RoutedExperts, SwiGLUMLP
from .router import Router, sequence_balance_loss


class AuxLossInjector(torch.autograd.Function):
    """Identity on `output`; in backward, feeds `scale` as the gradient of `aux_loss`.

    Lets a layer add a loss term without returning it through Megatron's TransformerLayer.
    """

    @staticmethod
    def forward(ctx, output: torch.Tensor, aux_loss: torch.Tensor, scale: float):
        ctx.save_for_backward(aux_loss)
        ctx.scale = scale
        return output

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (aux_loss,) = ctx.saved_tensors
        return grad_output, torch.full_like(aux_loss, ctx.scale), None


@dataclass(eq=False)
class MoERouteStart:
    """A route between `route_start` and `route_finish`: the count exchange in flight."""

    x_TD: torch.Tensor          # the MoE input, tokens flattened
    gates_TK: torch.Tensor      # combine weights; carry the balance-loss gradient
    plan: PlanStart             # the sorted rows and the pending count exchange
    shape: torch.Size           # [s, b, d] of the layer's hidden states


@dataclass
class MoERoute:
    """What `DeepSeekMoE.route` hands to the later steps of one micro-batch."""

    x_TD: torch.Tensor          # the MoE input, tokens flattened (the shared experts read it)
    x_ND: torch.Tensor          # routed rows sorted by expert (= destination), still on this rank
    gates_TK: torch.Tensor      # combine weights; carry the balance-loss gradient
    tokens_per_local_expert: torch.Tensor  # [L] rows this rank's experts receive
    state: Union[DispatchState, AllToAllState]
    shape: torch.Size           # [s, b, d] of the layer's hidden states


class DeepSeekMoE(ShardedCheckpointable, torch.nn.Module):
    """Shared + routed experts with the DeepSeek-V3 router. Megatron MlpBuilder signature."""

    def __init__(self, config, pg_collection=None, is_mtp_layer: bool = False,
                 name: Optional[str] = None, **unused):
        super().__init__()
        cfg: ModelConfig = from_megatron_config(config)
        moe = cfg.moe
        self.cfg = moe
        self.tp_group = tp_group_of(pg_collection)
        ep_group = getattr(pg_collection, "ep", None) if pg_collection is not None else None
        ep_size = ep_group.size() if ep_group is not None else 1
        num_local_experts = experts_per_rank(moe.num_experts, ep_size)
        self.is_mtp_layer = is_mtp_layer
        self.layer_number = 0
        # Gradient scale of the balance loss: the main loss's normalisation (1 / number of
        # micro-batches), set through moe.balance.set_balance_loss_scale.
        self._balance_loss_scale: Optional[float] = None
        self.last_aux_loss: Optional[torch.Tensor] = None
        device = init_device(config)
        self.router = Router(cfg.hidden_size, moe, dtype=config.params_dtype, device=device,
                             init_std=cfg.init_std)
        self.experts = RoutedExperts(num_local_experts, cfg.hidden_size, moe.expert_ffn_size,
                                     tp_group=self.tp_group, dtype=config.params_dtype,
                                     device=device, init_std=cfg.init_std,
                                     impl=moe.experts_impl,
                                     expert_offset=(ep_group.rank() * num_local_experts
                                                    if ep_size > 1 else 0))
        self.shared_experts = None
        if moe.num_shared_experts > 0:
            self.shared_experts = SwiGLUMLP(cfg.hidden_size, moe.shared_ffn_size,
                                            backend=get_backend(cfg.linear_backend),
                                            config=config, tp_group=self.tp_group,
                                            init_std=cfg.init_std)
        self.dispatcher = AllToAllDispatcher(ep_group) if ep_size > 1 else LocalDispatcher()

    def set_layer_number(self, layer_number: int) -> None:
        self.layer_number = layer_number

    def set_balance_loss_scale(self, scale: float) -> None:
        """The factor on the balance loss's injected gradient (moe.balance.set_balance_loss_scale
        sets it on every MoE layer of a model)."""
        if not scale > 0:
            raise ValueError(f"balance-loss scale {scale!r} is invalid: it must be > 0 (1 / the "
                             "number of micro-batches per step, times any loss scale)")
        self._balance_loss_scale = float(scale)

    def forward(self, hidden_states: torch.Tensor, padding_mask=None, **unused):
        """hidden_states [s, b, d] -> ([s, b, d], None)."""
        route = self.route(hidden_states)
        x_MD = self.dispatcher.send_rows(route.x_ND, route.state)
        y_MD = self.routed_experts(x_MD, route)
        y_ND = self.dispatcher.return_rows(y_MD, route.state)
        shared_TD = self.shared_experts_output(route.x_TD)
        return self.combine_output(y_ND, route.gates_TK, shared_TD, route), None

    def route(self, hidden_states: torch.Tensor) -> MoERoute:
        """Router, gates and the dispatch plan (with EP: the count exchange and host sync)."""
        return self.route_finish(self.route_start(hidden_states))

    def route_start(self, hidden_states: torch.Tensor,
                    counts: Optional[CountExchange] = None) -> MoERouteStart:
        """Router, gates, balance loss, the sort by expert and, with EP, the launch of the count
        exchange through `counts` (default: synchronous; moe/dispatcher.py)."""
        s, b, d = hidden_states.shape
        x_TD = hidden_states.reshape(s * b, d)
        routing = self.router(x_TD)
        gates_TK = copy_to_tp(routing.gates_TK, self.tp_group)  # sum gate grads over TP
        if self.training and self.cfg.seq_aux_loss_coeff > 0 and torch.is_grad_enabled():
            if self._balance_loss_scale is None:
                raise RuntimeError(
                    f"MoE layer {self.layer_number}: the balance loss's gradient scale is not "
                    "set; call megatron_dsv3.moe.balance.set_balance_loss_scale(model, 1 / "
                    "num_microbatches) before training (the training job and the pipeline "
                    "adapter do), or set MoEConfig.seq_aux_loss_coeff=0")
            aux = self.cfg.seq_aux_loss_coeff * sequence_balance_loss(
                routing.scores_TE, routing.topk_TK, s, self.cfg)
            self.last_aux_loss = aux.detach()
            gates_TK = AuxLossInjector.apply(gates_TK, aux, self._balance_loss_scale)
        # Each TP rank holds a slice of every expert's width: sum their input gradients.
        # With EP, N rows of this rank's tokens will leave and M rows arrive for its experts.
        plan = self.dispatcher.plan_start(copy_to_tp(x_TD, self.tp_group), routing, counts)
        return MoERouteStart(x_TD, gates_TK, plan, hidden_states.shape)

    def route_finish(self, started: MoERouteStart) -> MoERoute:
        """The wait for the counts (EP), the split sizes (host) and the regrouping index."""
        x_ND, tokens_per_local_expert, state = self.dispatcher.plan_finish(started.plan)
        return MoERoute(started.x_TD, x_ND, started.gates_TK, tokens_per_local_expert, state,
                        started.shape)

    def routed_experts(self, x_MD: torch.Tensor, route: MoERoute) -> torch.Tensor:
        """Received rows (source-major) -> this rank's experts' outputs, source-major."""
        x_MD = self.dispatcher.to_expert_order(x_MD, route.state)
        y_MD = self.experts(x_MD, route.tokens_per_local_expert)
        return self.dispatcher.to_source_order(y_MD, route.state)

    def shared_experts_output(self, x_TD: torch.Tensor) -> Optional[torch.Tensor]:
        if self.shared_experts is None:
            return None
        return self.shared_experts(x_TD)  # its row-parallel fc2 reduces over TP

    def combine_output(self, y_ND: torch.Tensor, gates_TK: torch.Tensor,
                       shared_TD: Optional[torch.Tensor], route: MoERoute) -> torch.Tensor:
        """Expert outputs back home -> the layer's MLP output [s, b, d]."""
        out_TD = reduce_from_tp(self.dispatcher.weighted_sum(y_ND, gates_TK, route.state),
                                self.tp_group)
        if shared_TD is not None:
            out_TD = out_TD + shared_TD
        return out_TD.view(route.shape)


class DenseMLP(SwiGLUMLP):
    """The first `first_k_dense` layers' SwiGLU FFN. Megatron MlpBuilder signature."""

    def __init__(self, config, pg_collection=None, is_mtp_layer: bool = False,
                 name: Optional[str] = None, **unused):
        cfg: ModelConfig = from_megatron_config(config)
        super().__init__(cfg.hidden_size, cfg.moe.dense_ffn_size,
                         backend=get_backend(cfg.linear_backend), config=config,
                         tp_group=tp_group_of(pg_collection), init_std=cfg.init_std)

    def forward(self, hidden_states: torch.Tensor, padding_mask=None, **unused):
        return super().forward(hidden_states), None
