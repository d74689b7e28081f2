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

The routed experts' grouped pieces (fp8/grouped_gemm.py's layouts; group_ends int32 [E]):

  torch.ops.megatron_dsv3.fp8_grouped_weight(w_ENK)          (data, scales): every expert's W
        in its own 128x128 blocks
  torch.ops.megatron_dsv3.fp8_grouped_gemm(a_data, a_scales, b_data, b_scales, group_ends,
                                           out_dtype)        expert e's rows of a times W_e^T
  torch.ops.megatron_dsv3.fp8_grouped_transposed(data, scales)   every W_e as W_e^T
  torch.ops.megatron_dsv3.fp8_quantize_segments(x_NI, group_ends)   (data [I, 128 T], scales
        [I, T]): segment-aligned 128x1 tiles, T = ceil(N/128) + E
  torch.ops.megatron_dsv3.fp8_grouped_wgrad(dy_data, dy_scales, x_data, x_scales, rows,
                                            group_ends, out_dtype)   dW [E, O, I]
  torch.ops.megatron_dsv3.fp8_grouped_wgrad_add_(..., rows, group_ends, sum_EOI)
        sum_EOI += dW in place (the fp32 sums inside the GEMM)

Each is opaque to the compiler (its body runs as written: a Triton kernel or cuBLASLt on a
GPU, the reference elsewhere) and has a fake implementation giving the output shapes, which
is all tracing needs. They take and return plain tensors: an Fp8Tensor is (data, scales) and
its tiling, passed as a string. Eager code calls their bodies (`quantize`, `gemm`,
`transposed`) directly: the dispatcher's round trip costs host time per call that a
small FP8 GEMM does not hide. `call(name, *args)` makes that choice for a caller.
"""

from __future__ import annotations

import torch

from ..kernels.fp8_grouped_gemm import fp8_grouped_gemm, quantize_128x128_grouped_fused
from ..kernels.fp8_grouped_wgrad import (fp8_grouped_wgrad, fp8_grouped_wgrad_add_,
                                         quantize_128x1_segments_fused)
from ..kernels.fp8_quantize import (quantize_1x128_fused, quantize_128x1_fused,
                                    quantize_128x128_fused)
from ..kernels.fp8_transpose import transposed_blocks_fused, transposed_blocks_grouped_fused
from .gemm import fp8_gemm
from .grouped_gemm import Fp8GroupedTensor, Fp8SegmentTiles, segment_tile_count
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


def _unaliased(outputs: tuple, *inputs: torch.Tensor) -> tuple:
    """A custom operator's outputs may not alias its inputs: a transposition's `.contiguous()`
    returns its input itself when a dimension is 1 (one block of scales); copy those."""
    storages = {t.untyped_storage().data_ptr() for t in inputs}
    return tuple(t.clone() if t.untyped_storage().data_ptr() in storages else t
                 for t in outputs)


@torch.library.custom_op("megatron_dsv3::fp8_transposed_blocks", mutates_args=())
def fp8_transposed_blocks(data: torch.Tensor, scales: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    return _unaliased(transposed(data, scales), data, scales)


@fp8_transposed_blocks.register_fake
def _transposed_fake(data: torch.Tensor, scales: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Both transpositions' outputs (one W or a stack of experts' W): data and scales with
    their last two dimensions swapped, contiguous."""
    return tuple(t.new_empty(*t.shape[:-2], t.shape[-1], t.shape[-2]) for t in (data, scales))


