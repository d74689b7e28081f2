"""GEMMs of FP8 operands with per-tile scales and FP32 promotion at every 128-element K block.

  fp8_gemm(a, b, out_dtype)    A B^T for a = A [M, K] and b = B [N, K], both K-major Fp8Tensors
  transposed_blocks(w)         a 128x128-quantized W [N, K] as W^T [K, N] (the same blocks)

DeepSeek-V3 keeps the tensor cores' limited-precision accumulation short: the partial sum of
each 128-element block of the contraction dimension K is promoted to FP32, multiplied there by
the two operands' scales of that block, and added to an FP32 accumulator. The three GEMMs of a
linear y = x W^T all take this form with K-major operands:

  forward       y  [M, N] = x [M, K] . W [N, K]^T       a: x in 1x128 tiles, b: W in 128x128
  input grad    dx [M, K] = dy [M, N] . (W^T)[K, N]^T   a: dy in 1x128, b: transposed_blocks(W)
  weight grad   dW [N, K] = dy^T [N, M] . x^T [K, M]^T  a: dy in 128x1, b: x in 128x1 (both
                                                        stored transposed: quantize_128x1)

`a` is always tiled 1x128 along K (tilings "1x128", or "128x1" whose stored transpose is); `b`
is 1x128 along K too, or 128x128 (one scale per 128 rows of b and 128 of K).

`fp8_gemm_emulated` is what every machine can run: each operand's FP8 values are exact in
FP32, each block's products are summed in an FP32 matmul, scaled and accumulated in FP32 (what
the hardware computes, up to the order of the FP32 sums). On a Hopper GPU `fp8_gemm` runs
cuBLASLt's blockwise-scaled GEMM instead (`F.scaled_mm` with DeepSeek's 1x128 / 128x128
scaling, which promotes the same way) when the shapes allow it (`uses_scaled_mm`); the GPU
tests compare the two.
"""

from __future__ import annotations

import torch

from .quantize import DATA_TILE, TILE, Fp8Tensor

_K_MAJOR_A = ("1x128", "128x1")          # one scale per row and 128 of K
_K_MAJOR_B = ("1x128", "128x1", "128x128")


def transposed_blocks(w: Fp8Tensor) -> Fp8Tensor:
    """W [N, K] quantized in 128x128 blocks -> W^T [K, N] with the same blocks and scales
    (a 128x128 block of W is one of W^T): the input-gradient GEMM's `b`. Always copies
    (.t() of a one-row tensor would already be contiguous): fp8/ops.py's custom operator
    returns these, and an operator's outputs may not alias its inputs."""
    if w.tiling != "128x128":
        raise ValueError(f"transposed_blocks: w.tiling={w.tiling!r}; only 128x128 blocks stay "
                         "blocks when transposed (quantize the transpose for other tilings)")
    return Fp8Tensor(w.data.t().clone(memory_format=torch.contiguous_format),
                     w.scales.t().clone(memory_format=torch.contiguous_format), "128x128")


def _row_scales(t: Fp8Tensor) -> torch.Tensor:
    """The scale of each row of t.data and each 128-element block of K: [rows, K blocks]."""
    tile_rows, _ = DATA_TILE[t.tiling]
    return t.scales.repeat_interleave(tile_rows, dim=0)[: t.data.shape[0]]


def _k_blocks(data: torch.Tensor) -> torch.Tensor:
    """data [R, K] in fp32, zero-padded to whole 128-element K blocks: [R, K blocks, 128]."""
    rows, k = data.shape
    blocks = -(-k // TILE)
    padded = torch.zeros(rows, blocks * TILE, dtype=torch.float32, device=data.device)
    padded[:, :k] = data.float()
    return padded.view(rows, blocks, TILE)


def _check_operands(a: Fp8Tensor, b: Fp8Tensor) -> None:
    if a.tiling not in _K_MAJOR_A or b.tiling not in _K_MAJOR_B:
        raise ValueError(f"fp8_gemm: a.tiling={a.tiling!r} (use one of {_K_MAJOR_A}), "
                         f"b.tiling={b.tiling!r} (use one of {_K_MAJOR_B})")
    if a.data.shape[1] != b.data.shape[1]:
        raise ValueError(f"fp8_gemm: a is [M, K] = {list(a.data.shape)} and b is [N, K] = "
                         f"{list(b.data.shape)}; their K (the contracted dimension) differ")


def fp8_gemm_emulated(a: Fp8Tensor, b: Fp8Tensor, out_dtype: torch.dtype = torch.float32
                      ) -> torch.Tensor:
    """A B^T [M, N] in `out_dtype` from a = A [M, K] and b = B [N, K] (module docstring):
    sum over K blocks kb of (A[:, kb] B[:, kb]^T in FP32) * scale_a[:, kb] * scale_b[:, kb]."""
    _check_operands(a, b)
    partial = torch.einsum("mbt,nbt->bmn", _k_blocks(a.data), _k_blocks(b.data))
    scale = _row_scales(a).t()[:, :, None] * _row_scales(b).t()[:, None, :]  # [blocks, M, N]
    return (partial * scale).sum(dim=0).to(out_dtype)


def uses_scaled_mm(a: Fp8Tensor, b: Fp8Tensor) -> bool:
    """Whether cuBLASLt's blockwise GEMM runs: both on a Hopper GPU (compute capability 9.0,
    where cuBLASLt has DeepSeek's scaling), K a multiple of 128, M and N of 16."""
    scaled_mm = getattr(torch.nn.functional, "scaled_mm", None)
    return (scaled_mm is not None and a.data.is_cuda and b.data.device == a.data.device
            and torch.cuda.get_device_capability(a.data.device) == (9, 0)
            and a.data.shape[1] % TILE == 0 and a.data.shape[0] % 16 == 0
            and b.data.shape[0] % 16 == 0)


def _scaled_mm(a: Fp8Tensor, b: Fp8Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """cuBLASLt's layouts: B as a column-major [K, N]; the 1x128 scales outer-dimension-major
    ([rows, K/128] with the rows contiguous); the 128x128 scales K-block-major, their K-block
    count padded to a multiple of 4 ([L4, N/128])."""
    from torch.nn.functional import ScalingType, scaled_mm

    def one_by_128(t: Fp8Tensor) -> torch.Tensor:
        return t.scales.t().contiguous().t()

    if b.tiling == "128x128":
        blocks = b.scales.shape[1]
        padded = torch.zeros(b.scales.shape[0], -(-blocks // 4) * 4, dtype=torch.float32,
                             device=b.scales.device)
        padded[:, :blocks] = b.scales
        scale_b, recipe_b = padded.t(), ScalingType.BlockWise128x128
    else:
        scale_b, recipe_b = one_by_128(b), ScalingType.BlockWise1x128
    return scaled_mm(a.data, b.data.t(), one_by_128(a), ScalingType.BlockWise1x128, scale_b,
                     recipe_b, output_dtype=out_dtype)


def fp8_gemm(a: Fp8Tensor, b: Fp8Tensor, out_dtype: torch.dtype = torch.float32
             ) -> torch.Tensor:
    """A B^T [M, N] in `out_dtype` (module docstring): cuBLASLt's blockwise GEMM where it runs
    (`uses_scaled_mm`), else the emulation."""
    _check_operands(a, b)
    if uses_scaled_mm(a, b):
        return _scaled_mm(a, b, out_dtype)
    return fp8_gemm_emulated(a, b, out_dtype)
