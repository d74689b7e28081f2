"""GRPO's objective: group-normalised advantages and the clipped, KL-regularised token loss.

Shape legend: B completions (P prompts x G completions each, a prompt's G consecutive),
T token positions of a completion (padded), P prompts, G the group size.

Advantages (DeepSeekMath's outcome supervision): completion i of a prompt's group gets
A_i = (r_i - mean_g r) / (std_g r + eps), the unbiased std of its group's G rewards, shared by
every token of the completion. A group whose rewards are all equal has A = 0 for all its
completions (it carries no signal: nothing better or worse to move towards), never a NaN.

Per completion token t (mask_BT = 1 on completion tokens, 0 on prompt and padding):
    ratio = pi_theta / pi_old = exp(logp - old_logp)
    surrogate = min(ratio * A, clip(ratio, 1 - epsilon_low, 1 + epsilon_high) * A)
    kl = pi_ref / pi_theta - log(pi_ref / pi_theta) - 1       (k3: unbiased, >= 0)
    loss_t = -(surrogate - beta * kl)
Reduction over the whole batch, of all data-parallel ranks together (`normalizer`):
    "token"     sum of loss_t over every completion token / the number of those tokens
                (DAPO's token-level mean; TRL's "bnpo" on one process, "dapo" across them)
    "sequence"  each completion's mean over its tokens, then the mean over completions
                (the GRPO paper's 1/G sum_i 1/|o_i| sum_t; TRL's "grpo")
"token" is the default: a long completion weighs by its length, so a long wrong answer is
not diluted into a single vote. Both are sums divided by a count the caller fixes for the
whole step (`batch_normalizer`), so that micro-batches and data-parallel shards add up to the
loss of the single batch: each piece returns its share, the gradients are summed.

The losses are the same numbers as TRL 1.16's `GRPOTrainer._compute_loss` for the same
log-probs (tests/test_grpo_objective.py drives it with tensors): "token" = TRL "bnpo" (one
process) / "dapo" (a normalizer over all processes), "sequence" = TRL "grpo".
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

import torch

LOSS_TYPES = ("token", "sequence")


@dataclasses.dataclass(frozen=True)
class GRPOLossConfig:
    """epsilon_low / epsilon_high: the clipping range of the ratio (PPO's epsilon on both sides
    by default; DAPO's clip-higher raises epsilon_high). beta: the KL penalty's weight (0: no
    KL term and no reference model). std_eps: added to a group's std (TRL's 1e-4)."""

    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    beta: float = 0.04
    loss_type: str = "token"
    std_eps: float = 1e-4

    def __post_init__(self):
        if not 0 < self.epsilon_low < 1:
            raise ValueError(f"epsilon_low={self.epsilon_low!r} is invalid: it must lie in "
                             "(0, 1) (the ratio is clipped below at 1 - epsilon_low; 0.2 is "
                             "PPO's and GRPO's)")
        if not self.epsilon_high > 0:
            raise ValueError(f"epsilon_high={self.epsilon_high!r} is invalid: it must be > 0 "
                             "(0.2 is PPO's and GRPO's; DAPO's clip-higher uses 0.28)")
        if not self.beta >= 0:
            raise ValueError(f"beta={self.beta!r} is invalid: the KL weight must be >= 0 (0 "
                             "drops the KL term and the reference model)")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type={self.loss_type!r} is invalid: choose 'token' (the "
                             "mean over every completion token) or 'sequence' (per completion, "
                             "then over completions)")
        if not self.std_eps > 0:
            raise ValueError(f"std_eps={self.std_eps!r} is invalid: it must be > 0 (it keeps a "
                             "group of equal rewards from dividing by zero)")


def group_advantages(rewards_B: torch.Tensor, group_size: int, std_eps: float = 1e-4
                     ) -> torch.Tensor:
    """A_i = (r_i - mean) / (std + std_eps) within each group of `group_size` consecutive
    completions [B] -> [B] (fp32); the std is the unbiased one (G - 1 in the denominator)."""
    if group_size < 2:
        raise ValueError(f"group_size={group_size} is invalid: GRPO compares a prompt's "
                         "completions with each other, so it needs at least 2")
    if rewards_B.dim() != 1 or rewards_B.numel() % group_size:
        raise ValueError(f"rewards of shape {tuple(rewards_B.shape)}: a flat vector of whole "
                         f"groups of group_size={group_size} is needed")
    if not bool(torch.isfinite(rewards_B).all()):
        raise ValueError(f"rewards hold a NaN or Inf ({rewards_B.tolist()}): a reward "
                         "function must return finite numbers")
    rewards_PG = rewards_B.float().view(-1, group_size)
    mean_P1 = rewards_PG.mean(dim=1, keepdim=True)
    std_P1 = rewards_PG.std(dim=1, keepdim=True)
    advantages_PG = (rewards_PG - mean_P1) / (std_P1 + std_eps)
    # an all-equal group: exactly 0, not (r - mean) rounded to a tiny number over a tiny std
    equal_P1 = rewards_PG.amax(dim=1, keepdim=True) == rewards_PG.amin(dim=1, keepdim=True)
    return advantages_PG.masked_fill(equal_P1, 0.0).view(-1)


class LossTerms(NamedTuple):
    """The loss of a micro-batch (its share of the batch's loss) and the sums its metrics are
    made from; every sum is over completion tokens, to be added over micro-batches and ranks
    and divided by the token count."""

    loss: torch.Tensor          # scalar, with grad
    tokens: torch.Tensor        # number of completion tokens
    kl_sum: torch.Tensor        # sum of the per-token KL (0 when beta = 0)
    clipped_low: torch.Tensor   # tokens whose ratio fell below 1 - eps with A < 0 (clipped)
    clipped_high: torch.Tensor  # tokens whose ratio rose above 1 + eps with A > 0 (clipped)
    ratio_sum: torch.Tensor


def batch_normalizer(mask_BT: torch.Tensor, loss_type: str) -> torch.Tensor:
    """What a piece of the batch contributes to the batch's normalizer: its completion tokens
    ("token") or its completions ("sequence"); sum it over micro-batches and ranks."""
    if loss_type == "token":
        return mask_BT.sum()
    return torch.tensor(float(mask_BT.shape[0]), device=mask_BT.device)


def grpo_loss(logp_BT: torch.Tensor, old_logp_BT: torch.Tensor,
              ref_logp_BT: Optional[torch.Tensor], advantages_B: torch.Tensor,
              mask_BT: torch.Tensor, cfg: GRPOLossConfig, normalizer: torch.Tensor | float
              ) -> LossTerms:
    """The module docstring's loss for one piece of the batch: sum over its tokens (or its
    completions' token means) / `normalizer`, the whole batch's count (batch_normalizer summed
    over every piece). ref_logp_BT is needed iff cfg.beta > 0."""
    if logp_BT.shape != mask_BT.shape or old_logp_BT.shape != mask_BT.shape:
        raise ValueError(f"logp {tuple(logp_BT.shape)}, old_logp {tuple(old_logp_BT.shape)} "
                         f"and mask {tuple(mask_BT.shape)} must have one shape [B, T]")
    if cfg.beta > 0 and ref_logp_BT is None:
        raise ValueError(f"beta={cfg.beta} needs the reference model's log-probs: pass "
                         "ref_logp_BT, or set beta=0 to train without the KL term")
    mask_BT = mask_BT.to(logp_BT.dtype)
    A_B1 = advantages_B.to(logp_BT.dtype).unsqueeze(1)
    ratio_BT = torch.exp(logp_BT - old_logp_BT)
    clipped_BT = ratio_BT.clamp(1 - cfg.epsilon_low, 1 + cfg.epsilon_high)
    loss_BT = -torch.min(ratio_BT * A_B1, clipped_BT * A_B1)
    kl_sum = logp_BT.new_zeros(())
    if cfg.beta > 0:
        log_ref_over_theta_BT = ref_logp_BT - logp_BT
        kl_BT = torch.exp(log_ref_over_theta_BT) - log_ref_over_theta_BT - 1
        loss_BT = loss_BT + cfg.beta * kl_BT
        kl_sum = (kl_BT * mask_BT).sum().detach()
    if cfg.loss_type == "token":
        total = (loss_BT * mask_BT).sum()
    else:
        total = ((loss_BT * mask_BT).sum(1) / mask_BT.sum(1).clamp(min=1.0)).sum()
    with torch.no_grad():
        low = ((ratio_BT < 1 - cfg.epsilon_low) & (A_B1 < 0)).to(mask_BT.dtype)
        high = ((ratio_BT > 1 + cfg.epsilon_high) & (A_B1 > 0)).to(mask_BT.dtype)
        terms = (mask_BT.sum(), kl_sum, (low * mask_BT).sum(), (high * mask_BT).sum(),
                 (ratio_BT * mask_BT).sum())
    return LossTerms(total / normalizer, *terms)
