"""The routed experts' bf16 grouped GEMM (kernels/grouped_gemm.py) on the CPU and its
experts_impl 'triton' (moe/experts.py).

  * the Triton kernel in Triton's interpreter (a fresh process) against the reference (fp32
    products expert by expert): the forward form (b = W^T, a view: unit stride along K) and the
    input-gradient form (b = W as stored: unit stride along N), tiles over each expert's rows
    and over all rows (a tile across four experts), ragged experts, empty ones, rows past the
    last end (exactly zero), K and N not multiples of the tiles (masked loads), the default
    launch config; the output buffer is poisoned with NaN first, so an element the kernel does
    not write fails. The interpreter computes a bf16 dot wrongly (numpy has no bf16), so fp16
    operands run through the same code; tests/test_gpu_grouped_gemm.py checks bf16 on a GPU;
  * the reference equals torch._grouped_mm's product (its CPU forward) within bf16 rounding;
  * the custom operator passes torch.library.opcheck (schema, fake, autograd registration,
    AOT dispatch) and its gradients are autograd's of the reference;
  * bf16 RoutedExperts with experts_impl='triton' (the reference path here) against 'loop':
    output, input and weight gradients, plainly and with the weight gradients summed inside
    the GEMM (through _ExpertsLinear); under torch.compile (fullgraph, AOT autograd), both
    ways, the same as eager;
  * (extended) the kernel compiles for Hopper (sm_90) on this GPU-less machine, in both
    layouts, to bf16 wgmma with a K loop software-pipelined num_stages deep;
  * bad inputs raise naming the argument.
Fresh random inputs each run; the seed is in every failure message.
"""

from __future__ import annotations

import textwrap

import pytest
import torch
from helpers.fp8_cases import fresh_seed, group_ends
from helpers.tolerance import BF16, assert_close
from helpers.triton_interpreter import assert_ok_in_triton_interpreter

from megatron_dsv3.kernels.grouped_gemm import (
    grouped_gemm,
    grouped_gemm_op,
    grouped_gemm_reference,
    launch_config,
    launch_grouped_gemm,
)

_INTERPRETED = textwrap.dedent("""
    import math
    import torch

    _empty = torch.empty

    def _poisoned_empty(*args, **kwargs):  # an output element the kernel misses stays NaN
        t = _empty(*args, **kwargs)
        return t.fill_(math.nan) if t.is_floating_point() else t

    torch.empty = _poisoned_empty

    from megatron_dsv3.kernels.grouped_gemm import grouped_gemm_reference, launch_grouped_gemm

    seed = int(torch.randint(0, 2**31 - 1, ()))
    torch.manual_seed(seed)
    SMALL = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16}
    # rows per expert, rows past the last end, launch config, K, N
    CASES = {
        "tiles over each expert, an empty one, padding, K and N not multiples of the tiles": (
            [13, 0, 40, 5], 7, SMALL, 40, 48),
        "tiles over all rows, one across four experts (two empty)": (
            [13, 0, 2, 0, 40], 3, {**SMALL, "SCHEDULE": "rows"}, 32, 64),
        "the default launch config": ([70, 0, 30], 0, None, 64, 128),
    }
    for case, (counts, padding, config, K, N) in CASES.items():
        rows = sum(counts) + padding
        ends = torch.tensor(counts).cumsum(0).to(torch.int32)
        w = (torch.randn(len(counts), N, K) * 0.1).half()
        for gemm, a, b in (("forward", torch.randn(rows, K).half(), w.transpose(-2, -1)),
                           ("input gradient", torch.randn(rows, N).half(), w)):
            name = f"seed {seed}, {case}, {gemm}"
            got = launch_grouped_gemm(a, b, ends, config=config)
            want = grouped_gemm_reference(a, b, ends)
            assert not got.isnan().any(), name + ": every output element written"
            # fp32 sums in two orders, each rounded once to fp16 (2^-11): one ulp apart at most
            error = ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()
            assert error <= 2e-3, f"{name}: relative error {error:.3e}"
            assert (got[sum(counts):] == 0).all(), name + ": rows past the last end are zero"
    print("ok")
""")


