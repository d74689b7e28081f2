"""DeepSeek-V3 router: sigmoid affinities, a bias that only selects, node-limited groups.

Shape legend: T tokens (s * b, flattened s-major from Megatron's [s, b, d]), D hidden,
E routed experts, K experts per token, G groups, M groups kept per token.

  scores_TE  = sigmoid(x_TD @ W_ED^T)                  fp32, the affinities s_{i,t}
  choice_TE  = scores_TE + bias_E                      used ONLY to choose experts
  groups: rank each group by the sum of its top-2 choice scores, keep the top M,
          mask the other groups' experts out (node-limited routing)
  topk_TK    = TopK(choice_TE over kept groups)
  gates_TK   = scores_TE[topk] / sum(scores_TE[topk]) * route_scale     (raw scores!)

The sequence-wise balance loss (docs/architecture.md 3.2) and the expert-bias update step are pure
functions here; `moe/balance.py` applies the update to a whole model once per optimizer step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..config import MoEConfig


@dataclass
class Routing:
    """What the router decided for T tokens."""

    topk_TK: torch.Tensor              # int64 expert ids
    gates_TK: torch.Tensor             # fp32 combine weights
    scores_TE: torch.Tensor            # fp32 sigmoid affinities (carry the router's gradient)
    tokens_per_expert_E: torch.Tensor  # int64 assignment counts in this batch


def select_experts(scores_TE: torch.Tensor, bias_E: Optional[torch.Tensor],
                   cfg: MoEConfig) -> torch.Tensor:
    """Expert ids [T, K] chosen by top-k of scores + bias within the top groups."""
    choice_TE = scores_TE if bias_E is None else scores_TE + bias_E
    if cfg.num_groups > 1:
        T, E = choice_TE.shape
        choice_TGe = choice_TE.view(T, cfg.num_groups, E // cfg.num_groups)
        group_score_TG = choice_TGe.topk(2, dim=-1).values.sum(dim=-1)
        kept_TM = group_score_TG.topk(cfg.topk_groups, dim=-1).indices
        keep_TG = torch.zeros_like(group_score_TG, dtype=torch.bool).scatter_(1, kept_TM, True)
        choice_TE = choice_TGe.masked_fill(~keep_TG.unsqueeze(-1), float("-inf")).view(T, E)
    return choice_TE.topk(cfg.top_k, dim=-1).indices


def gate_values(scores_TE: torch.Tensor, topk_TK: torch.Tensor, cfg: MoEConfig) -> torch.Tensor:
    """Combine weights from the raw scores of the selected experts (the bias plays no part)."""
    gates_TK = scores_TE.gather(1, topk_TK)
    if cfg.normalize_gates:
        gates_TK = gates_TK / gates_TK.sum(dim=-1, keepdim=True)
    return gates_TK * cfg.route_scale


def count_tokens_per_expert(topk_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Assignment counts [E] (each token counts once per chosen expert); no host sync."""
    counts = torch.zeros(num_experts, dtype=torch.int64, device=topk_TK.device)
    return counts.scatter_add_(0, topk_TK.flatten(), torch.ones_like(topk_TK.flatten()))


def sequence_balance_loss(scores_TE: torch.Tensor, topk_TK: torch.Tensor, seq_len: int,
                          cfg: MoEConfig) -> torch.Tensor:
    """L_bal = sum_i f_i P_i per sequence, averaged over the sequences (without alpha).

    f_i = E / (K * T_seq) * #{t : i in TopK(t)},  P_i = mean_t s_{i,t} / sum_j s_{j,t}.
    Tokens are s-major ([s, b] flattened), so sequence j holds tokens j, j + b, j + 2b, ...
    """
    T, E = scores_TE.shape
    batch = T // seq_len
    selected_TE = torch.zeros_like(scores_TE).scatter_(1, topk_TK, 1.0)
    f_BE = selected_TE.view(seq_len, batch, E).sum(0) * (E / (cfg.top_k * seq_len))
    normalized_TE = scores_TE / scores_TE.sum(dim=-1, keepdim=True)
    p_BE = normalized_TE.view(seq_len, batch, E).mean(0)
    return (f_BE * p_BE).sum(-1).mean()


def expert_bias_step(load_E: torch.Tensor, bias_E: torch.Tensor, rate: float) -> torch.Tensor:
    """b_i + rate * sign(mean_load - load_i): overloaded experts become less attractive."""
    load = load_E.float()
    return bias_E + rate * torch.sign(load.mean() - load)


class Router(torch.nn.Module):
    """Router weight (replicated over TP), selection bias and per-step load counters.

    `expert_bias` and `tokens_per_expert` are fp32/int64 buffers outside autograd; the bias is
    saved in checkpoints, the counter is reset by the bias update (`moe/balance.py`).

    In Megatron's own training loop the update is Megatron's: its `finalize_model_grads` finds
    every module with an `expert_bias` and a `local_tokens_per_expert` (Megatron's router's
    names), all-reduces the counts over the tensor x data x context-parallel group, moves the
    bias by `moe_router_bias_update_rate * sign(mean load - load)` (moe.balance's rule; the
    TP ranks' repeated counts change no sign) and zeroes the counts, once per optimizer step.
    `frozen_expert_bias` (Megatron's flag) stops it.
    """

    frozen_expert_bias = False

    def __init__(self, hidden_size: int, cfg: MoEConfig, *, dtype: torch.dtype,
                 device=None, init_std: float = 0.006):
        super().__init__()
        self.cfg = cfg
        self.weight = torch.nn.Parameter(
            torch.empty(cfg.num_experts, hidden_size, dtype=dtype, device=device))
        with torch.no_grad():
            self.weight.normal_(0.0, init_std)
        self.register_buffer("expert_bias",
                             torch.zeros(cfg.num_experts, dtype=torch.float32, device=device))
        self.register_buffer("tokens_per_expert",
                             torch.zeros(cfg.num_experts, dtype=torch.int64, device=device),
                             persistent=False)

    @property
    def local_tokens_per_expert(self) -> torch.Tensor:
        """Megatron's name for `tokens_per_expert` (the class docstring)."""
        return self.tokens_per_expert

    def forward(self, x_TD: torch.Tensor) -> Routing:
        # The GEMM runs in the activations' dtype (bf16 in bf16 training, as DeepSeek's own
        # gate does: a skinny fp32 GEMM costs far more); scores and selection are fp32.
        logits_TE = torch.nn.functional.linear(x_TD, self.weight.to(x_TD.dtype)).float()
        scores_TE = logits_TE.sigmoid()
        with torch.no_grad():
            topk_TK = select_experts(scores_TE, self.expert_bias, self.cfg)
            counts_E = count_tokens_per_expert(topk_TK, self.cfg.num_experts)
            if self.training:
                self.tokens_per_expert += counts_E
        gates_TK = gate_values(scores_TE, topk_TK, self.cfg)
        return Routing(topk_TK, gates_TK, scores_TE, counts_E)
