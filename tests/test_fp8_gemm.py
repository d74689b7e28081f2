"""FP8 GEMMs with FP32 promotion per 128-element K block (fp8/gemm.py) and the FP8 linear
(fp8/linear.py), on the CPU (the emulation every machine runs):

  * fp8_gemm for each of the linear's three operand pairs (1x128 x 128x128, 1x128 x the
    transposed blocks, 128x1 x 128x1), shapes not a multiple of 128, against float64 products
    of the dequantized operands: within fp32 summation of 128-term blocks;
  * fp8_linear's forward, input gradient and weight gradient equal fp8_gemm of the quantized
    operands exactly, and a float32 linear within the E4M3 bound (stated in the test); what
    backward keeps of x and W is FP8;
  * mismatched operands are refused naming them.
"""

from __future__ import annotations

import pytest
import torch

from megatron_dsv3.fp8.gemm import fp8_gemm, transposed_blocks
from megatron_dsv3.fp8.linear import fp8_linear
from megatron_dsv3.fp8.quantize import (FP8_DTYPE, quantize_1x128, quantize_128x1,
                                        quantize_128x128)

M, K, N = 130, 200, 72  # none a multiple of 128: partial tiles and blocks everywhere


def _operands(seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g) * torch.rand(M, 1, generator=g) * 4
    w = torch.randn(N, K, generator=g) * 0.05
    dy = torch.randn(M, N, generator=g) * 1e-3
    return x, w, dy


def _stored(t) -> torch.Tensor:
    """The dequantized operand in the layout fp8_gemm reads ([rows, K]: for 128x1 the
    transpose of the tensor that was quantized), float64."""
    values = t.dequantize().double()
    return values.t() if t.tiling == "128x1" else values


@pytest.mark.parametrize("gemm", ["forward", "input grad", "weight grad"])
def test_fp8_gemm_is_the_product_of_the_dequantized_operands(gemm):
    seed = int(torch.randint(0, 2**31 - 1, ()))
    x, w, dy = _operands(seed)
    a, b = {"forward": lambda: (quantize_1x128(x), quantize_128x128(w)),
            "input grad": lambda: (quantize_1x128(dy), transposed_blocks(quantize_128x128(w))),
            "weight grad": lambda: (quantize_128x1(dy), quantize_128x1(x))}[gemm]()
    got = fp8_gemm(a, b).double()
    want = _stored(a) @ _stored(b).t()
    # fp32 products of FP8 values are exact; each 128-term block sum and the sum over blocks
    # round at most 2^-24 relative per addition: |error| <= K * 2^-24 * sum |a_k b_k|
    scale = _stored(a).abs() @ _stored(b).abs().t()
    k = a.data.shape[1]
    assert ((got - want).abs() <= k * 2**-24 * scale + 1e-30).all(), seed
    assert got.shape == want.shape and (want != 0).any()


def test_fp8_linear_runs_its_three_gemms_in_fp8_and_keeps_fp8_for_backward():
    seed = int(torch.randint(0, 2**31 - 1, ()))
    x, w, dy = _operands(seed)
    xb = x.reshape(2, M // 2, K).requires_grad_()
    wp = w.clone().requires_grad_()
    bias = torch.randn(N, generator=torch.Generator().manual_seed(seed)).requires_grad_()
    y = fp8_linear(xb, wp, bias)
    kept = y.grad_fn.saved_tensors
    assert {t.dtype for t in kept} == {FP8_DTYPE, torch.float32}
    assert sum(t.numel() for t in kept if t.dtype == torch.float32) < x.numel() // 50, \
        "only scales in fp32: x and W are kept in FP8"
    y.backward(dy.reshape(2, M // 2, N))

    # exactly the FP8 GEMMs of the quantized operands
    assert torch.equal(y.reshape(M, N), fp8_gemm(quantize_1x128(x), quantize_128x128(w))
                       + bias.detach())
    assert torch.equal(xb.grad.reshape(M, K), fp8_gemm(
        quantize_1x128(dy), transposed_blocks(quantize_128x128(w))))
    assert torch.equal(wp.grad, fp8_gemm(quantize_128x1(dy), quantize_128x1(x)))
    assert torch.equal(bias.grad, dy.sum(0))

    # and a float32 linear within E4M3's rounding: each operand element is off by at most
    # 2^-4 of itself (3 mantissa bits, round to nearest), ~2^-4/sqrt(3) = 0.036 rms for
    # random data; the product's two operands add their errors in quadrature, but each tile's
    # largest values round less (measured: 0.035-0.037 for all three GEMMs): bound 0.05
    for got, want in ((y.detach().reshape(M, N), x @ w.t() + bias.detach()),
                      (xb.grad.reshape(M, K), dy @ w), (wp.grad, dy.t() @ x)):
        rel = ((got - want).norm() / want.norm()).item()
        assert rel < 0.05, (seed, rel)


def test_mismatched_operands_are_refused_naming_them():
    x, w, _ = _operands(0)
    with pytest.raises(ValueError, match="their K .* differ"):
        fp8_gemm(quantize_1x128(x), quantize_128x128(w[:, :100]))
    with pytest.raises(ValueError, match="a.tiling='128x128'"):
        fp8_gemm(quantize_128x128(w), quantize_128x128(w))
    with pytest.raises(ValueError, match="only 128x128 blocks"):
        transposed_blocks(quantize_1x128(w))
    with pytest.raises(ValueError, match="K must be x's last dimension"):
        fp8_linear(x.t(), w)
