"""Router: the bias only selects, node-limited groups, gates, balance loss, counts, bias step.

Hand-made cases use dyadic numbers (sums of powers of two), so every division and product
below is exact in fp32 and the asserts are bit-exact. Random cases compare against an
independent loop over tokens written from docs/architecture.md 3.2.

Shape legend: T tokens (s-major, [s, b] flattened), E experts, K experts per token.
"""

import pytest
import torch

from megatron_dsv3.config import MoEConfig
from megatron_dsv3.moe.router import (
    Router,
    count_tokens_per_expert,
    expert_bias_step,
    gate_values,
    select_experts,
    sequence_balance_loss,
)
from helpers.tolerance import FP32_REORDER, assert_close, assert_equal


def moe_config(**changes) -> MoEConfig:
    fields = dict(num_experts=4, top_k=2, expert_ffn_size=8, num_shared_experts=0,
                  first_k_dense=0, dense_ffn_size=0, route_scale=2.5)
    fields.update(changes)
    return MoEConfig(**fields)


def by_expert_id(topk_TK: torch.Tensor, gates_TK: torch.Tensor):
    """Selections as sets: each row's ids ascending, its gates permuted alike."""
    ids_TK, order_TK = topk_TK.sort(dim=-1)
    return ids_TK, gates_TK.gather(1, order_TK)


def naive_sequence_balance_loss(scores_TE: torch.Tensor, topk_TK: torch.Tensor,
                                seq_len: int, num_experts: int, top_k: int) -> torch.Tensor:
    """docs/architecture.md 3.2, one sequence at a time, without alpha:
    L = mean over sequences of sum_i f_i P_i, f_i = E / (K T) * #{t : i in TopK(t)},
    P_i = 1/T sum_t s_{i,t} / sum_j s_{j,t}. Token t of sequence j sits at row t * b + j."""
    batch = scores_TE.shape[0] // seq_len
    losses = []
    for j in range(batch):
        rows = [t * batch + j for t in range(seq_len)]
        counts = [0] * num_experts
        for row in rows:
            for expert in topk_TK[row].tolist():
                counts[expert] += 1
        loss = scores_TE.new_zeros(())
        for i in range(num_experts):
            f_i = num_experts / (top_k * seq_len) * counts[i]
            p_i = sum(scores_TE[row, i] / scores_TE[row].sum() for row in rows) / seq_len
            loss = loss + f_i * p_i
        losses.append(loss)
    return torch.stack(losses).mean()


# ----------------------------------------------------------------------------------------------
# Selection and gates
# ----------------------------------------------------------------------------------------------
def test_bias_flips_selected_experts_but_gates_use_raw_scores():
    cfg = moe_config()
    scores_TE = torch.tensor([[0.75, 0.25, 0.21875, 0.03125]])
    bias_E = torch.tensor([-1.0, 0.0, 0.5, 0.5])  # choice = [-0.25, 0.25, 0.71875, 0.53125]

    without_ids, without_gates = by_expert_id(
        select_experts(scores_TE, None, cfg),
        gate_values(scores_TE, select_experts(scores_TE, None, cfg), cfg))
    topk_TK = select_experts(scores_TE, bias_E, cfg)
    with_ids, with_gates = by_expert_id(topk_TK, gate_values(scores_TE, topk_TK, cfg))

    assert_equal(without_ids, torch.tensor([[0, 1]]), "ids without bias")
    assert_equal(with_ids, torch.tensor([[2, 3]]), "ids with bias")
    # Without: 0.75 / 1.0 * 2.5 and 0.25 / 1.0 * 2.5.
    assert_equal(without_gates, torch.tensor([[1.875, 0.625]]), "gates without bias")
    # With: the RAW scores 0.21875 and 0.03125 (sum 0.25), not the biased 0.71875 / 0.53125:
    # 0.21875 / 0.25 * 2.5 = 2.1875, 0.03125 / 0.25 * 2.5 = 0.3125.
    assert_equal(with_gates, torch.tensor([[2.1875, 0.3125]]), "gates with bias")


def test_group_limit_drops_group_with_best_expert_when_its_top2_sum_loses():
    # 4 groups of 2 experts, keep 2 groups, pick 2 experts.
    cfg = moe_config(num_experts=8, top_k=2, num_groups=4, topk_groups=2)
    scores_TE = torch.tensor([[0.90, 0.05,    # group 0: best expert (0.90), top-2 sum 0.95
                               0.60, 0.55,    # group 1: top-2 sum 1.15 (kept)
                               0.52, 0.48,    # group 2: top-2 sum 1.00 (kept)
                               0.10, 0.20]])  # group 3: 0.30
    # Unrestricted top-2 would be {0, 2}; expert 0's group is not among the top 2 groups.
    assert_equal(scores_TE.topk(2).indices.sort().values, torch.tensor([[0, 2]]), "ungrouped")
    ids_TK, _ = select_experts(scores_TE, None, cfg).sort(dim=-1)
    assert_equal(ids_TK, torch.tensor([[2, 3]]), "group-limited selection")


