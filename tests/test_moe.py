"""DeepSeekMoE: grouped GEMM vs the loop, the dispatcher, the layer vs a naive per-token MoE,
and the injected sequence-wise balance loss.

Shape legend: T tokens (s-major, [s, b] flattened), D hidden, E experts, K experts per token,
F expert FFN width, N = T * K token-expert assignments sorted by expert.
"""

import pytest
import torch
import torch.nn.functional as F

from megatron_dsv3.config import tiny, to_megatron_config
from megatron_dsv3.moe.experts import experts_grouped_mm, experts_loop
from megatron_dsv3.moe.layer import DeepSeekMoE, LocalDispatcher
from megatron_dsv3.moe.router import Routing, count_tokens_per_expert
from helpers.tolerance import BF16, FP32_REORDER, assert_close, assert_equal, relative_error
from test_router import naive_sequence_balance_loss


# ----------------------------------------------------------------------------------------------
# Routed experts: torch._grouped_mm against the per-expert loop
# ----------------------------------------------------------------------------------------------
def random_expert_problem(counts: list[int], hidden: int, ffn: int, *, dtype, device):
    g = torch.Generator().manual_seed(7)
    E, N = len(counts), sum(counts)
    x_ND = torch.randn(N, hidden, generator=g)
    fc1_EFD2 = torch.randn(E, 2 * ffn, hidden, generator=g) * hidden ** -0.5
    fc2_EDF = torch.randn(E, hidden, ffn, generator=g) * ffn ** -0.5
    to = dict(dtype=dtype, device=device)
    return (x_ND.to(**to), fc1_EFD2.to(**to), fc2_EDF.to(**to),
            torch.tensor(counts, device=device))


def grouped_mm_skip_reason(device: str) -> str | None:
    if not hasattr(torch, "_grouped_mm"):
        return f"torch {torch.__version__} has no torch._grouped_mm"
    try:
        experts_grouped_mm(*random_expert_problem([2, 0], 16, 8, dtype=torch.float32,
                                                  device=device))
    except (RuntimeError, NotImplementedError) as error:
        return f"torch._grouped_mm does not run on {device} in torch {torch.__version__}: {error}"
    return None


def test_grouped_mm_forward_equals_loop_with_empty_experts_cpu():
    reason = grouped_mm_skip_reason("cpu")
    if reason:
        pytest.skip(reason)
    # Experts 0, 2 and 5 get no rows (first, middle and last offsets repeat).
    args = random_expert_problem([0, 9, 0, 4, 13, 0, 1], 32, 16, dtype=torch.float32,
                                 device="cpu")
    assert_close(experts_grouped_mm(*args), experts_loop(*args), FP32_REORDER,
                 "fp32 GEMMs of one size through two kernels: summation order over D and F",
                 "grouped_mm vs loop")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_grouped_mm_forward_and_backward_equal_loop_in_bf16_cuda():
    reason = grouped_mm_skip_reason("cuda")
    if reason:
        pytest.skip(reason)
    counts = [0, 40, 7, 0, 128, 1, 33, 0]  # empty experts first, inside and last
    results = {}
    for name, impl in (("grouped_mm", experts_grouped_mm), ("loop", experts_loop)):
        x_ND, fc1, fc2, counts_E = random_expert_problem(counts, 256, 128,
                                                         dtype=torch.bfloat16, device="cuda")
        leaves = [t.requires_grad_() for t in (x_ND, fc1, fc2)]
        y_ND = impl(x_ND, fc1, fc2, counts_E)
        grad_y = torch.randn(y_ND.shape, generator=torch.Generator().manual_seed(3))
        y_ND.backward(grad_y.to(y_ND))
        results[name] = [y_ND.detach()] + [t.grad for t in leaves]
    why = ("bf16 GEMMs accumulate in fp32 in both, but cuBLAS and CUTLASS split the sums "
           "differently and the bf16 intermediate h rounds differently (8 mantissa bits)")
    for label, fast, ref in zip(("y", "dx", "dfc1", "dfc2"), results["grouped_mm"],
                                results["loop"]):
        assert_close(fast, ref, BF16, why, f"grouped_mm vs loop: {label}")
    # Experts without rows get exactly zero weight gradient.
    for expert in (0, 3, 7):
        assert results["grouped_mm"][2][expert].abs().max() == 0, f"dfc1[{expert}]"
        assert results["grouped_mm"][3][expert].abs().max() == 0, f"dfc2[{expert}]"


