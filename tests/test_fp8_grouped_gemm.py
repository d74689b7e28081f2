"""The routed experts' grouped FP8 GEMM on the CPU: the emulation (fp8/grouped_gemm.py) and the
Triton kernel (kernels/fp8_grouped_gemm.py) in Triton's interpreter.

  * the emulation, forward (x W_e^T) and input-gradient form (dy W_e through
    transposed_blocks_grouped), against float64 products of the dequantized operands expert
    by expert: within fp32 summation (tolerance.FP32_REORDER; the products of FP8 values are
    exact in fp32, only the sums round); groups uneven, one expert empty, boundaries inside
    128-row tiles, rows past the last end exactly zero;
  * each expert's weight has its own 128x128 blocks (an outlier in one expert leaves the
    others' scales as they were, with N not a multiple of 128);
  * the kernel in Triton's interpreter (a fresh process) against the emulation on the same
    operands: forward and input gradient, the default launch config (tiles of 128 rows that
    straddle expert boundaries), the forward with tiles over each expert's rows
    (SCHEDULE="experts"), 32 x 256 tiles (a weight block's scale per column), and 32 x 128 tiles (an expert over several tiles, a tile over
    several experts, an empty expert inside a tile), padding rows, one expert, fp16 output;
    the output buffer is poisoned with NaN first, so an element the kernel does not write
    fails. The interpreter runs the FP8 tl.dot itself: it converts the E4M3 operands to fp16
    (exact: 3 mantissa bits, exponents 2^-9..2^8) and sums in fp32, so the kernel's index,
    mask and scale logic is what is compared; within FP32_REORDER (a different summation
    order). Hopper's narrower FP8 accumulator is tests/test_gpu_fp8_grouped.py's business;
  * the kernel compiles for Hopper (sm_90) on this GPU-less machine, as the JIT would for the
    benchmark's operands (pointers and row strides 16-byte aligned), with either schedule of
    M tiles (over all rows; over each expert's rows): FP8 wgmma and a K loop
    software-pipelined with asynchronous copies (3 stages, 96 KiB of shared memory);
  * the CPU dispatch (fp8_grouped_gemm) is the emulation; bad inputs raise naming the argument.
Fresh random inputs each run; the seed is in every failure message.
"""

from __future__ import annotations

import textwrap

import pytest
import torch
from helpers.fp8_cases import fresh_seed, group_ends
from helpers.tolerance import FP32_REORDER, assert_close
from helpers.triton_interpreter import assert_ok_in_triton_interpreter

from megatron_dsv3.fp8.grouped_gemm import (
    Fp8GroupedTensor,
    fp8_grouped_gemm_emulated,
    quantize_128x128_grouped,
    transposed_blocks_grouped,
)
from megatron_dsv3.fp8.quantize import quantize_1x128, quantize_128x128
from megatron_dsv3.kernels.fp8_grouped_gemm import (
    fp8_grouped_gemm,
    launch_config,
    launch_fp8_grouped_gemm,
)

# rows per expert: uneven, expert 2 empty, ends 70 and 200 inside 128-row tiles, 9 padding rows
COUNTS = [70, 100, 0, 30, 180]
M, K, N = sum(COUNTS) + 9, 200, 136  # K and N not multiples of 128: partial blocks


def _operands():
    x = torch.randn(M, K) * torch.rand(M, 1) * 4  # rows of different magnitudes
    w = torch.randn(len(COUNTS), N, K) * 0.05 * torch.rand(len(COUNTS), 1, 1)
    dy = torch.randn(M, N) * 1e-3
    return x, w, dy


def _expected(a_MK: torch.Tensor, w_ENK: torch.Tensor, counts) -> torch.Tensor:
    """float64 rows of expert e times w_ENK[e]^T, zero past the last end."""
    out = torch.zeros(a_MK.shape[0], w_ENK.shape[1], dtype=torch.float64)
    start = 0
    for e, count in enumerate(counts):
        out[start:start + count] = a_MK[start:start + count].double() @ w_ENK[e].double().t()
        start += count
    return out


