"""DeepSeekMoE layer and the dense FFN, as Megatron `TransformerLayer.mlp` modules.

  h'_t = sum_{shared} FFN^s(u_t) + sum_{routed} g_{i,t} FFN^r_i(u_t)   (the residual is added
                                                                         by TransformerLayer)
The routed path is four separable steps, so that expert parallelism (all-to-all) and the
DualPipe split (attention / dispatch / MLP / combine) can replace or interleave them:
  route     Router -> Routing (expert ids, gates, counts)
  dispatch  tokens permuted so each expert's rows are contiguous          (LocalDispatcher)
  experts   grouped GEMM over the sorted rows                             (RoutedExperts)
  combine   rows un-permuted, weighted by the gates, summed per token     (LocalDispatcher)
No token is ever dropped. Under tensor parallelism each rank computes its slice of every
expert's FFN width; the routed partial sums are all-reduced after combine, the shared
experts' by their own row-parallel output projection.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..config import ModelConfig, from_megatron_config
from ..layers import copy_to_tp, get_backend, init_device, reduce_from_tp, tp_group_of
from .experts import RoutedExperts, SwiGLUMLP
from .router import Router, Routing, sequence_balance_loss


@dataclass
class DispatchState:
    """What combine needs to undo dispatch."""

    order_N: torch.Tensor    # sorted position -> assignment n = t*K + k
    inverse_N: torch.Tensor  # assignment n -> its sorted position
    num_tokens: int


class _DispatchRows(torch.autograd.Function):
    """x_TD -> x_ND = x_TD[order_N // K]: each token copied to its K sorted positions.

    Backward sums the K copies' gradients with a gather and a reduction (deterministic, no
    atomics), instead of autograd's scatter-add for indexing."""

    @staticmethod
    def forward(ctx, x_TD, order_N, inverse_N, top_k: int):
        ctx.save_for_backward(inverse_N)
        ctx.top_k = top_k
        return x_TD.index_select(0, order_N // top_k)

    @staticmethod
    def backward(ctx, grad_ND):
        (inverse_N,) = ctx.saved_tensors
        tokens = inverse_N.numel() // ctx.top_k
        grad_TD = grad_ND.index_select(0, inverse_N).view(tokens, ctx.top_k, -1).sum(dim=1)
        return grad_TD, None, None, None


class _UnpermuteRows(torch.autograd.Function):
    """y_ND (expert-sorted) -> y_NK (token-major, n = t*K + k); backward is the inverse
    permutation (a gather), not a scatter."""

    @staticmethod
    def forward(ctx, y_ND, order_N, inverse_N):
        ctx.save_for_backward(order_N)
        return y_ND.index_select(0, inverse_N)

    @staticmethod
    def backward(ctx, grad_N):
        (order_N,) = ctx.saved_tensors
        return grad_N.index_select(0, order_N), None, None


class LocalDispatcher:
    """Permutation to and from expert-sorted order, on one rank (no expert parallelism)."""

    def dispatch(self, x_TD: torch.Tensor, routing: Routing
                 ) -> tuple[torch.Tensor, torch.Tensor, DispatchState]:
        T, K = routing.topk_TK.shape
        order_N = routing.topk_TK.flatten().argsort(stable=True)  # sorted position -> assignment
        inverse_N = torch.empty_like(order_N)
        inverse_N[order_N] = torch.arange(order_N.numel(), device=order_N.device)
        x_ND = _DispatchRows.apply(x_TD, order_N, inverse_N, K)
        return x_ND, routing.tokens_per_expert_E, DispatchState(order_N, inverse_N, T)

    def combine(self, y_ND: torch.Tensor, gates_TK: torch.Tensor,
                state: DispatchState) -> torch.Tensor:
        """sum_k gate_{t,k} * y_{t,k}, in y's dtype (bf16 products, fp32-accumulated sum)."""
        T, K = gates_TK.shape
        y_TKD = _UnpermuteRows.apply(y_ND, state.order_N, state.inverse_N).view(T, K, -1)
        return (y_TKD * gates_TK.unsqueeze(-1).to(y_ND.dtype)).sum(dim=1)


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


class DeepSeekMoE(torch.nn.Module):
    """Shared + routed experts with the DeepSeek-V3 router. Megatron MlpBuilder signature."""

    def __init__(self, config, pg_collection=None, is_mtp_layer: bool = False,
                 name: Optional[str] = None, **unused):
        super().__init__()
        cfg: ModelConfig = from_megatron_config(config)
        moe = cfg.moe
        self.cfg = moe
        self.tp_group = tp_group_of(pg_collection)
        self.is_mtp_layer = is_mtp_layer
        self.layer_number = 0
        # Gradient scale of the balance loss, set by the training step to match the main
        # loss's normalisation (1 / number of micro-batches).
        self.aux_loss_scale = 1.0
        self.last_aux_loss: Optional[torch.Tensor] = None
        device = init_device(config)
        self.router = Router(cfg.hidden_size, moe, dtype=config.params_dtype, device=device,
                             init_std=cfg.init_std)
        self.experts = RoutedExperts(moe.num_experts, cfg.hidden_size, moe.expert_ffn_size,
                                     tp_group=self.tp_group, dtype=config.params_dtype,
                                     device=device, init_std=cfg.init_std,
                                     impl=moe.experts_impl)
        self.shared_experts = None
        if moe.num_shared_experts > 0:
            self.shared_experts = SwiGLUMLP(cfg.hidden_size, moe.shared_ffn_size,
                                            backend=get_backend(cfg.linear_backend),
                                            config=config, tp_group=self.tp_group,
                                            init_std=cfg.init_std)
        self.dispatcher = LocalDispatcher()

    def set_layer_number(self, layer_number: int) -> None:
        self.layer_number = layer_number

    def forward(self, hidden_states: torch.Tensor, padding_mask=None, **unused):
        """hidden_states [s, b, d] -> ([s, b, d], None)."""
        s, b, d = hidden_states.shape
        x_TD = hidden_states.reshape(s * b, d)
        routing = self.router(x_TD)
        gates_TK = copy_to_tp(routing.gates_TK, self.tp_group)  # sum gate grads over TP

        # Each TP rank holds a slice of every expert's width: sum their input gradients.
        x_ND, tokens_per_expert_E, state = self.dispatcher.dispatch(
            copy_to_tp(x_TD, self.tp_group), routing)
        y_ND = self.experts(x_ND, tokens_per_expert_E)
        out_TD = reduce_from_tp(self.dispatcher.combine(y_ND, gates_TK, state), self.tp_group)
        if self.shared_experts is not None:
            out_TD = out_TD + self.shared_experts(x_TD)  # its row-parallel fc2 reduces over TP
        out = out_TD.view(s, b, d)

        if self.training and self.cfg.seq_aux_loss_coeff > 0 and torch.is_grad_enabled():
            aux = self.cfg.seq_aux_loss_coeff * sequence_balance_loss(
                routing.scores_TE, routing.topk_TK, s, self.cfg)
            self.last_aux_loss = aux.detach()
            out = AuxLossInjector.apply(out, aux, self.aux_loss_scale)
        return out, None


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