# ----------------------------------------------------------------------------------------------
# LocalDispatcher
# ----------------------------------------------------------------------------------------------
def hand_routing(topk_TK: torch.Tensor, gates_TK: torch.Tensor, num_experts: int) -> Routing:
    return Routing(topk_TK, gates_TK, torch.zeros(topk_TK.shape[0], num_experts),
                   count_tokens_per_expert(topk_TK, num_experts))


# 6 tokens, K = 2, 5 experts: expert 3 gets none, expert 0 gets 5 of the 12 assignments.
TOPK_TK = torch.tensor([[0, 2], [4, 0], [0, 1], [2, 0], [1, 4], [4, 0]])
GATES_TK = torch.tensor([[0.5, 0.25], [1.0, 0.125], [0.75, 0.5],
                         [0.25, 2.0], [1.5, 0.0625], [0.375, 0.625]])


def test_dispatch_rows_are_contiguous_per_expert_in_expert_order_and_none_dropped():
    T, K, E = 6, 2, 5
    x_TD = torch.arange(T, dtype=torch.float32).unsqueeze(-1).repeat(1, 3)  # row t holds t
    x_ND, counts_E, _ = LocalDispatcher().dispatch(x_TD, hand_routing(TOPK_TK, GATES_TK, E))

    assert_equal(counts_E, torch.tensor([5, 2, 2, 0, 3]), "tokens per expert")
    assert x_ND.shape[0] == T * K, f"{x_ND.shape=}: every (token, k) pair must be dispatched"
    start = 0
    for expert, count in enumerate(counts_E.tolist()):
        tokens = sorted(x_ND[start:start + count, 0].long().tolist())
        expected = sorted(t for t in range(T) if expert in TOPK_TK[t].tolist())
        assert tokens == expected, f"expert {expert}: rows hold tokens {tokens}, not {expected}"
        start += count


def test_combine_after_dispatch_with_identity_experts_is_gate_weighted_sum():
    E = 5
    x_TD = torch.tensor([[1.0, -2.0], [3.0, 0.5], [-1.0, 4.0],
                         [2.0, 2.0], [0.25, -8.0], [5.0, 1.0]])
    dispatcher = LocalDispatcher()
    x_ND, _, state = dispatcher.dispatch(x_TD, hand_routing(TOPK_TK, GATES_TK, E))
    out_TD = dispatcher.combine(x_ND, GATES_TK, state)
    # Dyadic inputs and gates: every product and sum is exact.
    expected_TD = torch.stack([sum(GATES_TK[t, k] * x_TD[t] for k in range(2))
                               for t in range(6)])
    assert_equal(out_TD, expected_TD, "combine(identity(dispatch(x)))")


def test_combine_returns_each_expert_output_to_its_token_and_slot():
    E = 5
    x_TD = torch.tensor([[1.0, -2.0], [3.0, 0.5], [-1.0, 4.0],
                         [2.0, 2.0], [0.25, -8.0], [5.0, 1.0]])
    dispatcher = LocalDispatcher()
    x_ND, counts_E, state = dispatcher.dispatch(x_TD, hand_routing(TOPK_TK, GATES_TK, E))
    # "Expert" e multiplies by (e + 1), so a row returned to the wrong slot changes the sum.
    expert_of_row_N = torch.repeat_interleave(torch.arange(E), counts_E)
    y_ND = x_ND * (expert_of_row_N + 1).unsqueeze(-1)
    out_TD = dispatcher.combine(y_ND, GATES_TK, state)
    expected_TD = torch.stack([sum(GATES_TK[t, k] * (TOPK_TK[t, k] + 1) * x_TD[t]
                                   for k in range(2)) for t in range(6)])
    assert_equal(out_TD, expected_TD, "combine(expert_scale(dispatch(x)))")