def grouped_weight(w_ENK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp8_grouped_weight's body, callable without the dispatcher (eager)."""
    w_q = quantize_128x128_grouped_fused(w_ENK)
    return w_q.data, w_q.scales


def grouped_gemm(a_data: torch.Tensor, a_scales: torch.Tensor, b_data: torch.Tensor,
                 b_scales: torch.Tensor, group_ends: torch.Tensor,
                 out_dtype: torch.dtype) -> torch.Tensor:
    """fp8_grouped_gemm's body, callable without the dispatcher (eager)."""
    return fp8_grouped_gemm(Fp8Tensor(a_data, a_scales, "1x128"),
                            Fp8GroupedTensor(b_data, b_scales), group_ends, out_dtype)


def grouped_transposed(data: torch.Tensor, scales: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """fp8_grouped_transposed's body, callable without the dispatcher (eager)."""
    w_T = transposed_blocks_grouped_fused(Fp8GroupedTensor(data, scales))
    return w_T.data, w_T.scales


def quantize_segments(x_NI: torch.Tensor, group_ends: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """fp8_quantize_segments's body, callable without the dispatcher (eager)."""
    x_q = quantize_128x1_segments_fused(x_NI, group_ends)
    return x_q.data, x_q.scales


def grouped_wgrad(dy_data: torch.Tensor, dy_scales: torch.Tensor, x_data: torch.Tensor,
                  x_scales: torch.Tensor, rows: int, group_ends: torch.Tensor,
                  out_dtype: torch.dtype) -> torch.Tensor:
    """fp8_grouped_wgrad's body, callable without the dispatcher (eager)."""
    return fp8_grouped_wgrad(Fp8SegmentTiles(dy_data, dy_scales, rows),
                             Fp8SegmentTiles(x_data, x_scales, rows), group_ends, out_dtype)


def grouped_wgrad_add(dy_data: torch.Tensor, dy_scales: torch.Tensor, x_data: torch.Tensor,
                      x_scales: torch.Tensor, rows: int, group_ends: torch.Tensor,
                      sum_EOI: torch.Tensor) -> None:
    """fp8_grouped_wgrad_add_'s body, callable without the dispatcher (eager)."""
    fp8_grouped_wgrad_add_(Fp8SegmentTiles(dy_data, dy_scales, rows),
                           Fp8SegmentTiles(x_data, x_scales, rows), group_ends, sum_EOI)


def _blocks(n: int) -> int:
    return -(-n // TILE)


@torch.library.custom_op("megatron_dsv3::fp8_grouped_weight", mutates_args=())
def fp8_grouped_weight(w_ENK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return grouped_weight(w_ENK)


@fp8_grouped_weight.register_fake
def _(w_ENK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    experts, n, k = w_ENK.shape
    return (w_ENK.new_empty(experts, n, k, dtype=FP8_DTYPE),
            w_ENK.new_empty(experts, _blocks(n), _blocks(k), dtype=torch.float32))


@torch.library.custom_op("megatron_dsv3::fp8_grouped_gemm", mutates_args=())
def fp8_grouped_gemm_op(a_data: torch.Tensor, a_scales: torch.Tensor, b_data: torch.Tensor,
                        b_scales: torch.Tensor, group_ends: torch.Tensor,
                        out_dtype: torch.dtype) -> torch.Tensor:
    return grouped_gemm(a_data, a_scales, b_data, b_scales, group_ends, out_dtype)


@fp8_grouped_gemm_op.register_fake
def _(a_data, a_scales, b_data, b_scales, group_ends, out_dtype) -> torch.Tensor:
    return a_data.new_empty(a_data.shape[0], b_data.shape[1], dtype=out_dtype)


@torch.library.custom_op("megatron_dsv3::fp8_grouped_transposed", mutates_args=())
def fp8_grouped_transposed(data: torch.Tensor, scales: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    return _unaliased(grouped_transposed(data, scales), data, scales)


fp8_grouped_transposed.register_fake(_transposed_fake)


@torch.library.custom_op("megatron_dsv3::fp8_quantize_segments", mutates_args=())
def fp8_quantize_segments(x_NI: torch.Tensor, group_ends: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    return quantize_segments(x_NI, group_ends)


@fp8_quantize_segments.register_fake
def _(x_NI: torch.Tensor, group_ends: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows, features = x_NI.shape
    tiles = segment_tile_count(rows, group_ends.shape[0])
    return (x_NI.new_empty(features, tiles * TILE, dtype=FP8_DTYPE),
            x_NI.new_empty(features, tiles, dtype=torch.float32))


@torch.library.custom_op("megatron_dsv3::fp8_grouped_wgrad", mutates_args=())
def fp8_grouped_wgrad_op(dy_data: torch.Tensor, dy_scales: torch.Tensor, x_data: torch.Tensor,
                         x_scales: torch.Tensor, rows: int, group_ends: torch.Tensor,
                         out_dtype: torch.dtype) -> torch.Tensor:
    return grouped_wgrad(dy_data, dy_scales, x_data, x_scales, rows, group_ends, out_dtype)


@fp8_grouped_wgrad_op.register_fake
def _(dy_data, dy_scales, x_data, x_scales, rows, group_ends, out_dtype) -> torch.Tensor:
    return dy_data.new_empty(group_ends.shape[0], dy_data.shape[0], x_data.shape[0],
                             dtype=out_dtype)


@torch.library.custom_op("megatron_dsv3::fp8_grouped_wgrad_add_", mutates_args=("sum_EOI",))
def fp8_grouped_wgrad_add_op(dy_data: torch.Tensor, dy_scales: torch.Tensor,
                             x_data: torch.Tensor, x_scales: torch.Tensor, rows: int,
                             group_ends: torch.Tensor, sum_EOI: torch.Tensor) -> None:
    grouped_wgrad_add(dy_data, dy_scales, x_data, x_scales, rows, group_ends, sum_EOI)


@fp8_grouped_wgrad_add_op.register_fake
def _(dy_data, dy_scales, x_data, x_scales, rows, group_ends, sum_EOI) -> None:
    return None


_BODIES = {"fp8_quantize": quantize, "fp8_gemm": gemm, "fp8_transposed_blocks": transposed,
           "fp8_grouped_weight": grouped_weight, "fp8_grouped_gemm": grouped_gemm,
           "fp8_grouped_transposed": grouped_transposed,
           "fp8_quantize_segments": quantize_segments, "fp8_grouped_wgrad": grouped_wgrad,
           "fp8_grouped_wgrad_add_": grouped_wgrad_add}


def call(name: str, *args):
    """torch.ops.megatron_dsv3.<name>(*args) while torch.compile traces, its body otherwise
    (eager: no dispatcher round trip)."""
    if torch.compiler.is_compiling():
        return getattr(torch.ops.megatron_dsv3, name)(*args)
    return _BODIES[name](*args)