def test_emulated_forward_is_each_experts_product_of_the_dequantized_operands():
    seed = fresh_seed()
    x, w, _ = _operands()
    a, b = quantize_1x128(x), quantize_128x128_grouped(w)
    got = fp8_grouped_gemm_emulated(a, b, group_ends(COUNTS))
    want = _expected(a.dequantize(), b.dequantize(), COUNTS)
    assert_close(got, want, FP32_REORDER, "exact FP8 products, fp32 sums of 128-term blocks",
                 name=f"seed {seed}")
    assert (got[sum(COUNTS):] == 0).all() and (want[:sum(COUNTS)] != 0).all(), seed
    # the same as the dense FP8 GEMM of each expert's rows alone (gemm.py's promotion)
    assert torch.equal(got[70:170], fp8_grouped_gemm_emulated(
        quantize_1x128(x[70:170]), quantize_128x128_grouped(w[1:2]), group_ends([100]))), seed


def test_emulated_input_gradient_is_dy_times_each_experts_dequantized_weight():
    seed = fresh_seed()
    _, w, dy = _operands()
    wq = quantize_128x128_grouped(w)
    wq_t = transposed_blocks_grouped(wq)
    assert torch.equal(wq_t.dequantize(), wq.dequantize().transpose(1, 2)), seed
    a = quantize_1x128(dy)
    got = fp8_grouped_gemm_emulated(a, wq_t, group_ends(COUNTS))            # [M, K]
    want = _expected(a.dequantize(), wq.dequantize().transpose(1, 2), COUNTS)  # dy_e W_e
    assert_close(got, want, FP32_REORDER, "exact FP8 products, fp32 sums of 128-term blocks",
                 name=f"seed {seed}")
    assert got.shape == (M, K) and (got[sum(COUNTS):] == 0).all(), seed


def test_each_expert_has_its_own_blocks_even_when_n_is_not_a_multiple_of_128():
    seed = fresh_seed()
    _, w, _ = _operands()
    before = quantize_128x128_grouped(w)
    w[1, 130, 5] = 1e3  # expert 1's second block row (rows 128..135)
    after = quantize_128x128_grouped(w)
    changed = (before.scales != after.scales).nonzero().tolist()
    assert changed == [[1, 1, 0]], (seed, changed)
    for e in range(len(COUNTS)):
        reference = quantize_128x128(w[e])
        assert torch.equal(after.scales[e], reference.scales), (seed, e)
        assert torch.equal(after.data[e].view(torch.uint8), reference.data.view(torch.uint8))


def test_the_cpu_dispatch_is_the_emulation():
    seed = fresh_seed()
    x, w, _ = _operands()
    a, b = quantize_1x128(x), quantize_128x128_grouped(w)
    assert torch.equal(fp8_grouped_gemm(a, b, group_ends(COUNTS), torch.bfloat16),
                       fp8_grouped_gemm_emulated(a, b, group_ends(COUNTS), torch.bfloat16)), seed


