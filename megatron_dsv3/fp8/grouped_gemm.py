"""The routed experts' GEMMs in FP8: one GEMM per expert over that expert's rows, with
DeepSeek-V3's FP32 promotion every 128 elements of K (fp8/gemm.py), all experts in one call.

  fp8_grouped_gemm_emulated(a, b, group_ends)   out [M, N]: rows of expert e times W_e^T
  quantize_128x128_grouped(w_ENK)               every expert's weight in 128x128 blocks
  transposed_blocks_grouped(b)                  every W_e^T [K, N] with the same blocks

Shapes: M tokens (rows sorted by expert, as moe/experts.py sorts them for torch._grouped_mm),
K the contracted dimension, N the output features, E the experts.

  forward     y  [M, N] = x [M, K] . W_e [N, K]^T        a: x in 1x128, b: the grouped W
  input grad  dx [M, K] = dy [M, N] . (W_e^T)[K, N]^T    a: dy in 1x128,
                                                         b: transposed_blocks_grouped(W)

`group_ends` is moe/experts.py's `offs` for torch._grouped_mm: int32 [E], the end row of each
expert (exclusive), non-decreasing; expert e owns rows [group_ends[e-1], group_ends[e]) (from 0
for e = 0). The last end may be below M: the rows past it belong to no expert and are zero in
the output (padding).

The grouped weight is an `Fp8GroupedTensor`, not an Fp8Tensor: Fp8Tensor (and so gemm.py's
helpers) holds 2-D data, and a [E * N, K] stack would put a 128x128 block across two experts
whenever N is not a multiple of 128. Fp8GroupedTensor.expert(e) is expert e's Fp8Tensor (a
view), which is how the emulation reuses fp8_gemm_emulated, one expert's rows at a time.

The emulation reads group_ends on the host (one sync) and checks it there; the Triton kernel
(kernels/fp8_grouped_gemm.py) keeps it on the device and checks only its dtype and shape.

Not here: the weight gradient dW_e [N, K] = dy_e^T x_e contracts over each expert's own rows,
so its 128-element K blocks are blocks of tokens inside one expert: it needs 128x1 operands
quantized per expert, i.e. expert row groups padded to multiples of 128 (DeepGEMM's
"contiguous" layout) or a quantizer that restarts its 128-row tiles at every group start.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .gemm import fp8_gemm_emulated
from .quantize import FP8_DTYPE, TILE, Fp8Tensor, quantize_128x128


@dataclass(frozen=True)
class Fp8GroupedTensor:
    """E weights [N, K], each quantized in its own 128x128 blocks: W_e ~= data[e] * scale.

    data [E, N, K] float8_e4m3fn; scales [E, ceil(N/128), ceil(K/128)] fp32. Expert e's
    blocks never reach into expert e+1's rows, whatever N is."""

    data: torch.Tensor    # float8_e4m3fn [E, N, K]
    scales: torch.Tensor  # float32 [E, ceil(N/128), ceil(K/128)]

    tiling = "128x128"

    def __post_init__(self):
        if self.data.dtype != FP8_DTYPE or self.data.dim() != 3:
            raise ValueError(f"data: a 3-D [E, N, K] {FP8_DTYPE} tensor is needed, got "
                             f"{self.data.dtype} of shape {tuple(self.data.shape)}")
        experts, n, k = self.data.shape
        expected = (experts, -(-n // TILE), -(-k // TILE))
        if self.scales.dtype != torch.float32 or tuple(self.scales.shape) != expected:
            raise ValueError(f"scales: fp32 of shape {expected} (one per expert and 128x128 "
                             f"block) is needed for data of shape {tuple(self.data.shape)}, got "
                             f"{self.scales.dtype} of shape {tuple(self.scales.shape)}")

    @property
    def num_experts(self) -> int:
        return self.data.shape[0]

    def expert(self, e: int) -> Fp8Tensor:
        """Expert e's weight [N, K] as a 128x128 Fp8Tensor (views of data and scales)."""
        return Fp8Tensor(self.data[e], self.scales[e], "128x128")

    def dequantize(self) -> torch.Tensor:
        """data * scale in fp32, [E, N, K]."""
        _, n, k = self.data.shape
        scales = (self.scales.repeat_interleave(TILE, 1)[:, :n]
                  .repeat_interleave(TILE, 2)[:, :, :k])
        return self.data.float() * scales


@torch.no_grad()
def quantize_128x128_grouped(w_ENK: torch.Tensor, *, pow2_scales: bool = False
                             ) -> Fp8GroupedTensor:
    """Each expert's weight w_ENK[e] [N, K] in its own 128x128 blocks: quantize.py's
    quantize_128x128 per expert (the reference; kernels/fp8_grouped_gemm.py has the fused
    path)."""
    if not isinstance(w_ENK, torch.Tensor) or w_ENK.dim() != 3:
        shape = tuple(w_ENK.shape) if isinstance(w_ENK, torch.Tensor) else type(w_ENK).__name__
        raise ValueError(f"w_ENK: a 3-D [experts, N, K] tensor is needed, got {shape}; for one "
                         f"expert's weight use quantize_128x128")
    experts = [quantize_128x128(w_NK, pow2_scales=pow2_scales) for w_NK in w_ENK.unbind(0)]
    if not experts:
        n, k = w_ENK.shape[1:]
        return Fp8GroupedTensor(
            torch.empty(0, n, k, dtype=FP8_DTYPE, device=w_ENK.device),
            torch.empty(0, -(-n // TILE), -(-k // TILE), device=w_ENK.device))
    return Fp8GroupedTensor(torch.stack([q.data for q in experts]),
                            torch.stack([q.scales for q in experts]))


def transposed_blocks_grouped(b: Fp8GroupedTensor) -> Fp8GroupedTensor:
    """Every expert's W_e [N, K] -> W_e^T [K, N], same blocks and scales (gemm.py's
    transposed_blocks per expert): the input-gradient GEMM's `b`, dx = dy W_e."""
    if not isinstance(b, Fp8GroupedTensor):
        raise ValueError(f"transposed_blocks_grouped: b must be an Fp8GroupedTensor "
                         f"(quantize_128x128_grouped), got {type(b).__name__}")
    return Fp8GroupedTensor(b.data.transpose(1, 2).contiguous(),
                            b.scales.transpose(1, 2).contiguous())


def check_grouped_operands(a: Fp8Tensor, b: Fp8GroupedTensor, group_ends: torch.Tensor
                           ) -> None:
    """What can be checked without reading group_ends' values (no host sync): the operands'
    types, tilings and K, and group_ends' dtype, shape and device."""
    if not isinstance(a, Fp8Tensor) or a.tiling != "1x128":
        what = a.tiling if isinstance(a, Fp8Tensor) else type(a).__name__
        raise ValueError(f"fp8_grouped_gemm: a must be an Fp8Tensor [M, K] in 1x128 tiles "
                         f"(quantize_1x128), got {what!r}")
    if not isinstance(b, Fp8GroupedTensor):
        raise ValueError(f"fp8_grouped_gemm: b must be an Fp8GroupedTensor [E, N, K] "
                         f"(quantize_128x128_grouped), got {type(b).__name__}")
    if a.data.shape[1] != b.data.shape[2]:
        raise ValueError(f"fp8_grouped_gemm: a is [M, K] = {list(a.data.shape)} and b is "
                         f"[E, N, K] = {list(b.data.shape)}; their K (the contracted "
                         f"dimension) differ")
    if not isinstance(group_ends, torch.Tensor) or group_ends.dtype != torch.int32 \
            or group_ends.dim() != 1:
        what = (f"{group_ends.dtype} of shape {tuple(group_ends.shape)}"
                if isinstance(group_ends, torch.Tensor) else type(group_ends).__name__)
        raise ValueError(f"fp8_grouped_gemm: group_ends must be a 1-D int32 tensor of end rows "
                         f"(tokens_per_expert.cumsum(0).to(torch.int32)), got {what}")
    if group_ends.numel() != b.num_experts or b.num_experts == 0:
        raise ValueError(f"fp8_grouped_gemm: group_ends has {group_ends.numel()} entries and b "
                         f"has {b.num_experts} experts; give one end row per expert (at least "
                         f"one expert)")
    if group_ends.device != a.data.device or b.data.device != a.data.device:
        raise ValueError(f"fp8_grouped_gemm: a ({a.data.device}), b ({b.data.device}) and "
                         f"group_ends ({group_ends.device}) must be on one device")


def _host_group_bounds(group_ends: torch.Tensor, rows: int) -> list[tuple[int, int]]:
    """[(first row, end row)] per expert from group_ends (one host sync), checked:
    non-negative, non-decreasing, the last at most `rows`."""
    ends = group_ends.tolist()
    starts = [0] + ends[:-1]
    if any(end < start for start, end in zip(starts, ends)) or ends[-1] > rows:
        raise ValueError(f"fp8_grouped_gemm: group_ends={ends} must be non-decreasing, from 0 "
                         f"up to at most M={rows} (a's rows); build it as "
                         f"tokens_per_expert.cumsum(0) of non-negative counts")
    return list(zip(starts, ends))


def fp8_grouped_gemm_emulated(a: Fp8Tensor, b: Fp8GroupedTensor, group_ends: torch.Tensor,
                              out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """out [M, N] in `out_dtype`: out[rows of e] = fp8_gemm_emulated(a[rows of e], W_e), each
    128-element K block's product promoted to FP32 and scaled there (module docstring); rows
    past the last end are zero. Reads group_ends on the host (one sync)."""
    check_grouped_operands(a, b, group_ends)
    rows = a.data.shape[0]
    out_MN = torch.zeros(rows, b.data.shape[1], dtype=out_dtype, device=a.data.device)
    for e, (start, end) in enumerate(_host_group_bounds(group_ends, rows)):
        if end > start:
            a_e = Fp8Tensor(a.data[start:end], a.scales[start:end], "1x128")
            out_MN[start:end] = fp8_gemm_emulated(a_e, b.expert(e), out_dtype)
    return out_MN
