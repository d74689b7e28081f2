"""The FP8 blocks' transposition kernel (kernels/fp8_transpose.py), in Triton's interpreter on
the CPU, against torch's transpose of the same bytes: bit for bit, on partial tiles, one weight
and a stack of experts; and what it refuses. On a GPU, tests/test_gpu_fp8_grouped.py checks
the fused W^T against fp8/grouped_gemm.py's reference."""

from __future__ import annotations

import textwrap

import pytest
import torch

from helpers.triton_interpreter import assert_ok_in_triton_interpreter

_INTERPRETED = textwrap.dedent("""
    import torch
    from megatron_dsv3.fp8 import FP8_DTYPE
    from megatron_dsv3.kernels.fp8_transpose import launch_transpose_bytes

    seed = int(torch.randint(0, 2**31 - 1, ()))
    g = torch.Generator().manual_seed(seed)

    def fp8_bytes(*shape):  # every byte pattern, NaN encodings included: copied, not computed
        return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8).view(FP8_DTYPE)

    # partial tiles along both dimensions, several programs along every axis of the grid
    for shape, config in (((130, 260), None), ((3, 200, 300), None),
                          ((2, 70, 129), {"BLOCK": 64}), ((1, 1), None)):
        src = fp8_bytes(*shape)
        got = launch_transpose_bytes(src, config=config)
        want = src.transpose(-2, -1).contiguous()
        assert got.dtype == src.dtype and got.shape == want.shape, (seed, shape)
        assert got.is_contiguous(), (seed, shape)
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), (seed, shape, config)
    strided = fp8_bytes(300, 200).t()  # a transposed view: made contiguous first
    assert torch.equal(launch_transpose_bytes(strided).view(torch.uint8),
                       strided.t().contiguous().view(torch.uint8)), (seed, "strided")
    assert launch_transpose_bytes(fp8_bytes(4, 0, 7)).shape == (4, 7, 0)
    print("ok")
""")


def test_kernel_in_triton_interpreter_transposes_the_bytes_exactly():
    assert_ok_in_triton_interpreter(_INTERPRETED)


def test_off_gpu_the_fused_transpositions_are_the_references():
    from megatron_dsv3.fp8.gemm import transposed_blocks
    from megatron_dsv3.fp8.grouped_gemm import quantize_128x128_grouped, transposed_blocks_grouped
    from megatron_dsv3.fp8.quantize import quantize_128x128
    from megatron_dsv3.kernels.fp8_transpose import (transposed_blocks_fused,
                                                     transposed_blocks_grouped_fused)

    w = quantize_128x128(torch.randn(256, 384))
    got, want = transposed_blocks_fused(w), transposed_blocks(w)
    assert torch.equal(got.data.view(torch.uint8), want.data.view(torch.uint8))
    assert torch.equal(got.scales, want.scales) and got.data.shape == (384, 256)
    wg = quantize_128x128_grouped(torch.randn(3, 128, 256))
    got_g, want_g = transposed_blocks_grouped_fused(wg), transposed_blocks_grouped(wg)
    assert torch.equal(got_g.data.view(torch.uint8), want_g.data.view(torch.uint8))
    assert torch.equal(got_g.scales, want_g.scales) and got_g.data.shape == (3, 256, 128)


def test_bad_inputs_are_refused_naming_the_argument():
    from megatron_dsv3.kernels.fp8_transpose import launch_transpose_bytes

    with pytest.raises(ValueError, match="src must be a 2-D or 3-D tensor of a one-byte dtype"):
        launch_transpose_bytes(torch.zeros(4, 4))
    with pytest.raises(ValueError, match=r"got torch.uint8 of shape \(4,\)"):
        launch_transpose_bytes(torch.zeros(4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="transposed_blocks: w.tiling='1x128'"):
        from megatron_dsv3.fp8.quantize import quantize_1x128
        from megatron_dsv3.kernels.fp8_transpose import transposed_blocks_fused
        transposed_blocks_fused(quantize_1x128(torch.randn(4, 128)))