_INTERPRETED = textwrap.dedent("""
    import math
    import torch

    _empty = torch.empty

    def _poisoned_empty(*args, **kwargs):  # an output element the kernel misses stays NaN
        t = _empty(*args, **kwargs)
        return t.fill_(math.nan) if t.is_floating_point() else t

    torch.empty = _poisoned_empty

    from megatron_dsv3.fp8.grouped_gemm import (fp8_grouped_gemm_emulated,
        quantize_128x128_grouped, transposed_blocks_grouped)
    from megatron_dsv3.fp8.quantize import quantize_1x128
    from megatron_dsv3.kernels.fp8_grouped_gemm import launch_fp8_grouped_gemm

    seed = int(torch.randint(0, 2**31 - 1, ()))
    torch.manual_seed(seed)
    # rows per expert, padding rows past the last end, launch config, K, N. The forward
    # contracts over K (K = 256: two blocks promoted in turn); the input gradient over a
    # weight [E, 128, N]'s 128 rows. N = 160 or 96: a partial column tile and weight block.
    CASES = {
        "tiles straddling boundaries, an empty expert, padding": (
            [70, 40, 0, 30], 9, None, 256, 160),
        "32-row tiles: an expert over several, a tile over four experts": (
            [50, 3, 0, 9, 40], 5, {"BLOCK_M": 32, "num_warps": 4}, 128, 96),
        "one expert, no padding, 64-column tiles": (
            [45], 0, {"BLOCK_M": 32, "BLOCK_N": 64}, 128, 96),
        "256-column tiles over two weight blocks (a scale per column)": (
            [20, 0, 13], 3, {"BLOCK_M": 32, "BLOCK_N": 256}, 128, 160),
    }
    for case, (counts, padding, config, K, N) in CASES.items():
        rows = sum(counts) + padding
        ends = torch.tensor(counts).cumsum(0).to(torch.int32)
        x = torch.randn(rows, K) * torch.rand(rows, 1) * 4
        dy = torch.randn(rows, 128) * 1e-3
        wq = quantize_128x128_grouped(torch.randn(len(counts), N, K) * 0.05)
        wq_dgrad = quantize_128x128_grouped(torch.randn(len(counts), 128, N) * 0.05)
        for gemm, a, b, schedule in (
                ("forward", quantize_1x128(x), wq, "rows"),
                ("input grad", quantize_1x128(dy), transposed_blocks_grouped(wq_dgrad), "rows"),
                ("forward", quantize_1x128(x), wq, "experts")):
            name = f"seed {seed}, {case}, {gemm}, tiles over the {schedule}"
            got = launch_fp8_grouped_gemm(a, b, ends,
                                          config={**(config or {}), "SCHEDULE": schedule})
            want = fp8_grouped_gemm_emulated(a, b, ends)
            assert not got.isnan().any(), name + ": every output element written"
            # tolerance.FP32_REORDER: the same FP8 products, sums reordered
            error = ((got - want).abs().max() / want.abs().max()).item()
            assert error <= 1e-5, f"{name}: relative error {error:.3e}"
            assert (got[sum(counts):] == 0).all(), name + ": padding rows are zero"
    got16 = launch_fp8_grouped_gemm(a, b, ends, torch.float16, config=config)
    assert torch.equal(got16, got.half()), f"seed {seed}: fp16 output is the fp32 one rounded"
    print("ok")
""")


def test_kernel_in_triton_interpreter_matches_the_emulation():
    assert_ok_in_triton_interpreter(_INTERPRETED)


@pytest.mark.parametrize("schedule", ["rows", "experts"])
def test_kernel_compiles_for_hopper_to_pipelined_fp8_wgmma(schedule):
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from megatron_dsv3.kernels.fp8_grouped_gemm import (
        LAUNCH_CONFIG,
        _fp8_grouped_gemm_kernel,
    )

    kernel = _fp8_grouped_gemm_kernel
    names = list(kernel.arg_names)
    # what the JIT specialises for contiguous torch operands with K, N multiples of 16
    unit_strides = ("stride_ak", "stride_ask", "stride_bk", "stride_bsk", "stride_on")
    constexprs = {"BLOCK_M": LAUNCH_CONFIG["BLOCK_M"], "BLOCK_N": LAUNCH_CONFIG["BLOCK_N"],
                  "TILE": 128, "E_POW2": 64, "PER_EXPERT": schedule == "experts",
                  **dict.fromkeys(unit_strides, 1)}
    pointers = {"a_ptr": "*fp8e4nv", "b_ptr": "*fp8e4nv", "a_scales_ptr": "*fp32",
                "b_scales_ptr": "*fp32", "ends_ptr": "*i32", "out_ptr": "*bf16"}
    signature = {name: "constexpr" if name in constexprs else pointers.get(name, "i32")
                 for name in names}
    aligned = [*pointers, "N", "K", "stride_am", "stride_be", "stride_bn", "stride_om"]
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    compiled = triton.compile(
        ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": LAUNCH_CONFIG["num_warps"],
                 "num_stages": LAUNCH_CONFIG["num_stages"]})
    ttgir, ptx = compiled.asm["ttgir"], compiled.asm["ptx"]
    assert "warp_group_dot " in ttgir and "e4m3" in ptx, "FP8 wgmma on Hopper"
    assert ttgir.count("async_copy_global_to_local") == 2 * LAUNCH_CONFIG["num_stages"], \
        "a and b tiles loaded asynchronously, num_stages deep"
    # each stage holds a BLOCK_M x 128 tile of a and a BLOCK_N x 128 tile of b, one byte each
    assert compiled.metadata.shared == (LAUNCH_CONFIG["num_stages"] * 128
                                        * (LAUNCH_CONFIG["BLOCK_M"] + LAUNCH_CONFIG["BLOCK_N"]))


