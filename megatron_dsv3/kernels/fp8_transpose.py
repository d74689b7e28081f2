"""FP8 weight blocks transposed on the GPU, for the input-gradient GEMMs: a weight W [N, K]
quantized in 128x128 blocks is W^T [K, N] in the same blocks with the same scales (a 128x128
block of W is one of W^T), so dx = dy W takes W's FP8 bytes transposed and its scales
transposed; nothing is quantized again.

  transposed_blocks_fused(w)           fp8/gemm.py's transposed_blocks: W [N, K] -> W^T [K, N]
  transposed_blocks_grouped_fused(b)   fp8/grouped_gemm.py's transposed_blocks_grouped: every
                                       expert's W_e [N, K] -> W_e^T [K, N]
  launch_transpose_bytes(src)          the kernel itself, [B, R, C] one-byte -> [B, C, R],
                                       wherever Triton runs (its interpreter too)

Why a kernel: torch's copy of a transposed one-byte tensor (`data.transpose(1, 2).contiguous()`)
ran at about 0.16 TB/s on an H200 (benchmarks/RESULTS.md 2026-12-03, sixth lease: 1.17 ms for
the 64 experts of 1408 x 2048 bytes, four times the FP8 GEMM it feeds). The kernel moves one
BLOCK x BLOCK tile per program: loaded along its rows (C contiguous), transposed in registers
and shared memory (tl.trans), stored along the destination's rows (R contiguous), so both the
reads and the writes are whole 128-byte lines. The bytes are copied as they are (uint8 views of
the FP8 data): bit-exact by construction.
"""

from __future__ import annotations

import torch

from megatron_dsv3.fp8.gemm import transposed_blocks
from megatron_dsv3.fp8.grouped_gemm import Fp8GroupedTensor, transposed_blocks_grouped
from megatron_dsv3.fp8.quantize import Fp8Tensor
from megatron_dsv3.kernels.fp8_quantize import merged_launch_config, on_fp8_gpu

try:
    import triton
    import triton.language as tl
except ImportError:  # the references (CPU machines without Triton)
    triton = None

# BLOCK x BLOCK bytes per program (128: one FP8 block, whole 128-byte lines both ways);
# `config` of launch_transpose_bytes overrides them (keys as here)
LAUNCH_CONFIG = {"BLOCK": 128, "num_warps": 4}


if triton is not None:

    @triton.jit
    def _transpose_bytes_kernel(src_ptr, dst_ptr, R, C, BLOCK: tl.constexpr):
        """src [B, R, C] -> dst [B, C, R], both contiguous; program (r tile, c tile, b)."""
        rows = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
        cols = (tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
        base = tl.program_id(2).to(tl.int64) * R * C
        inside = (rows[:, None] < R) & (cols[None, :] < C)
        tile = tl.load(src_ptr + base + rows[:, None] * C + cols[None, :], mask=inside)
        tl.store(dst_ptr + base + cols[:, None] * R + rows[None, :], tl.trans(tile),
                 mask=tl.trans(inside))


def launch_transpose_bytes(src: torch.Tensor, *, config: dict | None = None) -> torch.Tensor:
    """src [R, C] or [B, R, C] of a one-byte dtype (FP8 data, uint8) -> its last two dimensions
    swapped, contiguous, same dtype: the kernel itself, on any device Triton runs on; `config`
    overrides LAUNCH_CONFIG."""
    if not isinstance(src, torch.Tensor) or src.dim() not in (2, 3) or src.element_size() != 1:
        what = (f"{src.dtype} of shape {tuple(src.shape)}" if isinstance(src, torch.Tensor)
                else type(src).__name__)
        raise ValueError(f"launch_transpose_bytes: src must be a 2-D or 3-D tensor of a "
                         f"one-byte dtype (FP8 data), got {what}")
    stacked = src.unsqueeze(0) if src.dim() == 2 else src
    stacked = stacked.contiguous()
    B, R, C = stacked.shape
    dst = torch.empty(B, C, R, dtype=src.dtype, device=src.device)
    launch = merged_launch_config(LAUNCH_CONFIG, config, "the FP8 transposition")
    if B and R and C:
        block = launch.pop("BLOCK")
        grid = (triton.cdiv(R, block), triton.cdiv(C, block), B)
        _transpose_bytes_kernel[grid](stacked.view(torch.uint8), dst.view(torch.uint8), R, C,
                                      BLOCK=block, **launch)
    return dst[0] if src.dim() == 2 else dst


def transposed_blocks_fused(w: Fp8Tensor) -> Fp8Tensor:
    """W [N, K] in 128x128 blocks -> W^T [K, N] (fp8/gemm.py's transposed_blocks, whose checks
    and result it shares): the kernel on a GPU with FP8, the reference elsewhere."""
    if not (isinstance(w, Fp8Tensor) and w.tiling == "128x128" and on_fp8_gpu(w.data)):
        return transposed_blocks(w)
    return Fp8Tensor(launch_transpose_bytes(w.data),
                     w.scales.t().clone(memory_format=torch.contiguous_format), "128x128")


def transposed_blocks_grouped_fused(b: Fp8GroupedTensor) -> Fp8GroupedTensor:
    """Every expert's W_e [N, K] -> W_e^T [K, N] (fp8/grouped_gemm.py's
    transposed_blocks_grouped): the kernel on a GPU with FP8, the reference elsewhere."""
    if not (isinstance(b, Fp8GroupedTensor) and on_fp8_gpu(b.data)):
        return transposed_blocks_grouped(b)
    return Fp8GroupedTensor(launch_transpose_bytes(b.data),
                            b.scales.transpose(1, 2).contiguous())
