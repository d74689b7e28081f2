"""DeepSeek-V3's FP8 quantizers as fused Triton kernels: one pass per tensor that loads a tile,
takes its amax, computes the scale, divides, clamps, casts to E4M3 and stores data and scale
(and, for 128x1, stores the data transposed). The unfused PyTorch references
(fp8/quantize.py, which defines the convention) read the input three times and write fp32
temporaries; these kernels read it once and write one byte per element.

  quantize_1x128_fused(x_MK)     data [M, K], scales [M, ceil(K/128)]
  quantize_128x1_fused(x_MK)     data x^T [K, M], scales [K, ceil(M/128)]
  quantize_128x128_fused(w_NK)   data [N, K], scales [ceil(N/128), ceil(K/128)]

Each runs its kernel on an NVIDIA GPU with FP8 conversions (sm_89 and newer) and the
reference elsewhere. The kernels give bit-identical data and scales to the references: every
step is an exactly rounded fp32 operation (the two divisions per tile, amax / 448 and
1 / scale, through div_rn, since Triton's `/` is an approximate division on NVIDIA GPUs; each
element is then multiplied by the reciprocal, not divided, which keeps the kernels memory-bound;
the cast rounds to nearest even, as torch's does).
One difference by design: a tile holding inf or NaN gets a NaN scale (raising would need a
host sync), so everything computed from it is NaN; the references raise ValueError instead.
"""

from __future__ import annotations

import torch

from megatron_dsv3.fp8.quantize import (
    FP8_DTYPE,
    FP8_E4M3_MAX,
    INPUT_DTYPES,
    MIN_SCALE,
    TILE,
    Fp8Tensor,
    check_quantize_input,
    quantize_1x128,
    quantize_128x1,
    quantize_128x128,
)

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference path (CPU machines without Triton)
    triton = None

# Hopper and Ada convert to E4M3 in hardware; older GPUs have no float8e4nv in Triton.
MIN_CUDA_CAPABILITY = (8, 9)

# Launch parameters per kernel (benchmarks/bench_fp8.py --tune measures the candidates):
#   1x128    BLOCK_M rows of x per program (one tile column, a scale per row);
#   128x1    BLOCK_K columns of x per program (one 128-row band, a scale per column; each
#            column is stored as a 128-byte row of x^T);
#   128x128  one 128x128 block per program, read twice in CHUNK-row slices (the block's amax
#            over the slices, then each slice scaled and stored: the second read mostly from
#            L2): a slice's registers instead of the whole block's, so that more programs run
#            at once (the one-slice version held the block at 168 registers a thread and ran at
#            0.17-0.28 of the copy bandwidth on an H200, benchmarks/RESULTS.md 2026-12-03);
# A launch_* function takes `config` to override them (keys as here, num_warps included).
LAUNCH_CONFIG = {
    "1x128": {"BLOCK_M": 32, "num_warps": 4},
    "128x1": {"BLOCK_K": 64, "num_warps": 4},
    "128x128": {"CHUNK": 32, "num_warps": 4},
}


def merged_launch_config(defaults: dict, config: dict | None, kernel: str) -> dict:
    """A kernel's default launch parameters updated with `config` (the FP8 kernels' `config`
    argument); an unknown key is an error naming `kernel` and the known keys."""
    unknown = sorted(set(config or {}) - set(defaults))
    if unknown:
        raise ValueError(f"launch config of {kernel}: unknown keys {unknown}; it takes "
                         f"{sorted(defaults)}")
    return {**defaults, **(config or {})}


def launch_config(kernel: str, config: dict | None) -> dict:
    """LAUNCH_CONFIG[kernel] updated with `config` (merged_launch_config)."""
    return merged_launch_config(LAUNCH_CONFIG[kernel], config, f"the {kernel} FP8 quantizer")


