"""DeepSeek-V3's FP8 quantization in plain PyTorch: E4M3 with scales from the live tensor, one
per tile (docs/precision-and-parallelism.md section 2). These are the references that the fused
kernels (kernels/fp8_quantize.py) match bit for bit, and the path on machines without them.

  quantize_1x128(x_MK)     activations and output gradients: one scale per row and 128
                           consecutive columns; data [M, K], scales [M, ceil(K/128)]
  quantize_128x1(x_MK)     the same activations for the weight gradient: one scale per 128 rows
                           of one column; data TRANSPOSED [K, M], scales [K, ceil(M/128)]
  quantize_128x128(w_NK)   weights: one scale per 128x128 block; scales [ceil(N/128), ceil(K/128)]

128x1 returns x^T because that is what the weight-gradient GEMM reads: dW = dY^T X contracts
over the tokens M, and a GEMM with fine-grained scales wants both operands K-major (here: with
M, the contracted dimension, contiguous), each scale covering 128 consecutive elements along
the contraction. A 128x1 tile of x is a 1x128 tile of x^T.

The convention, for every tiling:
  * x ~= data * scale, data in float8_e4m3fn (E4M3, largest finite value 448, no infinities);
  * scale = max(amax(tile) / 448, 2^-126), in fp32 (amax over the tile's real elements only,
    so a partial tile at the edge is scaled by what it holds). The floor, the smallest normal
    fp32, keeps the scale from being zero (an all-zero tile: 0/0 would give NaN) or subnormal
    (a tile with amax below ~5e-36: the scale would keep too few bits for x * (1 / scale) to stay
    within 448). An all-zero tile therefore has scale 2^-126 and data 0, and dequantizes
    exactly to 0;
  * with pow2_scales the scale is rounded up to a power of two, 2^ceil(log2(scale)), so that
    scaling and unscaling are exact; the data then use at most the range up to 448;
  * data = cast(clamp(x * (1 / scale), -448, 448)) with round-to-nearest-even: each element
    multiplied by the tile's reciprocal scale (1 / scale correctly rounded, once per tile), as
    DeepSeek's own casts and Transformer Engine's do, rather than divided by the scale. A
    correctly rounded division per element is some twenty instructions on a GPU, which made
    the kernels compute-bound; the multiplication adds one fp32 rounding, 2^-24 relative,
    far below E4M3's 2^-4. x * (1 / scale) reaches 448 (1 + 2^-22) at most (the roundings),
    which rounds to 448, so with the tile's own amax the clamp changes nothing; it makes the
    saturation explicit instead of leaving values above 448 to the cast (torch 2.14's
    saturates, inf included; older releases gave NaN from 480 up). With power-of-two scales
    the reciprocal and the product are exact.
Every step is an exactly rounded fp32 operation (abs and max are exact, division and
multiplication correctly rounded), which is what lets a kernel reproduce the data and scales
bit for bit.

Non-finite input (inf or NaN) has no meaningful scale: these references raise ValueError
naming the first non-finite element and its tile (one host sync). The fused kernels cannot
raise without a sync; they give that tile a NaN scale instead, so everything computed from it
is NaN and the training job's NaN checks stop the step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_E4M3_MAX = torch.finfo(FP8_DTYPE).max  # 448.0
TILE = 128  # the quantization tile's long side, fixed by the recipe
MIN_SCALE = torch.finfo(torch.float32).tiny  # 2^-126, the smallest normal fp32
INPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

# Each tiling's tile shape (rows, columns) over the tensor that is quantized, and over the
# stored `data`: a 128x1 tile of x is a 1x128 tile of the stored x^T.
INPUT_TILE = {"1x128": (1, TILE), "128x1": (TILE, 1), "128x128": (TILE, TILE)}
DATA_TILE = {"1x128": (1, TILE), "128x1": (1, TILE), "128x128": (TILE, TILE)}

_FP32_MANTISSA_MASK = (1 << 23) - 1


@dataclass(frozen=True)
class Fp8Tensor:
    """A tensor quantized to E4M3 with one fp32 scale per tile: x ~= data * scale.

    `tiling` names the tiles of the tensor that was quantized ("1x128", "128x1" or "128x128").
    For "128x1", `data` holds that tensor transposed ([K, M] for an [M, K] input) and
    `scales` is [K, ceil(M/128)]; for the others `data` has the input's shape. The quantizers
    store the scales of "1x128" and "128x1" outer-dimension-major (strides (1, rows): each
    128-wide block's scales contiguous over the rows), the layout cuBLASLt's blockwise GEMM
    reads, so that no GEMM relayouts them; any layout of the same values is valid here."""

    data: torch.Tensor    # float8_e4m3fn, 2-D
    scales: torch.Tensor  # float32, [ceil(rows / tile rows), ceil(cols / tile cols)] of data
    tiling: str

    def __post_init__(self):
        if self.tiling not in DATA_TILE:
            raise ValueError(f"tiling={self.tiling!r}: use one of {sorted(DATA_TILE)}")
        if self.data.dtype != FP8_DTYPE or self.data.dim() != 2:
            raise ValueError(f"data: a 2-D {FP8_DTYPE} tensor is needed, got "
                             f"{self.data.dtype} of shape {tuple(self.data.shape)}")
        expected = _scales_shape(self.data.shape, DATA_TILE[self.tiling])
        if self.scales.dtype != torch.float32 or tuple(self.scales.shape) != expected:
            raise ValueError(f"scales: fp32 of shape {expected} is needed for data of shape "
                             f"{tuple(self.data.shape)} in {self.tiling} tiles, got "
                             f"{self.scales.dtype} of shape {tuple(self.scales.shape)}")

    def dequantize(self) -> torch.Tensor:
        """data * scale in fp32, in the layout of the tensor that was quantized (for "128x1"
        the stored transpose is transposed back)."""
        tile_rows, tile_cols = DATA_TILE[self.tiling]
        rows, cols = self.data.shape
        scales = (self.scales.repeat_interleave(tile_rows, 0)[:rows]
                  .repeat_interleave(tile_cols, 1)[:, :cols])
        values = self.data.float() * scales
        return values.t() if self.tiling == "128x1" else values


def check_quantize_input(x: torch.Tensor, argument: str) -> None:
    """Raise ValueError unless `x` is a 2-D bf16, fp16 or fp32 tensor."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{argument}: a torch.Tensor is needed, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{argument}: a 2-D tensor is needed, got shape {tuple(x.shape)}; "
                         f"flatten the leading dimensions first ({argument}.flatten(0, -2))")
    if x.dtype not in INPUT_DTYPES:
        raise ValueError(f"{argument}: dtype {x.dtype} cannot be quantized; convert it to one "
                         f"of {', '.join(map(str, INPUT_DTYPES))}")


