"""The routed experts' weight gradient in FP8 as Triton kernels: dW_e [O, I] = dy_e^T x_e over
expert e's rows, both operands in 128x1 tiles that restart at every expert's first row
("segment-aligned", fp8/grouped_gemm.py's module docstring), FP32 promotion at every tile.
The references, and the definitions, are fp8/grouped_gemm.py's quantize_128x1_segments and
fp8_grouped_wgrad_emulated.

  launch_quantize_128x1_segments(x_NI, group_ends)   the quantizer kernel, wherever Triton runs
  quantize_128x1_segments_fused(x_NI, group_ends)    the kernel on an NVIDIA GPU with FP8
                                                     (sm_89 and newer), the reference elsewhere
  launch_fp8_grouped_wgrad(dy_q, x_q, group_ends)    the GEMM kernel: dW [E, O, I], stored
  launch_fp8_grouped_wgrad_add_(..., sum_EOI)        the GEMM kernel: sum_EOI[e] += dW_e (fp32)
  fp8_grouped_wgrad / fp8_grouped_wgrad_add_         the GEMM kernel on such a GPU, the
                                                     emulation elsewhere

Both kernels find the experts' rows and tiles on the device (no host sync): each program loads
the E ends, takes the tiles of each expert, ceil(n_e / 128), and their running sum, the first
tile of each expert (kernels/fp8_grouped_gemm.py's `_expert_tiles`, which its experts
schedule uses too).

The quantizer: programs over (T tile slots, I blocks), T = ceil(N/128) + E. Slot t below the
experts' tile count is tile j = t - tile_start_e of the expert e whose tiles hold it: rows
s_e + 128 j .. min(s_e + 128 (j + 1), t_e). A program loads [those rows] x [BLOCK_I columns],
takes each column's amax, scale and reciprocal (kernels/fp8_quantize.py's `_amax_scale` and
`_to_fp8`: the convention, bit for bit), and stores the data transposed into the tile's own
128 columns, data [I, 128 T] (fp8/grouped_gemm.py: tile t at columns 128 t ..; the rows
past the expert's end load as 0 and store as 0), and the scales [I, T]. The slots after the
experts' tiles (the rows past the last end, and the slots no tile uses) store zeros and the
scale 2^-126 (an all-zero tile's). Every element of data and scales is written, 128 bytes
per row at a time.

The GEMM: one program per (O tile, I tile, expert), O fastest (the programs running together
share an expert's rows of x), looping over the expert's tiles j, each a whole 128-token block
on a 128-byte boundary (no mask along the tokens: a tile's columns past its expert's rows
hold zeros in both operands):
    acc += tl.dot(dy^T[o, tile j], x^T[i, tile j]^T)   (FP8 inputs, [BLOCK_O, 128] x
           * s_dy[o, tile][:, None] * s_x[i, tile][None, :]   [128, BLOCK_I], FP32 result)
So each tile's sum is promoted to FP32 and scaled there, as the emulation does; on Hopper the
tensor cores sum one tile's 128 products in their FP8 accumulator (about 14 bits,
tests/helpers/tolerance.py HOPPER_FP8_ACCUMULATION). The epilogue stores acc in the output's
dtype (an expert without rows: zeros) or adds it into an fp32 sum (an expert without rows
leaves its sum as it was), as kernels/grouped_wgrad.py does.

Why tiles on 128-byte boundaries: an expert's first row can be any row, and the compiler moves
16 bytes at a time (and pipelines the GEMM's loads through asynchronous copies) only where it
can see that the tokens it loads start at multiples of 16. The first version stored x^T by
row (an expert's tile starting anywhere) and loaded unaligned tiles through a window and a
second, 32-deep dot or byte by byte: 81-107 TFLOP/s on an H200, 0.16-0.19x bf16's grouped
GEMM (benchmarks/RESULTS.md 2026-12-03), three load paths in one kernel at 254 registers.
"""

from __future__ import annotations

import torch