def test_group_limit_ranks_groups_by_biased_top2_sum():
    cfg = moe_config(num_experts=8, top_k=2, num_groups=4, topk_groups=2)
    scores_TE = torch.tensor([[0.90, 0.05, 0.60, 0.55, 0.52, 0.48, 0.10, 0.20]])
    # +0.3 on expert 1 lifts group 0's sum to 1.25 (> group 1's 1.15 > group 2's 1.00):
    # groups {0, 1} are kept, and expert 0 (0.90) and expert 2 (0.60) beat expert 1 (0.35).
    bias_E = torch.tensor([0.0, 0.3, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    ids_TK, _ = select_experts(scores_TE, bias_E, cfg).sort(dim=-1)
    assert_equal(ids_TK, torch.tensor([[0, 2]]), "group-limited selection with bias")


def test_group_limit_with_one_group_kept_selects_inside_it_only():
    cfg = moe_config(num_experts=8, top_k=2, num_groups=2, topk_groups=1)
    # group 0 = experts 0-3: top-2 sum 0.9 + 0.1 = 1.0; group 1 = experts 4-7: 0.7 + 0.6 = 1.3.
    scores_TE = torch.tensor([[0.90, 0.10, 0.05, 0.02, 0.70, 0.60, 0.30, 0.20],
                              [0.90, 0.80, 0.05, 0.02, 0.70, 0.60, 0.30, 0.20]])
    ids_TK, _ = select_experts(scores_TE, None, cfg).sort(dim=-1)
    assert_equal(ids_TK, torch.tensor([[4, 5], [0, 1]]), "one kept group per token")


@pytest.mark.parametrize("normalize", [True, False])
def test_gates_are_raw_scores_normalised_or_not_times_route_scale(normalize):
    cfg = moe_config(normalize_gates=normalize, route_scale=2.5)
    scores_TE = torch.tensor([[0.75, 0.25, 0.21875, 0.03125],
                              [0.5, 0.125, 0.0625, 0.25]])
    topk_TK = torch.tensor([[2, 3], [0, 3]])
    gates_TK = gate_values(scores_TE, topk_TK, cfg)
    if normalize:   # row 0: [0.21875, 0.03125] / 0.25 * 2.5; row 1: [0.5, 0.25] / 0.75 * 2.5
        expected = torch.tensor([[2.1875, 0.3125], [0.5 / 0.75 * 2.5, 0.25 / 0.75 * 2.5]])
        assert_close(gates_TK, expected, FP32_REORDER, "x / 0.75 rounds in fp32", "gates")
    else:           # raw scores * 2.5
        expected = torch.tensor([[0.546875, 0.078125], [1.25, 0.625]])
        assert_equal(gates_TK, expected, "gates")


def test_normalised_gates_sum_to_route_scale_on_random_scores(seed):
    cfg = moe_config(num_experts=16, top_k=4, num_groups=4, topk_groups=2, route_scale=2.5)
    scores_TE = torch.rand(64, 16)
    topk_TK = select_experts(scores_TE, torch.randn(16) * 0.1, cfg)
    sums_T = gate_values(scores_TE, topk_TK, cfg).sum(-1)
    assert_close(sums_T, torch.full((64,), 2.5), FP32_REORDER,
                 "K fp32 quotients summed", "gate sums")


# ----------------------------------------------------------------------------------------------
# Sequence-wise balance loss
# ----------------------------------------------------------------------------------------------
def test_balance_loss_hand_case_value_and_gradient_through_P_only():
    cfg = moe_config(num_experts=4, top_k=2)
    # One sequence of T = 2 tokens; every row sums to 1, so s' = s.
    scores_TE = torch.tensor([[0.5, 0.25, 0.125, 0.125],
                              [0.25, 0.5, 0.125, 0.125]], requires_grad=True)
    topk_TK = torch.tensor([[0, 1], [1, 2]])
    # counts [1, 2, 1, 0], f = E / (K T) * counts = counts; P = [0.375, 0.375, 0.125, 0.125]
    # L = 1 * 0.375 + 2 * 0.375 + 1 * 0.125 + 0 * 0.125 = 1.25
    loss = sequence_balance_loss(scores_TE, topk_TK, seq_len=2, cfg=cfg)
    assert_equal(loss.detach(), torch.tensor(1.25), "L_bal")

    # With f constant, dL/ds_{i,t} = (f_i - sum_k f_k s'_{k,t}) / (T * S_t), S_t = 1:
    # token 0: sum f s' = 1.125; token 1: sum f s' = 1.375.
    loss.backward()
    f = torch.tensor([1.0, 2.0, 1.0, 0.0])
    expected = torch.stack([(f - 1.125) / 2, (f - 1.375) / 2])
    assert_close(scores_TE.grad, expected, FP32_REORDER,
                 "autograd's quotient rule rounds in another order", "dL/ds")


def test_balance_loss_uniform_scores_is_one_whatever_the_selection(seed):
    cfg = moe_config(num_experts=8, top_k=2)
    scores_TE = torch.full((12, 8), 0.5)
    topk_TK = torch.stack([torch.randperm(8)[:2] for _ in range(12)])
    loss = sequence_balance_loss(scores_TE, topk_TK, seq_len=4, cfg=cfg)
    # P_i = 1/E for every i, so L = sum_i count_i / (K T) = 1 for every sequence.
    assert_close(loss, torch.tensor(1.0), FP32_REORDER, "fp32 sums of eighths", "L_bal")


def test_balance_loss_matches_per_sequence_loop_on_random_batch(seed):
    cfg = moe_config(num_experts=8, top_k=2, num_groups=4, topk_groups=2)
    seq_len, batch = 5, 3
    scores_TE = torch.rand(seq_len * batch, 8).requires_grad_()
    topk_TK = select_experts(scores_TE.detach(), torch.randn(8) * 0.2, cfg)

    loss = sequence_balance_loss(scores_TE, topk_TK, seq_len, cfg)
    (grad,) = torch.autograd.grad(loss, scores_TE)
    expected = naive_sequence_balance_loss(scores_TE, topk_TK, seq_len, 8, 2)
    (expected_grad,) = torch.autograd.grad(expected, scores_TE)
    why = "vectorised sums vs a Python loop over tokens: fp32 summation order"
    assert_close(loss, expected, FP32_REORDER, why, "L_bal")
    assert_close(grad, expected_grad, FP32_REORDER, why, "dL/ds")
    # The s-major order matters: reading the rows b-major gives another value.
    b_major_TE = scores_TE.detach().view(seq_len, batch, 8).transpose(0, 1).reshape(-1, 8)
    b_major_TK = topk_TK.view(seq_len, batch, 2).transpose(0, 1).reshape(-1, 2)
    wrong = naive_sequence_balance_loss(b_major_TE, b_major_TK, seq_len, 8, 2)
    assert (wrong - expected).abs() > 1e-3, "test inputs do not tell s-major from b-major"


# ----------------------------------------------------------------------------------------------
# Counts and the Router module
# ----------------------------------------------------------------------------------------------
def test_count_tokens_per_expert_equals_bincount(seed):
    topk_TK = torch.stack([torch.randperm(5)[:3] for _ in range(40)])  # expert 5 gets none
    counts = count_tokens_per_expert(topk_TK, num_experts=6)
    assert_equal(counts, torch.bincount(topk_TK.flatten(), minlength=6), "counts")
    assert counts[5] == 0 and counts.dtype == torch.int64


def test_router_accumulates_counts_in_training_mode_only(seed):
    cfg = moe_config(num_experts=8, top_k=2, num_groups=4, topk_groups=2)
    router = Router(16, cfg, dtype=torch.float32, init_std=0.5)
    router.expert_bias.copy_(torch.randn(8) * 0.1)
    x1, x2, x3 = torch.randn(10, 16), torch.randn(7, 16), torch.randn(9, 16)

    router.train()
    r1, r2 = router(x1), router(x2)
    expected = (torch.bincount(r1.topk_TK.flatten(), minlength=8)
                + torch.bincount(r2.topk_TK.flatten(), minlength=8))
    assert_equal(router.tokens_per_expert, expected, "counts after two training batches")

    router.eval()
    r3 = router(x3)
    assert_equal(router.tokens_per_expert, expected, "counts after an eval batch")
    assert_equal(r3.tokens_per_expert_E, torch.bincount(r3.topk_TK.flatten(), minlength=8),
                 "the eval batch's own counts")
    # The module routes as the pure functions do: sigmoid scores, biased selection.
    scores_TE = torch.sigmoid(torch.nn.functional.linear(x3, router.weight.detach()))
    assert_equal(r3.topk_TK, select_experts(scores_TE, router.expert_bias, cfg), "topk")


# ----------------------------------------------------------------------------------------------
# Bias update step
# ----------------------------------------------------------------------------------------------
def test_bias_step_lowers_overloaded_raises_underloaded_keeps_mean_load():
    load_E = torch.tensor([5, 1, 3, 3, 6, 0])          # mean 3
    bias_E = torch.tensor([0.25, -0.5, 0.125, 0.0, 0.0, 0.0])
    new_E = expert_bias_step(load_E, bias_E, rate=0.125)
    assert_equal(new_E, torch.tensor([0.125, -0.375, 0.125, 0.0, -0.125, 0.125]), "bias")

    new_E = expert_bias_step(load_E, torch.zeros(6), rate=1e-3)
    assert_equal(new_E, torch.tensor([-1e-3, 1e-3, 0.0, 0.0, -1e-3, 1e-3]), "bias, rate 1e-3")