def test_kernel_in_triton_interpreter_matches_the_reference():
    assert_ok_in_triton_interpreter(_INTERPRETED)


def test_reference_is_grouped_mms_product():
    seed = fresh_seed()
    counts = [5, 0, 17, 9]
    ends = group_ends(counts)
    x = torch.randn(sum(counts) + 2, 24, dtype=torch.bfloat16)
    w = torch.randn(len(counts), 40, 24, dtype=torch.bfloat16)
    got = grouped_gemm(x, w.transpose(-2, -1), ends)  # the CPU dispatch: the reference
    want = torch._grouped_mm(x, w.transpose(-2, -1), offs=ends)
    assert_close(got[:sum(counts)], want[:sum(counts)], BF16,
                 "fp32 sums in two orders, rounded to bf16", f"seed {seed}")
    assert (got[sum(counts):] == 0).all(), seed


def _op_inputs(transpose_w: bool):
    # bf16 with 16-byte rows: what torch._grouped_mm (the weight gradient) takes when traced
    counts = [3, 0, 4]
    w = torch.randn(len(counts), 8, 16, dtype=torch.bfloat16, requires_grad=True)
    a = torch.randn(sum(counts), 16 if transpose_w else 8, dtype=torch.bfloat16,
                    requires_grad=True)
    return a, w, group_ends(counts), transpose_w


@pytest.mark.parametrize("transpose_w", [True, False])
def test_custom_op_passes_opcheck_and_its_gradients_are_the_references(transpose_w):
    seed = fresh_seed()
    torch.library.opcheck(grouped_gemm_op, _op_inputs(transpose_w))
    a, w, ends, _ = _op_inputs(transpose_w)
    grad_out = torch.randn(a.shape[0], w.shape[1] if transpose_w else w.shape[2])
    (grouped_gemm_op(a, w, ends, transpose_w).float() * grad_out).sum().backward()
    a_ref, w_ref = a.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    b_ref = w_ref.transpose(-2, -1) if transpose_w else w_ref
    out_ref = torch.cat([a_ref[s:e] @ b_ref[i] for i, (s, e) in
                         enumerate(zip([0, 3, 3], [3, 3, 7]))])
    (out_ref * grad_out).sum().backward()
    for name, got, want in (("dA", a.grad, a_ref.grad), ("dW", w.grad, w_ref.grad)):
        assert_close(got, want, BF16, "fp32 sums of bf16 operands, rounded to bf16",
                     f"{name}, transpose_w={transpose_w} (seed {seed})")


EXPERTS, HIDDEN, FFN = 4, 32, 16


def _experts_pair(seed: int):
    from megatron_dsv3.moe.experts import RoutedExperts

    pair = []
    for impl in ("triton", "loop"):
        torch.manual_seed(seed)
        pair.append(RoutedExperts(EXPERTS, HIDDEN, FFN, tp_group=None, dtype=torch.bfloat16,
                                  impl=impl, init_std=0.2))
    return pair


def _forward_backward(experts, x, counts, grad_out):
    x = x.to(torch.bfloat16).requires_grad_()
    out = experts(x, counts)
    (out.float() * grad_out).sum().backward()
    return out.detach(), x.grad, experts.fc1.grad, experts.fc2.grad


def test_triton_experts_match_the_loop():
    seed = fresh_seed()
    triton_experts, loop = _experts_pair(seed)
    counts = torch.tensor([5, 0, 9, 2])
    x, grad_out = torch.randn(16, HIDDEN), torch.randn(16, HIDDEN)
    for name, got, want in zip(("output", "dx", "dfc1", "dfc2"),
                               _forward_backward(triton_experts, x, counts, grad_out),
                               _forward_backward(loop, x, counts, grad_out)):
        assert_close(got, want, BF16, "bf16 GEMMs and activations, fp32 sums in other orders",
                     f"{name} (seed {seed})")