from megatron_dsv3.fp8.grouped_gemm import (
    Fp8SegmentTiles,
    check_segments_input,
    check_wgrad_operands,
    fp8_grouped_wgrad_emulated,
    quantize_128x1_segments,
    segment_tile_count,
)
from megatron_dsv3.fp8.quantize import FP8_DTYPE, TILE
from megatron_dsv3.kernels.fp8_quantize import merged_launch_config, on_fp8_gpu, uses_kernel

try:
    import triton
    import triton.language as tl
except ImportError:  # the references (CPU machines without Triton)
    triton = None

# Launch parameters per kernel:
#   quantize  BLOCK_I columns of x per program (one segment tile of rows, a scale per column);
#   wgrad     BLOCK_O x BLOCK_I of dW per program (the tokens walked 128 at a time: the
#             promotion's tile), the experts before a program's counted BLOCK_E at a time;
#             num_warps / num_stages as Triton takes them. The wgrad default is the fastest of
#             bench_fp8_grouped.py --tune's sweep on an H200 for both expert shapes
#             (2026-12-03: 0.50 / 2.20 ms against 0.77 / 3.24 ms with 8 warps).
# A launch_* function takes `config` to override them (keys as here).
LAUNCH_CONFIG = {
    "quantize": {"BLOCK_I": 64, "num_warps": 4},
    "wgrad": {"BLOCK_O": 64, "BLOCK_I": 128, "BLOCK_E": 128, "num_warps": 4, "num_stages": 3},
}

OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def launch_config(kernel: str, config: dict | None) -> dict:
    """LAUNCH_CONFIG[kernel] updated with `config` (fp8_quantize.merged_launch_config)."""
    return merged_launch_config(LAUNCH_CONFIG[kernel], config,
                                f"the segment-aligned FP8 {kernel} kernel")