def round_scale_up_to_power_of_two(scale: torch.Tensor) -> torch.Tensor:
    """2^ceil(log2(scale)) for positive normal fp32 scales, exactly: adding the mantissa mask
    to the bits carries into the exponent unless the mantissa is already zero, and clearing
    the mantissa then leaves the power of two. (Rounding amax / 448 to fp32 first changes
    nothing: rounding is monotonic and keeps a quotient that is not a power of two off it.)"""
    bits = scale.view(torch.int32)
    return ((bits + _FP32_MANTISSA_MASK) & ~_FP32_MANTISSA_MASK).view(torch.float32)


def _scales_shape(shape, tile) -> tuple[int, int]:
    return (-(-shape[0] // tile[0]), -(-shape[1] // tile[1]))


def _raise_on_non_finite(x_MK: torch.Tensor, argument: str, tiling: str) -> None:
    """ValueError naming the first non-finite element of x (row-major order) and its tile."""
    bad = (~torch.isfinite(x_MK)).nonzero()
    if not bad.numel():
        return
    row, col = bad[0].tolist()
    tile_rows, tile_cols = INPUT_TILE[tiling]
    first_row, first_col = row // tile_rows * tile_rows, col // tile_cols * tile_cols
    raise ValueError(
        f"{argument}[{row}, {col}] = {x_MK[row, col].item()}: non-finite input has no FP8 "
        f"scale; it lies in the {tiling} tile of rows {first_row}:"
        f"{min(first_row + tile_rows, x_MK.shape[0])} and columns {first_col}:"
        f"{min(first_col + tile_cols, x_MK.shape[1])} ({len(bad)} non-finite elements in all); "
        f"find the operation that overflowed before quantizing")


def _quantize_tiles(x_RC: torch.Tensor, tiling: str, pow2_scales: bool) -> Fp8Tensor:
    """Quantize x_RC (the layout `data` will have) in DATA_TILE[tiling] tiles."""
    tile_rows, tile_cols = DATA_TILE[tiling]
    rows, cols = x_RC.shape
    row_tiles, col_tiles = _scales_shape(x_RC.shape, (tile_rows, tile_cols))
    # Zero padding to whole tiles leaves every amax as it is (|0| is never above it).
    padded = torch.zeros(row_tiles * tile_rows, col_tiles * tile_cols, dtype=torch.float32,
                         device=x_RC.device)
    padded[:rows, :cols] = x_RC
    tiles = padded.view(row_tiles, tile_rows, col_tiles, tile_cols)
    amax = tiles.abs().amax(dim=(1, 3))                                   # [row_tiles, col_tiles]
    # 448 as a tensor: CUDA divides by a Python number as a multiplication by its rounded
    # reciprocal, which is not amax / 448 correctly rounded (found against the kernels on GPU)
    scales = torch.clamp_min(amax / amax.new_full((), FP8_E4M3_MAX), MIN_SCALE)
    if pow2_scales:
        scales = round_scale_up_to_power_of_two(scales)
    inverse = torch.ones_like(scales) / scales  # a tensor division: correctly rounded
    scaled = (tiles * inverse[:, None, :, None]).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX)
    data = scaled.to(FP8_DTYPE).view(padded.shape)[:rows, :cols].contiguous()
    if tile_rows == 1:  # one scale per row and block: outer-dimension-major (Fp8Tensor)
        scales = scales.t().contiguous().t()
    return Fp8Tensor(data, scales, tiling)


def _quantize(x_MK: torch.Tensor, argument: str, tiling: str, pow2_scales: bool) -> Fp8Tensor:
    check_quantize_input(x_MK, argument)
    _raise_on_non_finite(x_MK, argument, tiling)
    return _quantize_tiles(x_MK.t() if tiling == "128x1" else x_MK, tiling, pow2_scales)


@torch.no_grad()
def quantize_1x128(x: torch.Tensor, *, pow2_scales: bool = False) -> Fp8Tensor:
    """x [M, K] in 1x128 tiles: data [M, K], scales [M, ceil(K/128)] (module docstring)."""
    return _quantize(x, "x", "1x128", pow2_scales)


@torch.no_grad()
def quantize_128x1(x: torch.Tensor, *, pow2_scales: bool = False) -> Fp8Tensor:
    """x [M, K] in 128x1 tiles, stored transposed: data [K, M] (x^T, contiguous), scales
    [K, ceil(M/128)] (module docstring)."""
    return _quantize(x, "x", "128x1", pow2_scales)


@torch.no_grad()
def quantize_128x128(w: torch.Tensor, *, pow2_scales: bool = False) -> Fp8Tensor:
    """w [N, K] in 128x128 blocks: data [N, K], scales [ceil(N/128), ceil(K/128)] (module
    docstring)."""
    return _quantize(w, "w", "128x128", pow2_scales)