def test_triton_experts_sum_weight_gradients_in_the_gemm_through_experts_linear():
    """_ExpertsLinear with impl 'triton': its forward and dX by the grouped GEMM's body, dW into
    the fp32 sums (grouped_wgrad_add_'s reference here)."""
    from megatron_dsv3.moe.experts import sum_expert_grads_in_gemm

    seed = fresh_seed()
    summed, loop = _experts_pair(seed)
    for weight in (summed.fc1, summed.fc2):
        weight.main_grad = torch.zeros(weight.shape)
    sum_expert_grads_in_gemm(summed)
    counts = torch.tensor([0, 7, 3, 6])
    x, grad_out = torch.randn(16, HIDDEN), torch.randn(16, HIDDEN)
    got = _forward_backward(summed, x, counts, grad_out)
    want = _forward_backward(loop, x, counts, grad_out)
    assert got[2] is None and got[3] is None, "nothing left for autograd"
    for name, a, b in (("output", got[0], want[0]), ("dx", got[1], want[1]),
                       ("fc1 sum", summed.fc1.main_grad, want[2]),
                       ("fc2 sum", summed.fc2.main_grad, want[3])):
        assert_close(a, b, BF16, "bf16 GEMMs and activations, fp32 sums in other orders",
                     f"{name} (seed {seed})")


def test_compiled_triton_experts_trace_without_a_graph_break(monkeypatch):
    """torch.compile(fullgraph=True) through the custom operator and its autograd (AOT
    autograd's graphs, what inductor would get): the same output and gradients as eager."""
    from megatron_dsv3.moe.experts import experts_triton

    monkeypatch.setenv("TORCHDYNAMO_DISABLE", "0")  # the suite turns dynamo off
    seed = fresh_seed()
    triton_experts, _ = _experts_pair(seed)
    counts = torch.tensor([3, 0, 8, 5])
    x, grad_out = torch.randn(16, HIDDEN), torch.randn(16, HIDDEN)

    def run(fn):
        fc1, fc2 = (w.detach().requires_grad_() for w in (triton_experts.fc1,
                                                          triton_experts.fc2))
        x_in = x.to(torch.bfloat16).requires_grad_()
        out = fn(x_in, fc1, fc2, counts)
        (out.float() * grad_out).sum().backward()
        return out.detach(), x_in.grad, fc1.grad, fc2.grad

    eager = run(experts_triton)
    torch._dynamo.reset()
    compiled = run(torch.compile(experts_triton, backend="aot_eager", fullgraph=True))
    torch._dynamo.reset()
    for name, a, b in zip(("output", "dx", "dfc1", "dfc2"), compiled, eager):
        assert torch.equal(a, b), f"{name} (seed {seed})"


def test_compiled_triton_experts_linear_adds_the_same_sums_as_eager(monkeypatch):
    """_ExpertsLinear with impl 'triton' (the job's path: weight gradients summed inside the
    GEMM) under torch.compile(fullgraph=True): its forward and dX through the custom operator,
    the same output, input gradient and sums as eager."""
    from megatron_dsv3.moe.experts import sum_expert_grads_in_gemm

    monkeypatch.setenv("TORCHDYNAMO_DISABLE", "0")  # the suite turns dynamo off
    seed = fresh_seed()
    experts, _ = _experts_pair(seed)
    sum_expert_grads_in_gemm(experts)
    counts = torch.tensor([6, 2, 0, 8])
    x, grad_out = torch.randn(16, HIDDEN), torch.randn(16, HIDDEN)

    def run(module):
        for weight in (experts.fc1, experts.fc2):
            weight.main_grad = torch.zeros(weight.shape)
        out, dx, _, _ = _forward_backward(module, x, counts, grad_out)
        return out, dx, experts.fc1.main_grad, experts.fc2.main_grad

    eager = run(experts)
    torch._dynamo.reset()
    compiled = run(torch.compile(experts, backend="aot_eager", fullgraph=True))
    torch._dynamo.reset()
    for name, a, b in zip(("output", "dx", "fc1 sum", "fc2 sum"), compiled, eager):
        assert b.abs().max() > 0 and torch.equal(a, b), f"{name} (seed {seed})"


