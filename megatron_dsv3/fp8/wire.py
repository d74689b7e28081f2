"""FP8 rows on the wire: the dispatch all-to-all of DeepSeek-V3's recipe sends activations in
E4M3 with their 1x128 scales (about half the bytes of BF16), the combine all-to-all stays in
BF16.

  pack_rows(x_ND)                -> uint8 [N, D + 4 * ceil(D / 128)]: each row's D E4M3 bytes
                                    then its ceil(D / 128) fp32 scales' bytes, so that one
                                    all-to-all of whole rows carries both and a row never
                                    arrives without its scales
  unpack_rows(packed, D, dtype)  -> the dequantized rows [N, D] in `dtype`

The quantization is kernels/fp8_quantize.py's 1x128 (the fused kernel on a GPU, the reference
elsewhere), so a received row equals quantize_1x128(x).dequantize() of the sent one exactly.
"""

from __future__ import annotations

import torch

from ..kernels.fp8_quantize import quantize_1x128_fused
from .quantize import FP8_DTYPE, TILE, Fp8Tensor


def scale_bytes(width: int) -> int:
    """The bytes of a packed row's scales: one fp32 per 128 elements (a partial tile too)."""
    return 4 * -(-width // TILE)


def pack_rows(x_ND: torch.Tensor) -> torch.Tensor:
    """x_ND quantized in 1x128 tiles, each row's E4M3 data and fp32 scales in one uint8 row
    (module docstring)."""
    q = quantize_1x128_fused(x_ND)
    return torch.cat([q.data.view(torch.uint8), q.scales.contiguous().view(torch.uint8)],
                     dim=1)


def unpack_rows(packed: torch.Tensor, width: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows packed by pack_rows (of `width` elements each) dequantized to `dtype`."""
    if packed.dtype != torch.uint8 or packed.dim() != 2 or \
            packed.shape[1] != width + scale_bytes(width):
        raise ValueError(f"unpack_rows: packed rows of {width} elements are uint8 [N, "
                         f"{width + scale_bytes(width)}], got {packed.dtype} "
                         f"{list(packed.shape)}; pack them with pack_rows")
    data = packed[:, :width].contiguous().view(FP8_DTYPE)
    scales = packed[:, width:].contiguous().view(torch.float32)
    return Fp8Tensor(data, scales, "1x128").dequantize().to(dtype)
