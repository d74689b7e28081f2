"""The routed experts' weight gradients added into fp32 sums inside the grouped GEMM
(kernels/grouped_wgrad.py, RoutedExperts.grads_into_main_grad).

  * the Triton kernel in Triton's interpreter (a fresh process) against an fp64 computation,
    one segment of rows and three (an optimizer step's micro-batches), adding into the sum and
    storing it: ragged experts, one without rows (its sum untouched when adding, zero when
    storing), sizes that are not multiples of the tiles. The interpreter computes a bf16 dot
    wrongly (numpy has no bf16), so it runs fp16 operands through the same code; test_gpu.py
    checks bf16 on a GPU;
  * RoutedExperts in bf16 with the sums on (the op's reference path on the CPU) over two
    micro-batches against autograd on fp32 copies of the weights: the sums, no bf16 gradient
    left for autograd, the input gradients.
Fresh random inputs each run.
"""

from __future__ import annotations

import textwrap

import pytest
import torch

from helpers.tolerance import BF16, assert_close
from helpers.triton_interpreter import assert_ok_in_triton_interpreter
from megatron_dsv3.moe.experts import RoutedExperts, sum_expert_grads_in_gemm

_INTERPRETED = textwrap.dedent("""
    import torch
    from megatron_dsv3.kernels.grouped_wgrad import launch_grouped_wgrad
    seed = int(torch.randint(0, 2**31 - 1, ()))
    torch.manual_seed(seed)
    # (row counts per expert of each segment, O, I): one segment (a micro-batch's sums inside
    # the GEMM), three (an optimizer step's micro-batches) with an expert that has no rows in
    # any segment and one without rows in one of them
    cases = (([[7, 0, 33, 1, 20]], 40, 24), ([[16, 16]], 16, 48),
             ([[5, 0, 9, 17], [0, 0, 3, 30], [12, 0, 0, 1]], 24, 40))
    for counts, out_features, in_features in cases:
        counts = torch.tensor(counts)
        ends = counts.cumsum(1).to(torch.int32)
        rows = int(counts.sum(1).max()) + 3  # rows past a segment's last end are not read
        grad_y = torch.randn(len(counts), rows, out_features).half()
        x = torch.randn(len(counts), rows, in_features).half()
        expected = torch.zeros(counts.shape[1], out_features, in_features, dtype=torch.float64)
        for s in range(len(counts)):
            begin = 0
            for e, end in enumerate(ends[s].tolist()):
                expected[e] += grad_y[s, begin:end].double().t() @ x[s, begin:end].double()
                begin = end
        start_sum = torch.randn(counts.shape[1], out_features, in_features)
        for accumulate in (True, False):
            total = start_sum.clone()
            launch_grouped_wgrad(grad_y, x, ends, total, accumulate=accumulate, block_o=16,
                                 block_i=16, block_k=16)
            want = expected + start_sum.double() if accumulate else expected
            err = (total.double() - want).abs().max().item()
            assert err < 1e-4, (seed, counts.tolist(), accumulate, err)
            for e in (counts.sum(0) == 0).nonzero().flatten().tolist():
                assert torch.equal(total[e], start_sum[e] if accumulate
                                   else torch.zeros_like(total[e])), (
                    "an expert without rows: its sum untouched (accumulate) or zero (store)")
    print("ok")
""")


def test_kernel_in_triton_interpreter_matches_fp64():
    assert_ok_in_triton_interpreter(_INTERPRETED, timeout_s=300)


EXPERTS, HIDDEN, FFN = 4, 32, 16


def _experts(seed: int, dtype: torch.dtype, impl: str) -> RoutedExperts:
    torch.manual_seed(seed)
    return RoutedExperts(EXPERTS, HIDDEN, FFN, tp_group=None, dtype=dtype, impl=impl,
                         init_std=0.2)


@pytest.fixture
def grouped_mm_on_cpu(monkeypatch):
    """The grouped_mm experts on the CPU: their autograd backward (torch._grouped_mm's) has no
    CPU kernel, but with the sums on every backward GEMM is a forward _grouped_mm or the op's
    reference path, which run there."""
    from megatron_dsv3.moe import experts

    monkeypatch.setattr(experts, "resolve_experts_impl", lambda impl, device: impl)


def test_routed_experts_sum_their_weight_gradients_in_fp32_inside_the_gemm(grouped_mm_on_cpu):
    seed = int(torch.randint(0, 2**31 - 1, ()))
    fused = _experts(seed, torch.bfloat16, "grouped_mm")
    reference = _experts(seed, torch.bfloat16, "loop").float()  # the same (bf16) values
    start = {name: torch.randn(getattr(fused, name).shape) for name in ("fc1", "fc2")}
    for name in ("fc1", "fc2"):
        getattr(fused, name).main_grad = start[name].clone()
    assert sum_expert_grads_in_gemm(fused) == 1
    for micro in range(2):
        counts = torch.randint(0, 9, (EXPERTS,))
        counts[micro] = 0  # an expert without rows
        x = torch.randn(int(counts.sum()), HIDDEN)
        grad_out = torch.randn(x.shape[0], HIDDEN)
        x_fused = x.to(torch.bfloat16).requires_grad_()
        x_ref = x.to(torch.bfloat16).float().requires_grad_()
        (fused(x_fused, counts).float() * grad_out).sum().backward()
        (reference(x_ref, counts) * grad_out).sum().backward()
        assert_close(x_fused.grad.float(), x_ref.grad, BF16, "bf16 GEMMs and activations",
                     f"input gradient (seed {seed})")
    assert fused.fc1.grad is None and fused.fc2.grad is None, "nothing left for autograd"
    for name in ("fc1", "fc2"):
        assert_close(getattr(fused, name).main_grad - start[name],
                     getattr(reference, name).grad, BF16, "bf16 activations (h, swiglu)",
                     f"{name} fp32 sum (seed {seed})")


