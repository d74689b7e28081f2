"""The bf16 grouped GEMM's Triton kernel (kernels/grouped_gemm.py) on a GPU (skipped without
CUDA; CI has none).

  * the forward (x W_e^T, W read through a transposed view) and the input gradient (dy W_e, W
    as stored) at the proxy preset's fc1 (64 experts x 384 tokens, 2048 -> 2816), uneven
    groups with an empty expert and rows past the last end, under the default launch config
    and the other schedule: against the reference (fp32 products expert by expert) and
    torch._grouped_mm, within one bf16 rounding of two fp32 sums in different orders; the
    rows past the last end exactly zero;
  * RoutedExperts with experts_impl='triton' against 'grouped_mm' on the same bf16 weights:
    output, input and weight gradients (the weight gradients are the same torch._grouped_mm on
    nearly the same operands), eager and compiled by inductor with fullgraph (the custom
    operator traced, no graph break).
"""

import pytest
import torch
from helpers.tolerance import BF16, assert_close

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

EXPERTS, TOKENS, K, N = 64, 384, 2048, 2816
PADDING = 100  # rows past the last end
# each side's fp32 sum rounded to bf16: one ulp apart at most, 2^-7 of an element at most
ONE_BF16_ROUNDING = 2.0**-7


def _ends(seed: int, rows: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    weights = 0.5 + torch.rand(EXPERTS, generator=g)
    weights[7] = 0  # an empty expert
    counts = (weights / weights.sum() * rows).floor().long()
    counts[-1] += rows - counts.sum()
    return counts.cumsum(0).to(torch.int32).cuda()


@pytest.mark.parametrize("schedule", ["experts", "rows"])
def test_kernel_matches_the_reference_and_grouped_mm_in_bf16(schedule):
    from megatron_dsv3.kernels.grouped_gemm import grouped_gemm_reference, launch_grouped_gemm

    seed = int(torch.randint(0, 2**31 - 1, ()))
    torch.manual_seed(seed)
    m = EXPERTS * TOKENS
    ends = _ends(seed, m - PADDING)
    w = (torch.randn(EXPERTS, N, K, device="cuda") * 0.02).bfloat16()
    x = torch.randn(m, K, device="cuda").bfloat16()
    dy = (torch.randn(m, N, device="cuda") * 1e-3).bfloat16()
    last = int(ends[-1])
    for gemm, a, b in (("forward", x, w.transpose(-2, -1)), ("input gradient", dy, w)):
        name = f"{gemm}, tiles over the {schedule} (seed {seed})"
        got = launch_grouped_gemm(a, b, ends, config={"SCHEDULE": schedule})
        assert_close(got, grouped_gemm_reference(a, b, ends), ONE_BF16_ROUNDING,
                     "fp32 sums in two orders, each rounded to bf16", name)
        assert_close(got[:last], torch._grouped_mm(a, b, offs=ends)[:last], ONE_BF16_ROUNDING,
                     "fp32 sums in two orders, each rounded to bf16", name + ", _grouped_mm")
        assert (got[last:] == 0).all(), name + ": rows past the last end are zero"


@pytest.mark.parametrize("compiled", [False, True])
def test_triton_experts_match_grouped_mm_experts(compiled, monkeypatch):
    from megatron_dsv3.moe.experts import RoutedExperts

    monkeypatch.setenv("TORCHDYNAMO_DISABLE", "0")  # scripts/test.sh turns dynamo off
    seed = int(torch.randint(0, 2**31 - 1, ()))
    experts = {}
    for impl in ("triton", "grouped_mm"):
        torch.manual_seed(seed)
        experts[impl] = RoutedExperts(16, 512, 256, tp_group=None, dtype=torch.bfloat16,
                                      device="cuda", impl=impl, init_std=0.02)
    counts = torch.randint(0, 200, (16,), device="cuda")
    counts[3] = 0
    x = torch.randn(int(counts.sum()), 512, device="cuda").bfloat16()
    grad_out = torch.randn(x.shape[0], 512, device="cuda")
    results = {}
    for impl, module in experts.items():
        run = torch.compile(module, fullgraph=True) if compiled else module
        x_in = x.clone().requires_grad_()
        out = run(x_in, counts)
        (out.float() * grad_out).sum().backward()
        results[impl] = (out, x_in.grad, module.fc1.grad, module.fc2.grad)
    torch._dynamo.reset()
    for name, got, want in zip(("output", "dx", "dfc1", "dfc2"), results["triton"],
                               results["grouped_mm"]):
        assert_close(got, want, BF16, "bf16 GEMMs and activations, fp32 sums in other orders",
                     f"{name}, compiled={compiled} (seed {seed})")