def test_dispatch_combine_gradients_match_autograd_of_plain_indexing(seed):
    T, K, E, D = 9, 3, 6, 4
    topk_TK = torch.stack([torch.randperm(E - 1)[:K] for _ in range(T)])  # expert 5 unused
    routing = hand_routing(topk_TK, torch.rand(T, K), E)
    grad_out_TD = torch.randn(T, D)

    # Through the dispatcher: x -> dispatch -> expert e scales by (e + 1) -> combine.
    x_TD = torch.randn(T, D, requires_grad=True)
    gates_TK = routing.gates_TK.clone().requires_grad_()
    dispatcher = LocalDispatcher()
    x_ND, counts_E, state = dispatcher.dispatch(x_TD, routing)
    y_ND = (x_ND * (torch.repeat_interleave(torch.arange(E), counts_E) + 1).unsqueeze(-1))
    y_ND.retain_grad()
    (dispatcher.combine(y_ND, gates_TK, state) * grad_out_TD).sum().backward()

    # Plain indexing: out_t = sum_k g_{t,k} (e_{t,k} + 1) x_t, autograd's own backward.
    x_ref = x_TD.detach().clone().requires_grad_()
    gates_ref = routing.gates_TK.clone().requires_grad_()
    out_ref = (gates_ref.unsqueeze(-1) * (topk_TK + 1).unsqueeze(-1) * x_ref.unsqueeze(1))
    (out_ref.sum(1) * grad_out_TD).sum().backward()

    why = "the K per-token terms are summed in another order"
    assert_close(x_TD.grad, x_ref.grad, FP32_REORDER, why, "dL/dx")
    assert_close(gates_TK.grad, gates_ref.grad, FP32_REORDER, why, "dL/dgates")
    # Row p of y_ND is assignment (t, k) = divmod(order[p], K): its gradient is g_{t,k} dL/dout_t.
    order_N = topk_TK.flatten().argsort(stable=True)
    t_N, k_N = order_N // K, order_N % K
    assert_equal(y_ND.grad, routing.gates_TK[t_N, k_N].unsqueeze(-1) * grad_out_TD[t_N],
                 "dL/dy (one product per element: exact)")


# ----------------------------------------------------------------------------------------------
# DeepSeekMoE against a naive per-token implementation
# ----------------------------------------------------------------------------------------------
def naive_select(choice_E: list[float], cfg) -> list[int]:
    """Top M groups by the sum of their two best choice scores, then top K inside them."""
    size = cfg.num_experts // cfg.num_groups
    groups = [list(range(g * size, (g + 1) * size)) for g in range(cfg.num_groups)]
    group_score = [sum(sorted((choice_E[e] for e in group), reverse=True)[:2])
                   for group in groups]
    kept = sorted(range(cfg.num_groups), key=lambda g: -group_score[g])[:cfg.topk_groups]
    candidates = [e for g in kept for e in groups[g]]
    return sorted(candidates, key=lambda e: -choice_E[e])[:cfg.top_k]


def naive_swiglu_ffn(x_D, fc1_FD2, fc2_DF):
    gate_F, up_F = (fc1_FD2 @ x_D).chunk(2)
    return fc2_DF @ (F.silu(gate_F) * up_F)


def naive_moe(x_TD, weights: dict, bias_E, cfg):
    """h'_t = shared(u_t) + sum_k g_{k,t} FFN_k(u_t), one token at a time (docs/architecture.md 3.2).
    Returns the output, the scores s_{i,t} and the chosen ids (for the balance loss)."""
    outputs, scores, chosen_all = [], [], []
    for x_D in x_TD:
        s_E = torch.sigmoid(weights["router.weight"] @ x_D)
        chosen = naive_select((s_E.detach() + bias_E).tolist(), cfg)
        g_K = s_E[chosen] / s_E[chosen].sum() * cfg.route_scale
        y_D = naive_swiglu_ffn(x_D, weights["shared_experts.linear_fc1.weight"],
                               weights["shared_experts.linear_fc2.weight"])
        for g, expert in zip(g_K, chosen):
            y_D = y_D + g * naive_swiglu_ffn(x_D, weights["experts.fc1"][expert],
                                             weights["experts.fc2"][expert])
        outputs.append(y_D)
        scores.append(s_E)
        chosen_all.append(chosen)
    return torch.stack(outputs), torch.stack(scores), torch.tensor(chosen_all)


