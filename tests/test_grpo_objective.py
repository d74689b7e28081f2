"""GRPO's objective (rl/objective.py) against a direct computation, TRL 1.16's loss, and
autograd of a plain per-token loop.

The hand-made log-probs put tokens on both sides of the clipping range with both signs of
advantage, and garbage (large finite values) on masked positions; the oracle is written token
by token in float64 Python from the formulas of docs/grpo.md.
"""

from __future__ import annotations

import math
import types
from collections import defaultdict

import pytest
import torch
from helpers.tolerance import FP32_REORDER, assert_close

from megatron_dsv3.rl.objective import (GRPOLossConfig, batch_normalizer, group_advantages,
                                        grpo_loss)

EPS = 0.2


def _hand_made():
    """3 completions x 4 positions. Ratios exp(logp - old): row 0 (A > 0) 1.5 (clipped high),
    0.9, 1.1, masked; row 1 (A < 0) 0.5 (clipped low), 1.5 (not clipped: A < 0 keeps the
    larger loss), masked x2; row 2 (A = 0.3) 1.0, 0.7 (below the range with A > 0: not
    clipped), 1.3 (clipped high), 1.0."""
    old = torch.tensor([[-1.0, -2.0, -0.5, -3.0],
                        [-1.2, -0.7, -2.0, -1.0],
                        [-0.3, -1.1, -0.9, -2.2]], dtype=torch.float64)
    ratios = torch.tensor([[1.5, 0.9, 1.1, 7.0],
                           [0.5, 1.5, 9.0, 0.01],
                           [1.0, 0.7, 1.3, 1.0]], dtype=torch.float64)
    logp = old + ratios.log()
    ref = old + torch.tensor([[0.3, -0.2, 0.1, 5.0],
                              [-0.4, 0.6, 3.0, -4.0],
                              [0.0, 0.25, -0.5, 0.1]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.float64)
    advantages = torch.tensor([1.2, -0.8, 0.3], dtype=torch.float64)
    return logp, old, ref, advantages, mask


def _oracle(logp, old, ref, advantages, mask, beta, loss_type, eps_low=EPS, eps_high=EPS):
    """Token by token: -(min(r A, clip(r) A) - beta (ref/theta - log(ref/theta) - 1))."""
    per_row = []
    for b in range(logp.shape[0]):
        terms = []
        for t in range(logp.shape[1]):
            if not mask[b, t]:
                continue
            r = math.exp(logp[b, t] - old[b, t])
            a = float(advantages[b])
            surrogate = min(r * a, min(max(r, 1 - eps_low), 1 + eps_high) * a)
            q = math.exp(ref[b, t] - logp[b, t])
            terms.append(-(surrogate - beta * (q - math.log(q) - 1)))
        per_row.append(terms)
    if loss_type == "token":
        return sum(sum(t) for t in per_row) / sum(len(t) for t in per_row)
    return sum(sum(t) / len(t) for t in per_row) / len(per_row)


@pytest.mark.parametrize("loss_type", ["token", "sequence"])
@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_loss_equals_token_by_token_oracle(loss_type, beta):
    logp, old, ref, advantages, mask = _hand_made()
    cfg = GRPOLossConfig(beta=beta, loss_type=loss_type)
    terms = grpo_loss(logp, old, ref if beta else None, advantages, mask, cfg,
                      batch_normalizer(mask, loss_type))
    expected = _oracle(logp, old, ref, advantages, mask, beta, loss_type)
    # float64 on both sides, the same formula: only the order of the sums differs
    assert abs(terms.loss.item() - expected) <= 1e-12 * abs(expected)
    # clipped: row 0 pos 0 (high, A > 0), row 1 pos 0 (low, A < 0), row 2 pos 2 (high);
    # row 1 pos 1 (r = 1.5, A < 0) and row 2 pos 1 (r = 0.7, A > 0) are outside the range
    # but not clipped (the min keeps the unclipped term)
    assert (terms.clipped_low.item(), terms.clipped_high.item()) == (1.0, 2.0)
    assert terms.tokens.item() == 9.0


def test_asymmetric_clipping_range():
    """DAPO's clip-higher: epsilon_high = 0.6 lets row 0's ratio 1.5 through unclipped."""
    logp, old, ref, advantages, mask = _hand_made()
    cfg = GRPOLossConfig(beta=0.0, epsilon_low=0.2, epsilon_high=0.6)
    terms = grpo_loss(logp, old, None, advantages, mask, cfg, mask.sum())
    expected = _oracle(logp, old, ref, advantages, mask, 0.0, "token", 0.2, 0.6)
    assert abs(terms.loss.item() - expected) <= 1e-12 * abs(expected)
    assert terms.clipped_high.item() == 0.0  # 1.5 and 1.3 are below 1.6


def test_kl_estimator_values():
    """k3 = q - log q - 1 with q = pi_ref / pi_theta: 0 where the policies agree, positive
    elsewhere, and e - 2 for log q = 1 (hand-computed); advantages 0 leave the KL alone."""
    logp = torch.tensor([[-1.0, -1.0, -2.0]], dtype=torch.float64)
    ref = torch.tensor([[-1.0, 0.0, -1.0]], dtype=torch.float64)
    mask = torch.ones_like(logp)
    cfg = GRPOLossConfig(beta=1.0)
    terms = grpo_loss(logp, logp.detach(), ref, torch.zeros(1, dtype=torch.float64), mask,
                      cfg, mask.sum())
    expected_kl = 0.0 + 2 * (math.e - 1 - 1)
    assert abs(terms.kl_sum.item() - expected_kl) <= 1e-14
    assert abs(terms.loss.item() - expected_kl / 3) <= 1e-14


def test_masked_positions_do_not_reach_the_loss_or_gradient():
    logp, old, ref, advantages, mask = _hand_made()
    logp = logp.clone().requires_grad_(True)
    cfg = GRPOLossConfig(beta=0.1)
    grpo_loss(logp, old, ref, advantages, mask, cfg, mask.sum()).loss.backward()
    assert torch.all(logp.grad[mask == 0] == 0)
    assert torch.all(logp.grad[mask == 1] != 0)
    changed = logp.detach().clone()
    changed[mask == 0] += 100.0
    base = grpo_loss(logp.detach(), old, ref, advantages, mask, cfg, mask.sum()).loss
    assert grpo_loss(changed, old, ref, advantages, mask, cfg, mask.sum()).loss == base


@pytest.mark.parametrize("loss_type", ["token", "sequence"])
def test_gradient_equals_the_loop_oracle_gradient(loss_type):
    """d loss / d logp of ours against autograd through the token-by-token oracle."""
    logp, old, ref, advantages, mask = _hand_made()
    ours = logp.clone().requires_grad_(True)
    cfg = GRPOLossConfig(beta=0.1, loss_type=loss_type)
    grpo_loss(ours, old, ref, advantages, mask, cfg,
              batch_normalizer(mask, loss_type)).loss.backward()

    theirs = logp.clone().requires_grad_(True)
    terms = []
    for b in range(3):
        row = []
        for t in range(4):
            if mask[b, t]:
                r = torch.exp(theirs[b, t] - old[b, t])
                surrogate = torch.minimum(r * advantages[b],
                                          r.clamp(1 - EPS, 1 + EPS) * advantages[b])
                log_q = ref[b, t] - theirs[b, t]
                row.append(-(surrogate - 0.1 * (torch.exp(log_q) - log_q - 1)))
        terms.append(row)
    if loss_type == "token":
        loss = sum(sum(row) for row in terms) / sum(len(row) for row in terms)
    else:
        loss = sum(sum(row) / len(row) for row in terms) / len(terms)
    loss.backward()
    assert_close(ours.grad, theirs.grad, 1e-12, "float64, same formula, summation order")
    # clipped tokens pass no gradient through the ratio, only the KL term's
    q = torch.exp(ref[0, 0] - logp[0, 0])
    kl_grad = 0.1 * (1 - q) / (9 if loss_type == "token" else 3 * 3)
    assert abs(ours.grad[0, 0].item() - kl_grad.item()) <= 1e-14


# ----------------------------------------------------------------------------------------------
# TRL 1.16's GRPOTrainer._compute_loss, driven with tensors
# ----------------------------------------------------------------------------------------------
def _trl_loss(logp, old, ref, advantages, mask, *, beta, loss_type, num_processes=1,
              num_items_in_batch=None):
    """TRL's loss on our per-token log-probs: a GRPOTrainer without __init__, carrying only
    what _compute_loss reads, its log-prob function replaced by one returning `logp`."""
    pytest.importorskip("trl")
    from trl.trainer.grpo_trainer import GRPOTrainer as TRLGRPOTrainer

    identity = types.SimpleNamespace(
        num_processes=num_processes, sync_gradients=True,
        reduce=lambda t, reduction="sum": t, gather=lambda t: t,
        gather_for_metrics=lambda t: t)
    trainer = object.__new__(TRLGRPOTrainer)
    trainer.__dict__.update(
        beta=beta, loss_type=loss_type, epsilon_low=EPS, epsilon_high=EPS,
        top_entropy_quantile=1.0, aux_loss_enabled=False, off_policy_mask_threshold=None,
        importance_sampling_level="token", use_vllm=False, current_gradient_accumulation_steps=1,
        _entropy_bonus_enabled=False, _metrics=defaultdict(lambda: defaultdict(list)),
        model=types.SimpleNamespace(training=True), accelerator=identity,
        args=types.SimpleNamespace(delta=None, use_bias_correction_kl=False,
                                   steps_per_generation=1))
    trainer._get_per_token_logps_and_entropies = (
        lambda *a, **k: (logp, torch.zeros_like(logp), None))
    B, T = mask.shape
    inputs = {"prompt_ids": torch.zeros(B, 1, dtype=torch.long),
              "prompt_mask": torch.ones(B, 1, dtype=torch.long),
              "completion_ids": torch.zeros(B, T, dtype=torch.long),
              "completion_mask": mask, "advantages": advantages,
              "old_per_token_logps": old, "ref_per_token_logps": ref}
    if num_items_in_batch is not None:
        inputs["num_items_in_batch"] = torch.tensor(float(num_items_in_batch))
    return trainer._compute_loss(None, inputs), trainer._metrics["train"]


@pytest.mark.parametrize("ours,trl_type", [("token", "bnpo"), ("sequence", "grpo")])
def test_loss_and_gradient_equal_trl(ours, trl_type):
    logp, old, ref, advantages, mask = _hand_made()
    mine = logp.clone().requires_grad_(True)
    terms = grpo_loss(mine, old, ref, advantages, mask, GRPOLossConfig(beta=0.1, loss_type=ours),
                      batch_normalizer(mask, ours))
    terms.loss.backward()
    trl_logp = logp.clone().requires_grad_(True)
    trl_loss, metrics = _trl_loss(trl_logp, old, ref, advantages, mask, beta=0.1,
                                  loss_type=trl_type)
    trl_loss.backward()
    assert abs(terms.loss.item() - trl_loss.item()) <= 1e-12 * abs(trl_loss.item())
    assert_close(mine.grad, trl_logp.grad, 1e-12, "float64, same formula, summation order")
    # the same KL and clip fractions as TRL logs (token means over the completion tokens)
    tokens = terms.tokens.item()
    assert abs(terms.kl_sum.item() / tokens - metrics["kl"][0]) <= 1e-12
    assert abs(terms.clipped_low.item() / tokens - metrics["clip_ratio/low_mean"][0]) <= 1e-12
    assert abs(terms.clipped_high.item() / tokens - metrics["clip_ratio/high_mean"][0]) <= 1e-12


def test_token_loss_of_a_data_parallel_shard_equals_trl_dapo():
    """One of two processes' halves: our shard loss (normalizer = both halves' tokens) equals
    TRL's "dapo" on that process (num_items_in_batch = tokens of the whole batch, divided by
    the number of processes, whose gradients are then averaged), times the process count."""
    logp, old, ref, advantages, mask = _hand_made()
    half = slice(0, 2)
    ours = grpo_loss(logp[half], old[half], ref[half], advantages[half], mask[half],
                     GRPOLossConfig(beta=0.1), mask.sum()).loss
    trl_loss, _ = _trl_loss(logp[half], old[half], ref[half], advantages[half], mask[half],
                            beta=0.1, loss_type="dapo", num_processes=2,
                            num_items_in_batch=mask.sum())
    assert abs(2 * ours.item() - trl_loss.item()) <= 1e-12 * abs(trl_loss.item())


# ----------------------------------------------------------------------------------------------
# Advantages
# ----------------------------------------------------------------------------------------------
def test_advantages_are_normalised_per_group():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 2.0, 1.0, 0.0, 1.0])
    advantages = group_advantages(rewards, 4)
    expected = []
    for g in range(3):
        group = rewards[4 * g:4 * g + 4].tolist()
        mean = sum(group) / 4
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / 3)  # unbiased, as TRL's nanstd
        expected += [(r - mean) / (std + 1e-4) if std > 0 else 0.0 for r in group]
    assert_close(advantages, torch.tensor(expected), FP32_REORDER, "fp32 against float64")
    # the group of equal rewards: exactly zero, no NaN
    assert torch.equal(advantages[4:8], torch.zeros(4))
    assert bool(torch.isfinite(advantages).all())


def test_equal_rewards_that_do_not_sum_exactly_give_zero_advantage():
    """0.1 three times: their fp32 mean is not exactly 0.1, yet the advantage is exactly 0."""
    advantages = group_advantages(torch.tensor([0.1, 0.1, 0.1]), 3)
    assert torch.equal(advantages, torch.zeros(3))


def test_advantage_errors_name_the_fix():
    with pytest.raises(ValueError, match="at least 2"):
        group_advantages(torch.ones(4), 1)
    with pytest.raises(ValueError, match="whole groups"):
        group_advantages(torch.ones(5), 2)
    with pytest.raises(ValueError, match="finite"):
        group_advantages(torch.tensor([1.0, float("nan")]), 2)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="epsilon_low"):
        GRPOLossConfig(epsilon_low=1.0)
    with pytest.raises(ValueError, match="beta"):
        GRPOLossConfig(beta=-0.1)
    with pytest.raises(ValueError, match="loss_type"):
        GRPOLossConfig(loss_type="dr_grpo")
    with pytest.raises(ValueError, match="ref_logp_BT"):
        logp, old, _, advantages, mask = _hand_made()
        grpo_loss(logp, old, None, advantages, mask, GRPOLossConfig(beta=0.1), 1.0)