if triton is not None:
    from megatron_dsv3.kernels.fp8_grouped_gemm import _expert_tiles, _pick
    from megatron_dsv3.kernels.fp8_quantize import _amax_scale, _to_fp8

    @triton.jit
    def _quantize_128x1_segments_kernel(
            x_ptr, data_t_ptr, scales_ptr, ends_ptr,    # pointers
            I, E, T,                                    # sizes (data [I, 128 T], scales [I, T])
            stride_xn, stride_xi,                       # x's strides (outputs contiguous)
            POW2_SCALES: tl.constexpr, BLOCK_I: tl.constexpr, TILE: tl.constexpr,
            E_POW2: tl.constexpr):
        slot, block_i = tl.program_id(0), tl.program_id(1)
        experts, starts, ends, first_tiles, tile_ends = _expert_tiles(ends_ptr, E, E_POW2, TILE)
        used = tl.max(tile_ends)  # the experts' tiles
        if slot < used:  # tile j of expert e: its rows loaded
            e = tl.sum((tile_ends <= slot).to(tl.int32))
            first_row = (_pick(starts, experts, e)
                         + (slot - _pick(first_tiles, experts, e)) * TILE)
            load_end = tl.minimum(first_row + TILE, _pick(ends, experts, e))
        else:  # no expert's tile: zeros, nothing loaded
            first_row = 0
            load_end = 0
        rows = (first_row + tl.arange(0, TILE)).to(tl.int64)
        cols = (block_i * BLOCK_I + tl.arange(0, BLOCK_I)).to(tl.int64)
        in_i = cols < I
        x = tl.load(x_ptr + rows[:, None] * stride_xn + cols[None, :] * stride_xi,
                    mask=(rows < load_end)[:, None] & in_i[None, :],
                    other=0.0).to(tl.float32)                                # [TILE, BLOCK_I]
        scale = _amax_scale(x, 0, POW2_SCALES)                               # [BLOCK_I]
        data_t = tl.trans(_to_fp8(x, scale[None, :]))                        # [BLOCK_I, TILE]
        tokens = slot.to(tl.int64) * TILE + tl.arange(0, TILE)  # the tile's own 128 columns
        tl.store(data_t_ptr + cols[:, None] * (T * TILE) + tokens[None, :], data_t,
                 mask=in_i[:, None])
        tl.store(scales_ptr + cols * T + slot, scale, mask=in_i)

    @triton.jit
    def _tiles_product(dy_rows, x_rows, dy_scale_rows, x_scale_rows, in_o, in_i, first_tile,
                       tiles, stride_dyst, stride_xst, BLOCK_O: tl.constexpr,
                       BLOCK_I: tl.constexpr, TILE: tl.constexpr):
        """sum over the expert's `tiles` tiles from `first_tile` of the FP32 product of their
        FP8 blocks times the outer product of their scales (module docstring); dy_rows,
        x_rows: [BLOCK, 1] pointers to the rows of dy^T and x^T (tile t at column 128 t)."""
        acc = tl.zeros((BLOCK_O, BLOCK_I), tl.float32)
        for j in range(tiles):
            tokens = (first_tile + j).to(tl.int64) * TILE + tl.arange(0, TILE)
            dy = tl.load(dy_rows + tokens[None, :], mask=in_o[:, None], other=0.0)
            x = tl.load(x_rows + tokens[None, :], mask=in_i[:, None], other=0.0)
            partial = tl.dot(dy, tl.trans(x))                   # [BLOCK_O, BLOCK_I], FP32
            dy_scale = tl.load(dy_scale_rows + (first_tile + j) * stride_dyst, mask=in_o,
                               other=0.0)
            x_scale = tl.load(x_scale_rows + (first_tile + j) * stride_xst, mask=in_i,
                              other=0.0)
            # the promotion: this tile's FP32 sum, scaled in FP32
            acc += partial * dy_scale[:, None] * x_scale[None, :]
        return acc

    @triton.jit
    def _fp8_grouped_wgrad_kernel(
            dy_ptr, dy_scales_ptr, x_ptr, x_scales_ptr, ends_ptr, out_ptr,   # pointers
            O, I, E,                                                         # sizes
            stride_dyo, stride_dyso, stride_dyst,    # dy^T [O, 128 T] by tile, scales [O, T]
            stride_xi, stride_xsi, stride_xst,       # x^T [I, 128 T] by tile, scales [I, T]
            stride_oe, stride_oo, stride_oi,         # out [E, O, I]
            ACCUMULATE: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr,
            TILE: tl.constexpr, BLOCK_E: tl.constexpr):
        tile_o, tile_i, e = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        start = tl.load(ends_ptr + e - 1, mask=e > 0, other=0)
        end = tl.load(ends_ptr + e)
        # the expert's first tile: the tiles of the experts before it (their ends' differences
        # rounded up to whole tiles), summed, BLOCK_E experts at a time (the quantizer's
        # _expert_tiles vectors over all experts compiled to 188 registers here, against 168)
        before = tl.arange(0, BLOCK_E)
        first_tile = 0
        for block in range(0, e, BLOCK_E):
            prior = block + before
            prior_ends = tl.load(ends_ptr + prior, mask=prior < e, other=0)
            prior_starts = tl.load(ends_ptr + prior - 1, mask=(prior > 0) & (prior < e),
                                   other=0)
            first_tile += tl.sum(tl.cdiv(prior_ends - prior_starts, TILE))
        outs = (tile_o * BLOCK_O + tl.arange(0, BLOCK_O)).to(tl.int64)
        ins = (tile_i * BLOCK_I + tl.arange(0, BLOCK_I)).to(tl.int64)
        in_o, in_i = outs < O, ins < I
        acc = _tiles_product(dy_ptr + outs[:, None] * stride_dyo, x_ptr + ins[:, None] * stride_xi,
                             dy_scales_ptr + outs * stride_dyso, x_scales_ptr + ins * stride_xsi,
                             in_o, in_i, first_tile, tl.cdiv(end - start, TILE), stride_dyst,
                             stride_xst, BLOCK_O, BLOCK_I, TILE)

        out_tile = (out_ptr + tl.cast(e, tl.int64) * stride_oe + outs[:, None] * stride_oo
                    + ins[None, :] * stride_oi)
        in_out = in_o[:, None] & in_i[None, :]
        if ACCUMULATE:
            if end > start:  # an expert without rows adds nothing: its sum is left untouched
                tl.store(out_tile, tl.load(out_tile, mask=in_out) + acc, mask=in_out)
        else:
            tl.store(out_tile, acc.to(out_ptr.dtype.element_ty), mask=in_out)


