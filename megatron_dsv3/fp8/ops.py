"""The FP8 pieces as PyTorch custom operators, so that torch.compile traces through an FP8 layer
instead of breaking its graph there (each piece of a broken graph is its own CUDA graph, with
Python and eager launches between them).

  torch.ops.megatron_dsv3.fp8_quantize(x, tiling)            (data, scales): the fused
        quantizers of kernels/fp8_quantize.py ("1x128", "128x1" stored transposed, "128x128")
  torch.ops.megatron_dsv3.fp8_gemm(a_data, a_scales, a_tiling, b_data, b_scales, b_tiling,
                                   out_dtype)                A B^T (fp8/gemm.py's fp8_gemm)
  torch.ops.megatron_dsv3.fp8_transposed_blocks(data, scales)
        a 128x128-quantized W [N, K] as W^T [K, N] (fp8/gemm.py's transposed_blocks; the
        transposition kernel of kernels/fp8_transpose.py on a GPU)

Each is opaque to the compiler (its body runs as written: a Triton kernel or cuBLASLt on a
GPU, the reference elsewhere) and has a fake implementation giving the output shapes, which
is all tracing needs. They take and return plain tensors: an Fp8Tensor is (data, scales) and
its tiling, passed as a string. Eager code calls their bodies (`quantize`, `gemm`,
`transposed`) directly: the dispatcher's round trip costs host time per call that a
small FP8 GEMM does not hide. `call(name, *args)` makes that choice for a caller.
"""

from __future__ import annotations

import torch

from ..kernels.fp8_quantize import (quantize_1x128_fused, quantize_128x1_fused,
                                    quantize_128x128_fused)
from ..kernels.fp8_transpose import transposed_blocks_fused
from .gemm import fp8_gemm
from .quantize import FP8_DTYPE, TILE, Fp8Tensor

_QUANTIZERS = {"1x128": quantize_1x128_fused, "128x1": quantize_128x1_fused,
               "128x128": quantize_128x128_fused}


def _check_tiling(tiling: str) -> None:
    if tiling not in _QUANTIZERS:
        raise ValueError(f"fp8_quantize: tiling={tiling!r}; use one of {sorted(_QUANTIZERS)}")


def quantize(x: torch.Tensor, tiling: str) -> tuple[torch.Tensor, torch.Tensor]:
    """fp8_quantize's body, callable without the dispatcher (eager)."""
    _check_tiling(tiling)
    quantized = _QUANTIZERS[tiling](x)
    return quantized.data, quantized.scales


def gemm(a_data: torch.Tensor, a_scales: torch.Tensor, a_tiling: str, b_data: torch.Tensor,
         b_scales: torch.Tensor, b_tiling: str, out_dtype: torch.dtype) -> torch.Tensor:
    """fp8_gemm's body, callable without the dispatcher (eager)."""
    return fp8_gemm(Fp8Tensor(a_data, a_scales, a_tiling), Fp8Tensor(b_data, b_scales, b_tiling),
                    out_dtype=out_dtype)


def transposed(data: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp8_transposed_blocks's body, callable without the dispatcher (eager)."""
    w_T = transposed_blocks_fused(Fp8Tensor(data, scales, "128x128"))
    return w_T.data, w_T.scales


@torch.library.custom_op("megatron_dsv3::fp8_quantize", mutates_args=())
def fp8_quantize(x: torch.Tensor, tiling: str) -> tuple[torch.Tensor, torch.Tensor]:
    return quantize(x, tiling)


@fp8_quantize.register_fake
def _(x: torch.Tensor, tiling: str) -> tuple[torch.Tensor, torch.Tensor]:
    _check_tiling(tiling)
    rows, cols = (x.shape[1], x.shape[0]) if tiling == "128x1" else tuple(x.shape)
    data = x.new_empty(rows, cols, dtype=FP8_DTYPE)
    if tiling == "128x128":
        return data, x.new_empty(-(-rows // TILE), -(-cols // TILE), dtype=torch.float32)
    # the quantizers' layout: one scale per row and block, outer-dimension-major
    return data, x.new_empty(-(-cols // TILE), rows, dtype=torch.float32).t()


@torch.library.custom_op("megatron_dsv3::fp8_gemm", mutates_args=())
def fp8_gemm_op(a_data: torch.Tensor, a_scales: torch.Tensor, a_tiling: str,
                b_data: torch.Tensor, b_scales: torch.Tensor, b_tiling: str,
                out_dtype: torch.dtype) -> torch.Tensor:
    return gemm(a_data, a_scales, a_tiling, b_data, b_scales, b_tiling, out_dtype)


@fp8_gemm_op.register_fake
def _(a_data, a_scales, a_tiling, b_data, b_scales, b_tiling, out_dtype) -> torch.Tensor:
    return a_data.new_empty(a_data.shape[0], b_data.shape[0], dtype=out_dtype)


@torch.library.custom_op("megatron_dsv3::fp8_transposed_blocks", mutates_args=())
def fp8_transposed_blocks(data: torch.Tensor, scales: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    return transposed(data, scales)


@fp8_transposed_blocks.register_fake
def _(data: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return data.new_empty(data.shape[1], data.shape[0]), scales.new_empty(scales.shape[1],
                                                                           scales.shape[0])


_BODIES = {"fp8_quantize": quantize, "fp8_gemm": gemm, "fp8_transposed_blocks": transposed}


def call(name: str, *args):
    """torch.ops.megatron_dsv3.<name>(*args) while torch.compile traces, its body otherwise
    (eager: no dispatcher round trip)."""
    if torch.compiler.is_compiling():
        return getattr(torch.ops.megatron_dsv3, name)(*args)
    return _BODIES[name](*args)