def build_moe(dist_single, **moe_changes) -> DeepSeekMoE:
    """tiny()'s MoE (8 experts in 4 groups, keep 2, top-2, 1 shared, route scale 2.5), fp32 on
    CPU, with weights large enough that routing and FFN outputs are far from zero and ties."""
    cfg = tiny().replace(linear_backend="local", moe__experts_impl="loop",
                         **{f"moe__{k}": v for k, v in moe_changes.items()})
    moe = DeepSeekMoE(to_megatron_config(cfg, use_cpu_initialization=True), dist_single)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for param in moe.parameters():
            param.copy_(torch.randn(param.shape, generator=g) * param.shape[-1] ** -0.5)
        moe.router.expert_bias.copy_(torch.randn(cfg.moe.num_experts, generator=g) * 0.1)
    return moe


def moe_and_naive_grads(moe: DeepSeekMoE, s: int = 6, b: int = 2, aux_weight: float = 0.0):
    """Forward + backward of the module and of the naive version on the same inputs.

    The naive objective is main + aux_weight * L_bal (L_bal from the naive loop)."""
    g = torch.Generator().manual_seed(5)
    x_SBD = torch.randn(s, b, moe.router.weight.shape[1], generator=g)
    grad_out_SBD = torch.randn(x_SBD.shape, generator=g)

    x = x_SBD.clone().requires_grad_()
    out, _ = moe(x)
    (out * grad_out_SBD).sum().backward()
    module = {"out": out.detach(), "x": x.grad}
    module.update({name: p.grad for name, p in moe.named_parameters()})

    weights = {name: p.detach().clone().requires_grad_() for name, p in moe.named_parameters()}
    x_TD = x_SBD.reshape(s * b, -1).clone().requires_grad_()
    out_TD, scores_TE, topk_TK = naive_moe(x_TD, weights, moe.router.expert_bias, moe.cfg)
    objective = (out_TD * grad_out_SBD.reshape(s * b, -1)).sum()
    aux = naive_sequence_balance_loss(scores_TE, topk_TK, s, moe.cfg.num_experts,
                                      moe.cfg.top_k)
    (objective + aux_weight * aux).backward()
    naive = {"out": out_TD.detach().view(s, b, -1), "x": x_TD.grad.view(s, b, -1),
             "aux": aux.detach()}
    naive.update({name: w.grad for name, w in weights.items()})
    return module, naive


WHY_NAIVE = ("fp32; batched GEMMs and the einsum combine vs per-token matrix-vector products "
             "summed in a Python loop: summation order only")


def test_moe_forward_and_all_gradients_match_naive_per_token_moe(dist_single):
    moe = build_moe(dist_single, seq_aux_loss_coeff=0.0)
    moe.train()
    module, naive = moe_and_naive_grads(moe)
    assert set(module) - {"out", "x"} == set(naive) - {"out", "x", "aux"}, "parameter names"
    for name in module:
        assert module[name] is not None, f"{name}: no gradient"
        assert_close(module[name], naive[name], FP32_REORDER, WHY_NAIVE, name)


def test_moe_training_aux_loss_adds_coeff_times_scale_times_balance_loss_gradient(dist_single):
    # Far above V3's alpha = 1e-4, so that the balance term is a visible share (checked at
    # the end) of a router gradient that the main objective's T * D outputs otherwise swamp.
    coeff, scale = 8.0, 0.5
    moe = build_moe(dist_single, seq_aux_loss_coeff=coeff)
    moe.set_balance_loss_scale(scale)
    moe.train()
    module, naive = moe_and_naive_grads(moe, aux_weight=coeff * scale)

    for name in module:   # the router weight and the input carry the balance term
        assert_close(module[name], naive[name], FP32_REORDER, WHY_NAIVE, name)
    assert_close(moe.last_aux_loss, coeff * naive["aux"], FP32_REORDER, WHY_NAIVE,
                 "last_aux_loss")
    # The balance term must be visible in the router gradient, or this test proves nothing.
    _, main_only = moe_and_naive_grads(build_moe(dist_single, seq_aux_loss_coeff=0.0))
    visible = relative_error(module["router.weight"], main_only["router.weight"])
    assert visible > 100 * FP32_REORDER, f"aux term too small to test: {visible=:.2e}"