def launch_quantize_128x1_segments(x_NI: torch.Tensor, group_ends: torch.Tensor, *,
                                   pow2_scales: bool = False, config: dict | None = None
                                   ) -> Fp8SegmentTiles:
    """The quantizer kernel itself (module docstring), on any device Triton runs on (its
    interpreter included); `config` overrides LAUNCH_CONFIG["quantize"]. group_ends is read
    on the device only: its values are not checked (quantize_128x1_segments checks them, with
    a host sync), and a tile holding inf or NaN gets a NaN scale instead of an error."""
    check_segments_input(x_NI, group_ends)
    rows, features = x_NI.shape
    experts = group_ends.numel()
    slots = segment_tile_count(rows, experts)
    data = torch.empty(features, slots * TILE, dtype=FP8_DTYPE, device=x_NI.device)
    scales = torch.empty(features, slots, dtype=torch.float32, device=x_NI.device)
    launch = launch_config("quantize", config)
    if features:
        grid = (slots, triton.cdiv(features, launch["BLOCK_I"]))
        _quantize_128x1_segments_kernel[grid](
            x_NI, data, scales, group_ends, features, experts, slots, *x_NI.stride(),
            POW2_SCALES=pow2_scales, TILE=TILE, E_POW2=triton.next_power_of_2(experts), **launch)
    return Fp8SegmentTiles(data, scales, rows)


def quantize_128x1_segments_fused(x_NI: torch.Tensor, group_ends: torch.Tensor, *,
                                  pow2_scales: bool = False) -> Fp8SegmentTiles:
    """x [N, I] in segment-aligned 128x1 tiles, stored transposed by tile: data [I, 128 T],
    scales [I, T], T = ceil(N/128) + E (fp8/grouped_gemm.py's quantize_128x1_segments). The kernel on a GPU
    (no host sync), the reference elsewhere."""
    if uses_kernel(x_NI) and isinstance(group_ends, torch.Tensor) \
            and group_ends.device == x_NI.device:
        return launch_quantize_128x1_segments(x_NI, group_ends, pow2_scales=pow2_scales)
    return quantize_128x1_segments(x_NI, group_ends, pow2_scales=pow2_scales)


def _launch_wgrad(dy_q: Fp8SegmentTiles, x_q: Fp8SegmentTiles, group_ends: torch.Tensor,
                  out_EOI: torch.Tensor, accumulate: bool, config: dict | None) -> None:
    experts, out_features, in_features = out_EOI.shape
    for name, data in (("dy_q", dy_q.data), ("x_q", x_q.data)):
        if data.stride(1) != 1 or data.stride(0) % 16:
            raise ValueError(f"fp8_grouped_wgrad: {name}.data has stride {data.stride()}; the "
                             f"kernel needs the tokens contiguous and rows of whole 16-byte "
                             f"units (as the quantizers store it): pass {name}.data.contiguous()")
    launch = launch_config("wgrad", config)
    block_o, block_i = launch.pop("BLOCK_O"), launch.pop("BLOCK_I")
    if not (out_features and in_features):
        return
    grid = (triton.cdiv(out_features, block_o), triton.cdiv(in_features, block_i), experts)
    _fp8_grouped_wgrad_kernel[grid](
        dy_q.data, dy_q.scales, x_q.data, x_q.scales, group_ends, out_EOI,
        out_features, in_features, experts,
        dy_q.data.stride(0), *dy_q.scales.stride(), x_q.data.stride(0), *x_q.scales.stride(),
        *out_EOI.stride(),
        ACCUMULATE=accumulate, BLOCK_O=block_o, BLOCK_I=block_i, TILE=TILE, **launch)


def launch_fp8_grouped_wgrad(dy_q: Fp8SegmentTiles, x_q: Fp8SegmentTiles,
                             group_ends: torch.Tensor, out_dtype: torch.dtype = torch.float32, *,
                             config: dict | None = None) -> torch.Tensor:
    """The GEMM kernel itself (module docstring): dW [E, O, I] in `out_dtype`, on any device
    Triton runs on (its interpreter included); `config` overrides LAUNCH_CONFIG["wgrad"].
    group_ends is read on the device only: its values are not checked."""
    check_wgrad_operands(dy_q, x_q, group_ends)
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"launch_fp8_grouped_wgrad: out_dtype={out_dtype}; use one of "
                         f"{', '.join(map(str, OUT_DTYPES))}")
    dW_EOI = torch.empty(group_ends.numel(), dy_q.data.shape[0], x_q.data.shape[0],
                         dtype=out_dtype, device=dy_q.data.device)
    _launch_wgrad(dy_q, x_q, group_ends, dW_EOI, False, config)
    return dW_EOI