def test_sums_inside_the_gemm_need_an_fp32_main_grad(grouped_mm_on_cpu):
    experts = _experts(0, torch.bfloat16, "grouped_mm")
    sum_expert_grads_in_gemm(experts)
    x = torch.randn(6, HIDDEN, dtype=torch.bfloat16, requires_grad=True)
    with pytest.raises(ValueError, match="main_grad"):
        experts(x, torch.tensor([2, 0, 3, 1]))


def test_compiled_experts_add_the_same_sums_as_eager(grouped_mm_on_cpu, monkeypatch):
    """Under torch.compile (AOT autograd, the graphs inductor would get; fullgraph) the custom
    op's mutation of the sums happens once per backward, exactly as in eager."""
    monkeypatch.setenv("TORCHDYNAMO_DISABLE", "0")  # the suite turns dynamo off
    seed = int(torch.randint(0, 2**31 - 1, ()))
    experts = _experts(seed, torch.bfloat16, "grouped_mm")
    for weight in (experts.fc1, experts.fc2):
        weight.main_grad = torch.zeros(weight.shape)
    sum_expert_grads_in_gemm(experts)
    counts = torch.tensor([3, 0, 5, 8])
    x = torch.randn(16, HIDDEN, dtype=torch.bfloat16)

    def sums_after_two_backwards(run) -> list[torch.Tensor]:
        for weight in (experts.fc1, experts.fc2):
            weight.main_grad.zero_()
        for _ in range(2):
            run(x, counts).float().pow(2).sum().backward()
        return [w.main_grad.clone() for w in (experts.fc1, experts.fc2)]

    eager = sums_after_two_backwards(experts)
    torch._dynamo.reset()
    compiled = sums_after_two_backwards(torch.compile(experts, backend="aot_eager",
                                                      fullgraph=True))
    torch._dynamo.reset()
    for name, a, b in zip(("fc1", "fc2"), compiled, eager):
        assert b.abs().max() > 0
        assert torch.equal(a, b), f"{name} (seed {seed})"


def test_fp8_experts_sum_their_weight_gradients_in_the_gemm(grouped_mm_on_cpu, monkeypatch):
    """FP8 routed experts with the sums inside the GEMM (the GPU default): the forward and input
    gradient in FP8 (the grouped FP8 GEMM's emulation here, through fp8/ops.py as under
    torch.compile, which traces them), and the fp32 sums equal autograd's bf16 weight
    gradients of the same FP8 experts."""
    from megatron_dsv3.fp8 import ops as fp8_ops

    seed = int(torch.randint(0, 2**31 - 1, ()))
    fp8_gemms = []
    real_gemm = fp8_ops.grouped_gemm
    monkeypatch.setitem(fp8_ops._BODIES, "fp8_grouped_gemm",
                        lambda *a: fp8_gemms.append(1) or real_gemm(*a))
    # FP8 tiles of 128: widths that are multiples of it
    summed = RoutedExperts(2, 128, 128, tp_group=None, dtype=torch.bfloat16, impl="grouped_mm",
                           init_std=0.05)
    torch.manual_seed(seed)
    summed.fc1.data.normal_(0, 0.05)
    summed.fc2.data.normal_(0, 0.05)
    plain = RoutedExperts(2, 128, 128, tp_group=None, dtype=torch.bfloat16, impl="grouped_mm")
    plain.load_state_dict(summed.state_dict())
    for m in (summed, plain):
        m.fp8 = True
    for weight in (summed.fc1, summed.fc2):
        weight.main_grad = torch.zeros(weight.shape)
    sum_expert_grads_in_gemm(summed)
    counts = torch.tensor([100, 156])
    x = torch.randn(256, 128).to(torch.bfloat16)
    grad_out = torch.randn(256, 128)
    inputs = []
    for module in (summed, plain):
        inputs.append(x.clone().requires_grad_())
        (module(inputs[-1], counts).float() * grad_out).sum().backward()
    assert torch.equal(inputs[0].grad, inputs[1].grad), "the same FP8 input gradients"
    assert len(fp8_gemms) == 8, "forward and input gradient of fc1 and fc2, twice"
    assert summed.fc1.grad is None and summed.fc2.grad is None
    for name in ("fc1", "fc2"):
        assert_close(getattr(summed, name).main_grad, getattr(plain, name).grad.float(), BF16,
                     "the same FP8 activations; fp32 sums against autograd's bf16 gradients",
                     f"{name} (seed {seed})")
