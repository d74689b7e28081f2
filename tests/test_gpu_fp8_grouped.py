"""The grouped FP8 GEMM's Triton kernel (kernels/fp8_grouped_gemm.py) on a GPU against its
emulation (fp8/grouped_gemm.py) on the same FP8 operands (skipped without CUDA; CI has none).

  * the forward (x W_e^T) and the input gradient (dy W_e, transposed_blocks_grouped) at
    64 experts x 384 tokens, K = 2048, N = 1408, operands quantized from bf16, uneven groups
    with an empty expert and padding rows past the last end: within Hopper's FP8 accumulator
    (tolerance.HOPPER_FP8_ACCUMULATION: the tensor cores sum each 128-element block's products
    in about 14 bits before the FP32 promotion; the emulation sums them exactly), the padding
    rows exactly zero;
  * a bf16 output is the fp32 output rounded (the same accumulation, one cast);
  * the stacked fused weight quantizer equals the per-expert reference bit for bit.
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
