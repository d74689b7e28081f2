"""The grouped FP8 GEMM's Triton kernel (kernels/fp8_grouped_gemm.py) on a GPU against its
emulation (fp8/grouped_gemm.py) on the same FP8 operands (skipped without CUDA; CI has none).

  * the forward (x W_e^T) and the input gradient (dy W_e, transposed_blocks_grouped) at
    64 experts x 384 tokens, K = 2048, N = 1408, operands quantized from bf16, uneven groups
    with an empty expert and padding rows past the last end: within Hopper's FP8 accumulator
    (tolerance.HOPPER_FP8_ACCUMULATION: the tensor cores sum each 128-element block's products
    in about 14 bits before the FP32 promotion; the emulation sums them exactly), the padding
    rows exactly zero;
  * a bf16 output is the fp32 output rounded (the same accumulation, one cast);
  * the stacked fused weight quantizer equals the per-expert reference bit for bit, and so do
    the transposition kernel's W^T blocks (kernels/fp8_transpose.py), grouped and of one;
  * the weight gradient (kernels/fp8_grouped_wgrad.py) on the same problem: the
    segment-aligned 128x1 quantizer kernel equals the reference bit for bit on bf16 dy and x
    (exact and power-of-two scales; NaN in the rows past the last end, which neither reads);
    the grouped wgrad GEMM (experts of 16-aligned rows and others) against
    fp8_grouped_wgrad_emulated within HOPPER_FP8_ACCUMULATION (each 128-token tile's products summed in the FP8 accumulator
    before the FP32 promotion, as above), stored in fp32 (the empty expert's dW exactly zero)
    and bf16 (the fp32 result rounded), and added into an fp32 sum (the empty expert's sum
    left bit for bit as it was).
"""

import pytest
import torch
from helpers.tolerance import HOPPER_FP8_ACCUMULATION, assert_close

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

EXPERTS, TOKENS, K, N = 64, 384, 2048, 1408
PADDING = 100  # rows past the last end


def _problem(seed: int):
    g = torch.Generator().manual_seed(seed)
    weights = 0.5 + torch.rand(EXPERTS, generator=g)
    weights[7] = 0  # an empty expert
    counts = (weights / weights.sum() * (EXPERTS * TOKENS - PADDING)).floor().long()
    counts[-1] += EXPERTS * TOKENS - PADDING - counts.sum()
    ends = counts.cumsum(0).to(torch.int32).cuda()
    x = torch.randn(EXPERTS * TOKENS, K, generator=g).cuda().bfloat16()
    w = (torch.randn(EXPERTS, N, K, generator=g) * 0.02).cuda().bfloat16()
    dy = (torch.randn(EXPERTS * TOKENS, N, generator=g) * 1e-3).cuda().bfloat16()
    return ends, x, w, dy


@pytest.mark.parametrize("gemm", ["forward", "input grad"])
def test_fp8_grouped_gemm_kernel_matches_the_emulation_within_hoppers_accumulator(gemm):
    from megatron_dsv3.fp8.grouped_gemm import (
        fp8_grouped_gemm_emulated,
        quantize_128x128_grouped,
        transposed_blocks_grouped,
    )
    from megatron_dsv3.fp8.quantize import quantize_1x128
    from megatron_dsv3.kernels.fp8_grouped_gemm import (
        fp8_grouped_gemm,
        uses_grouped_gemm_kernel,
    )

    seed = int(torch.randint(0, 2**31 - 1, ()))
    ends, x, w, dy = _problem(seed)
    wq = quantize_128x128_grouped(w)
    a, b = ((quantize_1x128(x), wq) if gemm == "forward"
            else (quantize_1x128(dy), transposed_blocks_grouped(wq)))
    assert uses_grouped_gemm_kernel(a, b)
    got = fp8_grouped_gemm(a, b, ends)
    want = fp8_grouped_gemm_emulated(a, b, ends)
    assert_close(got, want, HOPPER_FP8_ACCUMULATION,
                 "the same FP8 products and scales, Hopper's FP8 accumulator within a block",
                 name=f"{gemm}, seed {seed}")
    assert (got[-PADDING:] == 0).all(), (seed, "the rows past the last end are zero")
    assert torch.equal(fp8_grouped_gemm(a, b, ends, torch.bfloat16), got.bfloat16()), seed


def test_stacked_fused_weight_quantizer_equals_the_per_expert_reference_bit_for_bit():
    from megatron_dsv3.fp8.grouped_gemm import quantize_128x128_grouped
    from megatron_dsv3.kernels.fp8_grouped_gemm import quantize_128x128_grouped_fused

    _, _, w, _ = _problem(int(torch.randint(0, 2**31 - 1, ())))
    fused, reference = quantize_128x128_grouped_fused(w), quantize_128x128_grouped(w)
    assert torch.equal(fused.scales, reference.scales)
    assert torch.equal(fused.data.view(torch.uint8), reference.data.view(torch.uint8))