@pytest.mark.extended
@pytest.mark.parametrize("layout", ["forward", "input gradient"])
def test_kernel_compiles_for_hopper_to_pipelined_bf16_wgmma(layout):
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from megatron_dsv3.kernels.grouped_gemm import LAUNCH_CONFIG, _grouped_gemm_kernel

    kernel = _grouped_gemm_kernel
    names = list(kernel.arg_names)
    # what the JIT specialises for contiguous torch operands with K, N multiples of 16: the
    # forward reads W [E, N, K] as W^T (unit stride along K), the input gradient W as stored
    unit_b, aligned_b = (("stride_bk", "stride_bn") if layout == "forward"
                         else ("stride_bn", "stride_bk"))
    constexprs = {key: LAUNCH_CONFIG[key] for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K")}
    constexprs.update({"E_POW2": 64, "PER_EXPERT": True, "EVEN_K": True, "EVEN_N": True,
                       "stride_ak": 1, "stride_on": 1, unit_b: 1})
    pointers = {"a_ptr": "*bf16", "b_ptr": "*bf16", "ends_ptr": "*i32", "out_ptr": "*bf16"}
    signature = {name: "constexpr" if name in constexprs else pointers.get(name, "i32")
                 for name in names}
    aligned = [*pointers, "N", "K", "stride_am", "stride_be", aligned_b, "stride_om"]
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    compiled = triton.compile(
        ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": LAUNCH_CONFIG["num_warps"],
                 "num_stages": LAUNCH_CONFIG["num_stages"]})
    ttgir = compiled.asm["ttgir"]
    stages = LAUNCH_CONFIG["num_stages"]
    assert "warp_group_dot " in ttgir, "bf16 wgmma on Hopper"
    assert ttgir.count("async_copy_global_to_local") == 2 * stages, \
        "a and b tiles loaded asynchronously, num_stages deep"
    # each stage holds a BLOCK_M x BLOCK_K tile of a and a BLOCK_K x BLOCK_N tile of b, 2 bytes
    assert compiled.metadata.shared == stages * 2 * LAUNCH_CONFIG["BLOCK_K"] * (
        LAUNCH_CONFIG["BLOCK_M"] + LAUNCH_CONFIG["BLOCK_N"])


def test_bad_inputs_raise_naming_the_argument_and_the_fix():
    x, w, ends = torch.randn(10, 8), torch.randn(3, 6, 8), group_ends([3, 0, 7])
    with pytest.raises(ValueError, match="a must be a 2-D tensor"):
        grouped_gemm(x[None], w.transpose(-2, -1), ends)
    with pytest.raises(ValueError, match=r"b must be a 3-D tensor \[E, K, N\]"):
        grouped_gemm(x, w[0].t(), ends)
    with pytest.raises(ValueError, match="their K differ"):
        grouped_gemm(x, w, ends)
    with pytest.raises(ValueError, match="a is torch.bfloat16 and b torch.float32"):
        grouped_gemm(x.bfloat16(), w.transpose(-2, -1), ends)
    with pytest.raises(ValueError, match="group_ends must be a 1-D int32 tensor"):
        grouped_gemm(x, w.transpose(-2, -1), ends.long())
    with pytest.raises(ValueError, match="group_ends has 2 entries and b has 3 experts"):
        grouped_gemm(x, w.transpose(-2, -1), ends[:2])
    with pytest.raises(ValueError, match="must be non-decreasing, from 0 to at most M=10"):
        grouped_gemm_reference(x, w.transpose(-2, -1), group_ends([3, 0, 8]))
    with pytest.raises(ValueError, match=r"unknown keys \['TILE'\]"):
        launch_config({"TILE": 64})
    with pytest.raises(ValueError, match=r"SCHEDULE='tiles'; use one of \('rows', 'experts'\)"):
        launch_grouped_gemm(x, w.transpose(-2, -1), ends, config={"SCHEDULE": "tiles"})