def _check_sum(dy_q: Fp8SegmentTiles, x_q: Fp8SegmentTiles, group_ends: torch.Tensor,
               sum_EOI: torch.Tensor) -> None:
    expected = (group_ends.numel(), dy_q.data.shape[0], x_q.data.shape[0])
    if not isinstance(sum_EOI, torch.Tensor) or sum_EOI.dtype != torch.float32 \
            or tuple(sum_EOI.shape) != expected or sum_EOI.device != dy_q.data.device:
        what = (f"{sum_EOI.dtype} of shape {tuple(sum_EOI.shape)} on {sum_EOI.device}"
                if isinstance(sum_EOI, torch.Tensor) else type(sum_EOI).__name__)
        raise ValueError(f"fp8_grouped_wgrad_add_: sum_EOI must be an fp32 [E, O, I] = "
                         f"{list(expected)} tensor on {dy_q.data.device} (the weights' fp32 "
                         f"gradient sum), got {what}")


def launch_fp8_grouped_wgrad_add_(dy_q: Fp8SegmentTiles, x_q: Fp8SegmentTiles,
                                  group_ends: torch.Tensor, sum_EOI: torch.Tensor, *,
                                  config: dict | None = None) -> None:
    """The GEMM kernel itself adding into sum_EOI (fp32 [E, O, I], in place): sum_EOI[e] +=
    dy_e^T x_e; an expert without rows leaves its sum untouched."""
    check_wgrad_operands(dy_q, x_q, group_ends)
    _check_sum(dy_q, x_q, group_ends, sum_EOI)
    _launch_wgrad(dy_q, x_q, group_ends, sum_EOI, True, config)


def uses_wgrad_kernel(dy_q: Fp8SegmentTiles, x_q: Fp8SegmentTiles) -> bool:
    """Whether fp8_grouped_wgrad runs the kernel: Triton present, both operands on an NVIDIA
    GPU with FP8 tensor cores (compute capability 8.9 or newer)."""
    return on_fp8_gpu(dy_q.data) and x_q.data.device == dy_q.data.device


def fp8_grouped_wgrad(dy_q: Fp8SegmentTiles, x_q: Fp8SegmentTiles, group_ends: torch.Tensor,
                      out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """dW [E, O, I]: dW_e = dy_e^T x_e, FP32 promotion per 128-token tile of each expert
    (fp8/grouped_gemm.py). The kernel where it runs (`uses_wgrad_kernel`; no host sync), else
    the emulation (which reads group_ends on the host)."""
    check_wgrad_operands(dy_q, x_q, group_ends)
    if uses_wgrad_kernel(dy_q, x_q):
        return launch_fp8_grouped_wgrad(dy_q, x_q, group_ends, out_dtype)
    return fp8_grouped_wgrad_emulated(dy_q, x_q, group_ends, out_dtype)


def fp8_grouped_wgrad_add_(dy_q: Fp8SegmentTiles, x_q: Fp8SegmentTiles,
                           group_ends: torch.Tensor, sum_EOI: torch.Tensor) -> None:
    """sum_EOI[e] += dy_e^T x_e in fp32, in place (fp8_grouped_wgrad's product): the kernel
    adds in its epilogue where it runs, the emulation's result is added elsewhere."""
    check_wgrad_operands(dy_q, x_q, group_ends)
    _check_sum(dy_q, x_q, group_ends, sum_EOI)
    if uses_wgrad_kernel(dy_q, x_q):
        launch_fp8_grouped_wgrad_add_(dy_q, x_q, group_ends, sum_EOI)
    else:
        sum_EOI += fp8_grouped_wgrad_emulated(dy_q, x_q, group_ends)