if triton is not None:
    _FP8_MAX = tl.constexpr(FP8_E4M3_MAX)
    _MIN_SCALE = tl.constexpr(MIN_SCALE)
    _FP32_MANTISSA_MASK = tl.constexpr((1 << 23) - 1)

    @triton.jit
    def _tile_scale(amax, all_finite, POW2_SCALES: tl.constexpr):
        """max(amax / 448, 2^-126), rounded up to a power of two when asked; NaN where the
        tile was not all finite (set last: the power-of-two rounding would turn NaN's bits
        into 0)."""
        scale = tl.maximum(tl.math.div_rn(amax, _FP8_MAX), _MIN_SCALE)
        if POW2_SCALES:  # fp8/quantize.py's round_scale_up_to_power_of_two
            bits = scale.to(tl.int32, bitcast=True)
            bits = (bits + _FP32_MANTISSA_MASK) & ~_FP32_MANTISSA_MASK
            scale = bits.to(tl.float32, bitcast=True)
        return tl.where(all_finite, scale, float("nan"))

    @triton.jit
    def _amax_scale(x, axis, POW2_SCALES: tl.constexpr):
        """The scale of the tile(s) of x along `axis` (None: the whole block): _tile_scale of
        max |x|, NaN for a tile holding inf or NaN. Finiteness as a sum of x * 0, which is 0
        for finite x and NaN for inf or NaN (a fused multiply-add per element, where a
        comparison per element and a min over them took three instructions)."""
        amax = tl.max(tl.abs(x), axis)
        return _tile_scale(amax, tl.sum(x * 0.0, axis) == 0.0, POW2_SCALES)

    @triton.jit
    def _to_fp8(x, scale):
        """cast(x * (1 / scale)): one correctly rounded division per scale, then a
        multiplication per element (fp8/quantize.py's convention). The reference's clamp to
        +-448 is left to the cast, which saturates (cvt.rn.satfinite): the same bits, since
        x * (1 / scale) exceeds 448 by rounding only, and one instruction less per element."""
        scaled = x * tl.math.div_rn(1.0, scale)
        return scaled.to(tl.float8e4nv, fp_downcast_rounding="rtne")

    # The kernels take one tile-aligned block each and index in int64: a strided view's
    # offsets (row * stride) can pass 2^31 on large inputs.
    @triton.jit
    def _quantize_rows(x_ptr, data_ptr, scales_ptr, rows, cols, tile_k, M, K,
                       stride_xm, stride_xk, POW2_SCALES: tl.constexpr, TILE: tl.constexpr):
        """1x128: x's `rows` in the tile column `cols` (number tile_k), a scale per row; the
        data [M, K] and scales [M, ceil(K/128)] stored."""
        in_x = (rows[:, None] < M) & (cols[None, :] < K)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk, mask=in_x,
                    other=0.0).to(tl.float32)                                # [rows, TILE]
        scale = _amax_scale(x, 1, POW2_SCALES)                               # [rows]
        tl.store(data_ptr + rows[:, None] * K + cols[None, :], _to_fp8(x, scale[:, None]),
                 mask=in_x)
        tl.store(scales_ptr + tile_k * M + rows, scale, mask=rows < M)  # outer-dim-major

    @triton.jit
    def _quantize_columns(x_ptr, data_t_ptr, scales_ptr, rows, cols, tile_m, M, K,
                          stride_xm, stride_xk, POW2_SCALES: tl.constexpr, TILE: tl.constexpr):
        """128x1: x's `cols` in the 128-row band `rows` (number tile_m), a scale per column; the
        data stored transposed (x^T [K, M]: each column a 128-byte row) and the scales
        [K, ceil(M/128)]."""
        in_x = (rows[:, None] < M) & (cols[None, :] < K)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk, mask=in_x,
                    other=0.0).to(tl.float32)                                # [TILE, cols]
        scale = _amax_scale(x, 0, POW2_SCALES)                               # [cols]
        data_t = tl.trans(_to_fp8(x, scale[None, :]))                        # [cols, TILE]
        tl.store(data_t_ptr + cols[:, None] * M + rows[None, :], data_t, mask=tl.trans(in_x))
        tl.store(scales_ptr + tile_m * K + cols, scale, mask=cols < K)  # outer-dim-major

    @triton.jit
    def _quantize_1x128_kernel(x_ptr, data_ptr, scales_ptr,     # pointers
                               M, K,                            # sizes
                               stride_xm, stride_xk,            # x's strides (outputs contiguous)
                               POW2_SCALES: tl.constexpr, BLOCK_M: tl.constexpr,
                               TILE: tl.constexpr):
        block_m, tile_k = tl.program_id(0), tl.program_id(1)
        rows = (block_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        cols = (tile_k * TILE + tl.arange(0, TILE)).to(tl.int64)
        _quantize_rows(x_ptr, data_ptr, scales_ptr, rows, cols, tile_k, M, K, stride_xm,
                       stride_xk, POW2_SCALES, TILE)

    @triton.jit
    def _quantize_128x1_kernel(x_ptr, data_t_ptr, scales_ptr,   # pointers
                               M, K,                            # sizes
                               stride_xm, stride_xk,            # x's strides (outputs contiguous)
                               POW2_SCALES: tl.constexpr, BLOCK_K: tl.constexpr,
                               TILE: tl.constexpr):
        tile_m, block_k = tl.program_id(0), tl.program_id(1)
        rows = (tile_m * TILE + tl.arange(0, TILE)).to(tl.int64)
        cols = (block_k * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
        _quantize_columns(x_ptr, data_t_ptr, scales_ptr, rows, cols, tile_m, M, K, stride_xm,
                          stride_xk, POW2_SCALES, TILE)

    @triton.jit
    def _quantize_128x128_kernel(w_ptr, data_ptr, scales_ptr,   # pointers
                                 N, K,                          # sizes
                                 stride_wn, stride_wk,          # w's strides (outputs contiguous)
                                 POW2_SCALES: tl.constexpr, TILE: tl.constexpr,
                                 CHUNK: tl.constexpr):
        tile_n, tile_k = tl.program_id(0), tl.program_id(1)
        cols = (tile_k * TILE + tl.arange(0, TILE)).to(tl.int64)
        # pass 1: the block's amax and finiteness (max |w| and sum(w * 0), _amax_scale's
        # quantities) over CHUNK-row slices: the same values as over the whole block
        amax = tl.zeros((), tl.float32)
        zero_sum = tl.zeros((), tl.float32)
        for chunk in tl.static_range(0, TILE, CHUNK):
            rows = (tile_n * TILE + chunk + tl.arange(0, CHUNK)).to(tl.int64)
            in_w = (rows[:, None] < N) & (cols[None, :] < K)
            w = tl.load(w_ptr + rows[:, None] * stride_wn + cols[None, :] * stride_wk,
                        mask=in_w, other=0.0).to(tl.float32)                # [CHUNK, TILE]
            amax = tl.maximum(amax, tl.max(tl.abs(w)))
            zero_sum += tl.sum(w * 0.0)
        scale = _tile_scale(amax, zero_sum == 0.0, POW2_SCALES)            # scalar
        # pass 2: each slice again (from L2, mostly), scaled, cast and stored
        for chunk in tl.static_range(0, TILE, CHUNK):
            rows = (tile_n * TILE + chunk + tl.arange(0, CHUNK)).to(tl.int64)
            in_w = (rows[:, None] < N) & (cols[None, :] < K)
            w = tl.load(w_ptr + rows[:, None] * stride_wn + cols[None, :] * stride_wk,
                        mask=in_w, other=0.0).to(tl.float32)
            tl.store(data_ptr + rows[:, None] * K + cols[None, :], _to_fp8(w, scale),
                     mask=in_w)
        tl.store(scales_ptr + tile_n * tl.cdiv(K, TILE) + tile_k, scale)


def on_fp8_gpu(t: torch.Tensor) -> bool:
    """Whether Triton's FP8 kernels can run on t's device: Triton present, an NVIDIA GPU that
    converts to E4M3 (compute capability 8.9 or newer)."""
    return (triton is not None and t.is_cuda and torch.version.hip is None
            and torch.cuda.get_device_capability(t.device) >= MIN_CUDA_CAPABILITY)


def uses_kernel(x: torch.Tensor) -> bool:
    """Whether the fused kernels run for x: a 2-D bf16/fp16/fp32 tensor `on_fp8_gpu`."""
    return (isinstance(x, torch.Tensor) and x.dim() == 2 and x.dtype in INPUT_DTYPES
            and on_fp8_gpu(x))


def _empty_result(x: torch.Tensor, tiling: str) -> Fp8Tensor:
    """The uninitialised result of quantizing x [M, K] in `tiling`'s tiles (for "128x1" the
    data stored transposed, [K, M])."""
    rows, cols = x.shape[::-1] if tiling == "128x1" else x.shape
    data = torch.empty(rows, cols, dtype=FP8_DTYPE, device=x.device)
    if tiling == "128x128":
        return Fp8Tensor(data, torch.empty(triton.cdiv(rows, TILE), triton.cdiv(cols, TILE),
                                           dtype=torch.float32, device=x.device), tiling)
    # one scale per row and block, outer-dimension-major (fp8/quantize.py's Fp8Tensor)
    return Fp8Tensor(data, torch.empty(triton.cdiv(cols, TILE), rows, dtype=torch.float32,
                                       device=x.device).t(), tiling)


def launch_quantize_1x128(x: torch.Tensor, *, pow2_scales: bool = False,
                          config: dict | None = None) -> Fp8Tensor:
    """The 1x128 kernel itself, on any device Triton runs on (its interpreter included);
    `config` overrides LAUNCH_CONFIG["1x128"]."""
    check_quantize_input(x, "x")
    M, K = x.shape
    out = _empty_result(x, "1x128")
    launch = launch_config("1x128", config)
    if M and K:
        grid = (triton.cdiv(M, launch["BLOCK_M"]), triton.cdiv(K, TILE))
        _quantize_1x128_kernel[grid](x, out.data, out.scales, M, K, x.stride(0), x.stride(1),
                                     POW2_SCALES=pow2_scales, TILE=TILE, **launch)
    return out


def launch_quantize_128x1(x: torch.Tensor, *, pow2_scales: bool = False,
                          config: dict | None = None) -> Fp8Tensor:
    """The 128x1 kernel itself (transposed data), on any device Triton runs on; `config`
    overrides LAUNCH_CONFIG["128x1"]."""
    check_quantize_input(x, "x")
    M, K = x.shape
    out = _empty_result(x, "128x1")
    launch = launch_config("128x1", config)
    if M and K:
        grid = (triton.cdiv(M, TILE), triton.cdiv(K, launch["BLOCK_K"]))
        _quantize_128x1_kernel[grid](x, out.data, out.scales, M, K, x.stride(0), x.stride(1),
                                     POW2_SCALES=pow2_scales, TILE=TILE, **launch)
    return out


def launch_quantize_128x128(w: torch.Tensor, *, pow2_scales: bool = False,
                            config: dict | None = None) -> Fp8Tensor:
    """The 128x128 kernel itself, on any device Triton runs on; `config` overrides
    LAUNCH_CONFIG["128x128"]."""
    check_quantize_input(w, "w")
    N, K = w.shape
    out = _empty_result(w, "128x128")
    launch = launch_config("128x128", config)
    if N and K:
        grid = (triton.cdiv(N, TILE), triton.cdiv(K, TILE))
        _quantize_128x128_kernel[grid](w, out.data, out.scales, N, K, w.stride(0), w.stride(1),
                                       POW2_SCALES=pow2_scales, TILE=TILE, **launch)
    return out


def quantize_1x128_fused(x: torch.Tensor, *, pow2_scales: bool = False) -> Fp8Tensor:
    """x [M, K] in 1x128 tiles (fp8/quantize.py's quantize_1x128): the kernel on a GPU, the
    reference elsewhere."""
    if uses_kernel(x):
        return launch_quantize_1x128(x, pow2_scales=pow2_scales)
    return quantize_1x128(x, pow2_scales=pow2_scales)


def quantize_128x1_fused(x: torch.Tensor, *, pow2_scales: bool = False) -> Fp8Tensor:
    """x [M, K] in 128x1 tiles, data stored as x^T [K, M] (fp8/quantize.py's quantize_128x1):
    the kernel on a GPU, the reference elsewhere."""
    if uses_kernel(x):
        return launch_quantize_128x1(x, pow2_scales=pow2_scales)
    return quantize_128x1(x, pow2_scales=pow2_scales)


def quantize_128x128_fused(w: torch.Tensor, *, pow2_scales: bool = False) -> Fp8Tensor:
    """w [N, K] in 128x128 blocks (fp8/quantize.py's quantize_128x128): the kernel on a GPU,
    the reference elsewhere."""
    if uses_kernel(w):
        return launch_quantize_128x128(w, pow2_scales=pow2_scales)
    return quantize_128x128(w, pow2_scales=pow2_scales)
