"""The routed experts' grouped FP8 GEMM as a Triton kernel: out [M, N] = rows of expert e of
a [M, K] (1x128) times W_e^T (W [E, N, K] in 128x128 blocks per expert), with DeepSeek-V3's
FP32 promotion every 128 elements of K. The reference, and the definition, is
fp8/grouped_gemm.py's fp8_grouped_gemm_emulated.

  launch_fp8_grouped_gemm(a, b, group_ends)   the kernel, wherever Triton runs (interpreter too)
  fp8_grouped_gemm(a, b, group_ends)          the kernel on an NVIDIA GPU with FP8 tensor cores
                                              (sm_89 and newer), the emulation elsewhere
  quantize_128x128_grouped_fused(w_ENK)       every expert's weight in 128x128 blocks: the
                                              fused 128x128 quantizer over the [E * N, K]
                                              stack when N is a multiple of 128

The schedule, without a host sync (group_ends stays on the device): programs over (M tiles,
N tiles), N fastest, so that the programs running together share one M tile, i.e. one expert,
and its weight stays in L2 for that expert's next M tiles. A program finds the experts whose
rows its M tile covers by counting the ends at or before its first and last row (group_ends is
non-decreasing), then loops over them: for each, the tile's rows of that expert (a row mask),
the K loop, and a masked store of those rows. A tile inside one expert runs the loop once; a
tile across a boundary runs it once per expert it touches (its other rows masked: wasted tensor
core work, at most one extra tile per boundary). Empty experts are skipped. Rows past the
last end are stored as zeros.

SCHEDULE="experts" (a launch option) tiles each expert's rows on their own instead: program
slot t is tile j of the expert whose tiles hold it (each expert ceil(n_e / BLOCK_M) tiles from
its first row, found on the device from the ends' running tile counts), so no tile spans two
experts and none runs the K loop twice; the slots after the experts' tiles store the zero rows
past the last end. Rows start where an expert starts, which keeps the loads aligned: a row of
a is K bytes, K a multiple of 128.

The K loop is the promotion: for each 128-wide K block kb
    acc += tl.dot(a[rows, kb], b_e[cols, kb]^T)  (FP8 inputs, FP32 result)
           * a_scale[rows, kb][:, None] * b_scale[e, cols // 128, kb][None, :]
so each block's sum is scaled in FP32 and added to an FP32 accumulator, as the emulation does.
On Hopper the tensor cores sum the 128 products of a block in their FP8 accumulator (about 14
bits, tests/helpers/tolerance.py HOPPER_FP8_ACCUMULATION); the interpreter sums them exactly.

K must be a multiple of 128 (the loads are unmasked along K: whole blocks); the model's K
(7168, 2048, 1408 = 11 * 128) all are. fp8_grouped_gemm runs the emulation for other K.
"""

from __future__ import annotations

import torch

from megatron_dsv3.fp8.grouped_gemm import (
    Fp8GroupedTensor,
    check_grouped_operands,
    fp8_grouped_gemm_emulated,
    quantize_128x128_grouped,
)
from megatron_dsv3.fp8.quantize import TILE, Fp8Tensor
from megatron_dsv3.kernels.fp8_quantize import (
    merged_launch_config,
    on_fp8_gpu,
    quantize_128x128_fused,
    uses_kernel,
)

try:
    import triton
    import triton.language as tl
except ImportError:  # the emulation (CPU machines without Triton)
    triton = None

# Launch parameters: BLOCK_M rows x BLOCK_N output columns per program (K is walked 128 at a
# time: the promotion's block); num_warps / num_stages as Triton takes them; SCHEDULE how M
# tiles are laid (module docstring). The fastest of bench_fp8_grouped.py's sweep on an H200 on
# both problems (64 x 384, 2048 -> 1408: 0.236 ms against 0.283 for 128 x 128, 8 warps, rows;
# 32 x 1024, 7168 -> 2048: 1.207 against 1.272; benchmarks/RESULTS.md 2026-12-03, sixth
# lease). `config` of launch_fp8_grouped_gemm overrides them (keys as here).
LAUNCH_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 4, "num_stages": 3,
                 "SCHEDULE": "experts"}
SCHEDULES = ("rows", "experts")  # M tiles over all rows / over each expert's rows

OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def launch_config(config: dict | None) -> dict:
    """LAUNCH_CONFIG updated with `config` (fp8_quantize.merged_launch_config)."""
    return merged_launch_config(LAUNCH_CONFIG, config, "the grouped FP8 GEMM")


if triton is not None:

    @triton.jit
    def _expert_tiles(ends_ptr, E, E_POW2: tl.constexpr, TILE: tl.constexpr):
        """Per expert (vectors over E_POW2, zero past E), with each expert's rows cut into
        tiles of TILE rows from its first row: first row, end row, first tile, and the tiles'
        running sum (each expert's end tile)."""
        experts = tl.arange(0, E_POW2)
        valid = experts < E
        ends = tl.load(ends_ptr + experts, mask=valid, other=0)
        starts = tl.load(ends_ptr + experts - 1, mask=valid & (experts > 0), other=0)
        tiles = tl.cdiv(ends - starts, TILE)
        tile_ends = tl.cumsum(tiles, 0)
        return experts, starts, ends, tile_ends - tiles, tile_ends

    @triton.jit
    def _pick(values, experts, e):
        """values[e] of a vector over the experts."""
        return tl.sum(tl.where(experts == e, values, 0))

    @triton.jit
    def _expert_rows_times_weight(
            a_ptr, a_scales_ptr, b_ptr, b_scales_ptr, out_tile, e, in_e, rows, cols, in_n, K,
            stride_am, stride_ak, stride_asm, stride_ask, stride_be, stride_bn, stride_bk,
            stride_bse, stride_bsn, stride_bsk,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TILE: tl.constexpr):
        """The rows `in_e` of this tile (expert e's) times W_e^T, the K loop promoting each
        128-wide block, stored into out_tile. Where BLOCK_N divides 128 the tile's columns lie
        in one 128-row block of W_e, whose scale is one number per K block: the promotion is
        then one fused multiply-add per element (acc += partial * (a_scale * b_scale)), which
        matters because it waits for each block's tensor-core result."""
        ks = tl.arange(0, TILE)
        a_rows = a_ptr + rows[:, None] * stride_am + ks[None, :] * stride_ak
        b_cols = (b_ptr + tl.cast(e, tl.int64) * stride_be + cols[:, None] * stride_bn
                  + ks[None, :] * stride_bk)
        a_scale_rows = a_scales_ptr + rows * stride_asm
        b_scale_cols = (b_scales_ptr + tl.cast(e, tl.int64) * stride_bse
                        + (cols // TILE) * stride_bsn)
        b_scale_block = (b_scales_ptr + tl.cast(e, tl.int64) * stride_bse
                         + (tl.min(cols, 0) // TILE) * stride_bsn)  # the tile's first column's
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for kb in range(tl.cdiv(K, TILE)):
            a = tl.load(a_rows + kb * TILE * stride_ak, mask=in_e[:, None], other=0.0)
            b = tl.load(b_cols + kb * TILE * stride_bk, mask=in_n[:, None], other=0.0)
            a_scale = tl.load(a_scale_rows + kb * stride_ask, mask=in_e, other=0.0)
            # the promotion: this block's FP32 sum, scaled in FP32 (the emulation's order:
            # the two scales' product first)
            if TILE % BLOCK_N == 0:  # one block of W across the tile: one scale
                b_scale = tl.load(b_scale_block + kb * stride_bsk)
                acc += tl.dot(a, tl.trans(b)) * (a_scale * b_scale)[:, None]
            else:
                b_scale = tl.load(b_scale_cols + kb * stride_bsk, mask=in_n, other=0.0)
                acc += tl.dot(a, tl.trans(b)) * (a_scale[:, None] * b_scale[None, :])
        tl.store(out_tile, acc.to(out_tile.dtype.element_ty),
                 mask=in_e[:, None] & in_n[None, :])

    @triton.jit
    def _fp8_grouped_gemm_kernel(
            a_ptr, a_scales_ptr, b_ptr, b_scales_ptr, ends_ptr, out_ptr,   # pointers
            M, N, K, E,                                                    # sizes
            stride_am, stride_ak, stride_asm, stride_ask,                  # a [M, K], [M, K/128]
            stride_be, stride_bn, stride_bk,                               # b [E, N, K]
            stride_bse, stride_bsn, stride_bsk,                            # [E, N/128, K/128]
            stride_om, stride_on,                                          # out [M, N]
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TILE: tl.constexpr,
            E_POW2: tl.constexpr, PER_EXPERT: tl.constexpr):
        pid = tl.program_id(0)
        n_tiles = tl.cdiv(N, BLOCK_N)
        slot, tile_n = pid // n_tiles, pid % n_tiles  # N fastest: one expert's tiles together
        cols = (tile_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        in_n = cols < N
        experts = tl.arange(0, E_POW2)
        counted = experts < E
        ends = tl.load(ends_ptr + experts, mask=counted, other=0)
        total = tl.load(ends_ptr + E - 1)
        if PER_EXPERT:
            # expert e's tiles: ceil(n_e / BLOCK_M) from its first row; slot t is tile
            # t - first_tile[e] of the expert whose tiles hold it
            _, starts, _, first_tiles, tile_ends = _expert_tiles(ends_ptr, E, E_POW2, BLOCK_M)
            e = tl.sum(((tile_ends <= slot) & counted).to(tl.int32))
            if e < E:
                end = _pick(ends, experts, e)
                rows = (_pick(starts, experts, e) + (slot - _pick(first_tiles, experts, e))
                        * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
                _expert_rows_times_weight(
                    a_ptr, a_scales_ptr, b_ptr, b_scales_ptr,
                    out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on, e,
                    rows < end, rows, cols, in_n, K, stride_am, stride_ak, stride_asm,
                    stride_ask, stride_be, stride_bn, stride_bk, stride_bse, stride_bsn,
                    stride_bsk, BLOCK_M, BLOCK_N, TILE)
            else:  # the slots after the experts' tiles: the rows past the last end, zeros
                rows = (total + (slot - tl.max(tile_ends)) * BLOCK_M
                        + tl.arange(0, BLOCK_M)).to(tl.int64)
                tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on,
                         tl.zeros((BLOCK_M, BLOCK_N), tl.float32).to(
                             out_ptr.dtype.element_ty),
                         mask=(rows < M)[:, None] & in_n[None, :])
        else:
            first_row = slot * BLOCK_M
            last_row = tl.minimum(first_row + BLOCK_M, M) - 1
            rows = (first_row + tl.arange(0, BLOCK_M)).to(tl.int64)
            # The experts of this tile: expert e owns the rows r with ends[e-1] <= r < ends[e],
            # so the expert of row r is the number of ends at or before r (E: past the last).
            first_expert = tl.sum(((ends <= first_row) & counted).to(tl.int32))
            last_expert = tl.minimum(tl.sum(((ends <= last_row) & counted).to(tl.int32)),
                                     E - 1)
            out_tile = out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on
            unowned = (rows >= total) & (rows < M)  # padding rows past the last end: zeros
            tl.store(out_tile, tl.zeros((BLOCK_M, BLOCK_N), tl.float32).to(
                out_ptr.dtype.element_ty), mask=unowned[:, None] & in_n[None, :])
            for e in range(first_expert, last_expert + 1):
                start = tl.load(ends_ptr + tl.maximum(e - 1, 0))
                start = tl.where(e > 0, start, 0)
                end = tl.load(ends_ptr + e)
                if end > start:  # an empty expert owns no row
                    _expert_rows_times_weight(
                        a_ptr, a_scales_ptr, b_ptr, b_scales_ptr, out_tile, e,
                        (rows >= start) & (rows < end) & (rows < M), rows, cols, in_n, K,
                        stride_am, stride_ak, stride_asm, stride_ask, stride_be, stride_bn,
                        stride_bk, stride_bse, stride_bsn, stride_bsk, BLOCK_M, BLOCK_N, TILE)


def launch_fp8_grouped_gemm(a: Fp8Tensor, b: Fp8GroupedTensor, group_ends: torch.Tensor,
                            out_dtype: torch.dtype = torch.float32, *,
                            config: dict | None = None) -> torch.Tensor:
    """The kernel itself (module docstring), on any device Triton runs on (its interpreter
    included); `config` overrides LAUNCH_CONFIG. group_ends is read on the device only: its
    values are not checked (fp8_grouped_gemm_emulated checks them, with a host sync)."""
    check_grouped_operands(a, b, group_ends)
    M, K = a.data.shape
    E, N, _ = b.data.shape
    if K % TILE:
        raise ValueError(f"launch_fp8_grouped_gemm: K={K} is not a multiple of {TILE} (the "
                         f"kernel loads whole 128-wide K blocks); pad K or use "
                         f"fp8_grouped_gemm_emulated")
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"launch_fp8_grouped_gemm: out_dtype={out_dtype}; use one of "
                         f"{', '.join(map(str, OUT_DTYPES))}")
    launch = launch_config(config)
    out_MN = torch.empty(M, N, dtype=out_dtype, device=a.data.device)
    schedule = launch.pop("SCHEDULE")
    if schedule not in SCHEDULES:
        raise ValueError(f"launch config of the grouped FP8 GEMM: SCHEDULE={schedule!r}; use "
                         f"one of {SCHEDULES}")
    if M and N:
        block_m, block_n = launch.pop("BLOCK_M"), launch.pop("BLOCK_N")
        # "experts": at most ceil(M / BLOCK_M) + E tiles of the experts' rows and of the rows
        # past the last end together (each expert's last tile may be partial)
        m_slots = triton.cdiv(M, block_m) + (E if schedule == "experts" else 0)
        grid = (m_slots * triton.cdiv(N, block_n),)
        _fp8_grouped_gemm_kernel[grid](
            a.data, a.scales, b.data, b.scales, group_ends, out_MN,
            M, N, K, E,
            *a.data.stride(), *a.scales.stride(), *b.data.stride(), *b.scales.stride(),
            *out_MN.stride(),
            BLOCK_M=block_m, BLOCK_N=block_n, TILE=TILE, E_POW2=triton.next_power_of_2(E),
            PER_EXPERT=schedule == "experts", **launch)
    return out_MN


def uses_grouped_gemm_kernel(a: Fp8Tensor, b: Fp8GroupedTensor) -> bool:
    """Whether fp8_grouped_gemm runs the kernel: Triton present, both operands on an NVIDIA GPU
    with FP8 tensor cores (compute capability 8.9 or newer), K a multiple of 128."""
    return (on_fp8_gpu(a.data) and b.data.device == a.data.device
            and a.data.shape[1] % TILE == 0)


def fp8_grouped_gemm(a: Fp8Tensor, b: Fp8GroupedTensor, group_ends: torch.Tensor,
                     out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """out [M, N]: expert e's rows of a times W_e^T, FP32 promotion per 128-element K block
    (fp8/grouped_gemm.py). The kernel where it runs (`uses_grouped_gemm_kernel`; no host
    sync), else the emulation (which reads group_ends on the host)."""
    check_grouped_operands(a, b, group_ends)
    if uses_grouped_gemm_kernel(a, b):
        return launch_fp8_grouped_gemm(a, b, group_ends, out_dtype)
    return fp8_grouped_gemm_emulated(a, b, group_ends, out_dtype)


def quantize_128x128_grouped_fused(w_ENK: torch.Tensor, *, pow2_scales: bool = False
                                   ) -> Fp8GroupedTensor:
    """Every expert's weight w_ENK[e] [N, K] in its own 128x128 blocks (fp8/grouped_gemm.py's
    quantize_128x128_grouped). When N is a multiple of 128 no block of the [E * N, K] stack
    spans two experts, so one launch of the fused 128x128 quantizer over the stack gives the
    same data and scales; elsewhere the per-expert reference."""
    if (isinstance(w_ENK, torch.Tensor) and w_ENK.dim() == 3 and w_ENK.shape[1] % TILE == 0
            and w_ENK.shape[0] and uses_kernel(w_ENK[0])):
        E, N, K = w_ENK.shape
        stacked = quantize_128x128_fused(w_ENK.reshape(E * N, K), pow2_scales=pow2_scales)
        return Fp8GroupedTensor(stacked.data.view(E, N, K),
                                stacked.scales.view(E, N // TILE, -(-K // TILE)))
    return quantize_128x128_grouped(w_ENK, pow2_scales=pow2_scales)