def test_bad_inputs_raise_naming_the_argument_and_the_fix():
    x, w, dy = _operands()
    a, b, ends = quantize_1x128(x), quantize_128x128_grouped(w), group_ends(COUNTS)
    with pytest.raises(ValueError, match="a must be an Fp8Tensor .* in 1x128 tiles"):
        fp8_grouped_gemm_emulated(quantize_128x128(x), b, ends)
    with pytest.raises(ValueError, match="b must be an Fp8GroupedTensor"):
        fp8_grouped_gemm_emulated(a, quantize_128x128(w[0]), ends)
    with pytest.raises(ValueError, match="their K .* differ"):
        fp8_grouped_gemm_emulated(quantize_1x128(dy), b, ends)
    with pytest.raises(ValueError, match="group_ends must be a 1-D int32 tensor"):
        fp8_grouped_gemm_emulated(a, b, ends.long())
    with pytest.raises(ValueError, match="group_ends must be a 1-D int32 tensor"):
        fp8_grouped_gemm_emulated(a, b, ends[None])
    with pytest.raises(ValueError, match="group_ends has 4 entries and b has 5 experts"):
        fp8_grouped_gemm_emulated(a, b, ends[:4])
    with pytest.raises(ValueError, match="must be non-decreasing"):
        fp8_grouped_gemm_emulated(a, b, group_ends([70, 100, -1, 30, 180]))
    with pytest.raises(ValueError, match=f"at most M={M}"):
        fp8_grouped_gemm_emulated(a, b, group_ends([70, 100, 0, 30, 190]))
    # the kernel's own checks come before any launch, so they run on the CPU too
    with pytest.raises(ValueError, match="K=200 is not a multiple of 128"):
        launch_fp8_grouped_gemm(a, b, ends)
    a128, b128 = quantize_1x128(x[:, :128]), quantize_128x128_grouped(w[:, :, :128])
    with pytest.raises(ValueError, match="out_dtype=torch.int32"):
        launch_fp8_grouped_gemm(a128, b128, ends, torch.int32)
    with pytest.raises(ValueError, match=r"unknown keys \['BLOCK_K'\]"):
        launch_config({"BLOCK_K": 64})
    with pytest.raises(ValueError, match="w_ENK: a 3-D"):
        quantize_128x128_grouped(w[0])
    with pytest.raises(ValueError, match=r"scales: fp32 of shape \(5, 2, 2\)"):
        Fp8GroupedTensor(b.data, b.scales[:, :1])

    a128 = quantize_1x128(torch.randn(ends[-1].item(), 128))
    b128 = quantize_128x128_grouped(torch.randn(len(ends), 32, 128))
    with pytest.raises(ValueError, match=r"SCHEDULE='tiles'; use one of \('rows', 'experts'\)"):
        launch_fp8_grouped_gemm(a128, b128, ends, config={"SCHEDULE": "tiles"})