def test_moe_zero_aux_coeff_or_eval_mode_injects_nothing(dist_single):
    moe = build_moe(dist_single, seq_aux_loss_coeff=0.0)
    moe.train()
    module, naive = moe_and_naive_grads(moe, aux_weight=0.0)
    assert moe.last_aux_loss is None, f"{moe.last_aux_loss=}"
    assert_close(module["router.weight"], naive["router.weight"], FP32_REORDER, WHY_NAIVE,
                 "router.weight (main objective only)")

    moe = build_moe(dist_single, seq_aux_loss_coeff=0.5)
    moe.eval()
    module, naive = moe_and_naive_grads(moe, aux_weight=0.0)
    assert moe.last_aux_loss is None, f"eval mode: {moe.last_aux_loss=}"
    assert_close(module["router.weight"], naive["router.weight"], FP32_REORDER, WHY_NAIVE,
                 "router.weight in eval mode")


def test_training_without_the_balance_loss_scale_is_an_error_that_names_the_setter(dist_single):
    """The balance loss's gradient scale has no default: a forgotten one would silently give
    the wrong gradient (1 instead of 1 / micro-batches)."""
    from megatron_dsv3.moe.balance import set_balance_loss_scale

    moe = build_moe(dist_single, seq_aux_loss_coeff=0.5)
    moe.train()
    x = torch.randn(4, 2, moe.router.weight.shape[1])  # [s, b, d]
    with pytest.raises(RuntimeError, match="set_balance_loss_scale"):
        moe(x)
    with torch.no_grad():
        moe(x)  # no gradient, no balance loss: nothing to scale
    with pytest.raises(ValueError, match="must be > 0"):
        set_balance_loss_scale(moe, 0.0)
    assert set_balance_loss_scale(moe, 0.25) == 1
    out, _ = moe(x)
    assert moe.last_aux_loss is not None and out.requires_grad


def test_grouped_mm_training_on_cpu_is_refused_with_a_clear_error():
    """torch._grouped_mm's CPU backward fails deep inside torch; the choice is refused up front
    (inference on the CPU, without gradients, stays allowed)."""
    from megatron_dsv3.config import ConfigError
    from megatron_dsv3.moe.experts import experts_grouped_mm, pick_experts_impl

    with pytest.raises(ConfigError, match="experts_impl='grouped_mm'.*'loop' or 'auto'"):
        pick_experts_impl("grouped_mm", torch.device("cpu"))
    with torch.no_grad():
        assert pick_experts_impl("grouped_mm", torch.device("cpu")) is experts_grouped_mm
    assert pick_experts_impl("auto", torch.device("cpu")) is experts_loop


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_saves_only_its_input_and_its_gradient_equals_autograds(dtype):
    """experts.swiglu keeps h for backward (DeepSeek-V3: "SwiGLU input saved", the activation
    recomputed), where autograd's silu(gate) * up kept 1.5x h; the gradient is autograd's, bit
    for bit (the compiled experts, which run autograd's graph, must equal eager)."""
    from megatron_dsv3.moe.experts import swiglu

    seed = int(torch.randint(0, 2**31 - 1, ()))
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(37, 2 * 48, generator=g) * 3).to(dtype).requires_grad_()
    dy = torch.randn(37, 48, generator=g).to(dtype)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = swiglu(h)
    assert sum(t.numel() for t in saved) == h.numel(), f"saved {[t.shape for t in saved]}"
    (grad,) = torch.autograd.grad(y, h, dy)
    h_ref = h.detach().clone().requires_grad_()
    gate, up = h_ref.chunk(2, dim=-1)
    y_ref = F.silu(gate) * up
    assert torch.equal(y.detach(), y_ref.detach())
    (grad_ref,) = torch.autograd.grad(y_ref, h_ref, dy)
    assert torch.equal(grad, grad_ref), f"seed {seed}"