def test_fused_transpositions_of_the_weight_blocks_equal_the_references_bit_for_bit():
    from megatron_dsv3.fp8.gemm import transposed_blocks
    from megatron_dsv3.fp8.grouped_gemm import quantize_128x128_grouped, transposed_blocks_grouped
    from megatron_dsv3.kernels.fp8_transpose import (
        transposed_blocks_fused,
        transposed_blocks_grouped_fused,
    )

    seed = int(torch.randint(0, 2**31 - 1, ()))
    _, _, w, _ = _problem(seed)
    wq = quantize_128x128_grouped(w)
    for fused, reference in ((transposed_blocks_grouped_fused(wq), transposed_blocks_grouped(wq)),
                             (transposed_blocks_fused(wq.expert(3)),
                              transposed_blocks(wq.expert(3)))):
        assert fused.data.is_cuda and fused.data.shape == reference.data.shape, seed
        assert torch.equal(fused.scales, reference.scales), seed
        assert torch.equal(fused.data.view(torch.uint8), reference.data.view(torch.uint8)), seed


def _wgrad_operands(seed: int):
    """The problem's dy and x in segment-aligned 128x1 tiles (the references), and group_ends;
    NaN in the rows past the last end (no expert's: neither the quantizers nor the GEMM read
    them). The first half of the ends rounded down to multiples of 16, the others anywhere
    (the tiles start on 128-byte boundaries either way: fp8/grouped_gemm.py)."""
    from megatron_dsv3.fp8.grouped_gemm import quantize_128x1_segments

    ends, x, _, dy = _problem(seed)
    ends[:EXPERTS // 2] = ends[:EXPERTS // 2] // 16 * 16
    x[-PADDING:], dy[-PADDING:] = float("nan"), float("nan")
    return ends, x, dy, quantize_128x1_segments(dy, ends), quantize_128x1_segments(x, ends)


@pytest.mark.parametrize("pow2", [False, True], ids=["exact", "pow2"])
def test_segment_128x1_quantizer_kernel_equals_the_reference_bit_for_bit_in_bf16(pow2):
    from megatron_dsv3.fp8.grouped_gemm import quantize_128x1_segments
    from megatron_dsv3.kernels.fp8_grouped_wgrad import quantize_128x1_segments_fused
    from megatron_dsv3.kernels.fp8_quantize import uses_kernel

    seed = int(torch.randint(0, 2**31 - 1, ()))
    ends, x, dy, _, _ = _wgrad_operands(seed)
    assert uses_kernel(x)
    for name, t in (("x", x), ("dy", dy)):
        fused = quantize_128x1_segments_fused(t, ends, pow2_scales=pow2)
        reference = quantize_128x1_segments(t, ends, pow2_scales=pow2)
        assert torch.equal(fused.scales, reference.scales), (seed, name)
        assert torch.equal(fused.data.view(torch.uint8), reference.data.view(torch.uint8)), \
            (seed, name)


def test_fp8_grouped_wgrad_kernel_matches_the_emulation_within_hoppers_accumulator():
    from megatron_dsv3.fp8.grouped_gemm import fp8_grouped_wgrad_emulated
    from megatron_dsv3.kernels.fp8_grouped_wgrad import (
        fp8_grouped_wgrad,
        fp8_grouped_wgrad_add_,
        uses_wgrad_kernel,
    )

    seed = int(torch.randint(0, 2**31 - 1, ()))
    ends, _, _, dy_q, x_q = _wgrad_operands(seed)
    assert uses_wgrad_kernel(dy_q, x_q)
    got = fp8_grouped_wgrad(dy_q, x_q, ends)                                 # [E, N, K]
    want = fp8_grouped_wgrad_emulated(dy_q, x_q, ends)
    why = "the same FP8 products and scales, Hopper's FP8 accumulator within a tile"
    assert_close(got, want, HOPPER_FP8_ACCUMULATION, why, name=f"wgrad, seed {seed}")
    assert (got[7] == 0).all() and (want[6] != 0).any(), (seed, "the empty expert's dW is 0")
    assert torch.equal(fp8_grouped_wgrad(dy_q, x_q, ends, torch.bfloat16), got.bfloat16()), seed
    sum_EOI = torch.randn_like(got) * want.abs().max()  # at dW's size: fp32 rounds the add
    before = sum_EOI.clone()
    fp8_grouped_wgrad_add_(dy_q, x_q, ends, sum_EOI)
    assert_close(sum_EOI - before, want, HOPPER_FP8_ACCUMULATION, why,
                 name=f"wgrad added, seed {seed}")
    assert torch.equal(sum_EOI[7], before[7]), (seed, "the empty expert's sum is untouched")
    # N = 24576 - 1 tokens in contiguous rows: the unaligned experts' tiles loaded byte by byte
    from megatron_dsv3.fp8.grouped_gemm import quantize_128x1_segments

    ends, x, dy, _, _ = _wgrad_operands(seed)
    dy_q, x_q = quantize_128x1_segments(dy[:-1], ends), quantize_128x1_segments(x[:-1], ends)
    assert_close(fp8_grouped_wgrad(dy_q, x_q, ends), fp8_grouped_wgrad_emulated(dy_q, x_q, ends),
                 HOPPER_FP8_ACCUMULATION, why, name=f"wgrad, bytewise loads, seed {seed}")
