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

The weight gradient dW_e [O, I] = dy_e^T x_e contracts over each expert's own rows, so its
128-element blocks of the contraction are blocks of tokens inside one expert, and the 128x1
tiles of dy [N, O] and x [N, I] must restart at every expert's first row ("segment-aligned"
tiles; expert row counts are not multiples of 128):

  quantize_128x1_segments(x_NI, group_ends)            data [I, 128 T], scales [I, T]
  fp8_grouped_wgrad_emulated(dy_q, x_q, group_ends)    dW [E, O, I]

Expert e's rows [s_e, t_e) make the tiles s_e + 128 j .. min(s_e + 128 (j + 1), t_e), numbered
from tile_start_e = sum over e' < e of ceil(n_e' / 128): tile tile_start_e + j, its scale in
column tile_start_e + j of `scales`. T = ceil(N / 128) + E bounds the number of tiles without
reading group_ends on the host: the E experts and the rows past the last end, E + 1 segments
of N rows in all, make at most ceil(N / 128) + E tiles. The rows past the last end belong to no
expert: they are quantized as zeros (data 0), in tiles of their own after the experts' ones,
and every scale column that no expert's tile uses holds 2^-126, an all-zero tile's scale. When
every n_e is a multiple of 128 (and the last end is N) the tiles are quantize_128x1's: the same
data, and its scales in the first ceil(N / 128) columns.

The data are stored by tile, transposed: tile t's 128 tokens are columns 128 t .. 128 t + 127
of data [I, 128 T] (x^T, the tokens contiguous), a tile's columns past its expert's last row
zeros. So every tile starts on a 128-byte boundary whatever the experts' row counts, and the
weight-gradient kernel loads whole aligned tiles, no masks, no partial loads
(kernels/fp8_grouped_wgrad.py); the price is up to 127 zero columns per expert (at DeepSeek-V3's
~400 rows per expert and micro-batch, ~15% more bytes and tensor-core work in the wgrad GEMM).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .gemm import fp8_gemm_emulated
from .quantize import (
    FP8_DTYPE,
    MIN_SCALE,
    TILE,
    Fp8Tensor,
    _quantize_tiles,
    check_quantize_input,
    quantize_128x128,
)


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


def check_group_ends_tensor(group_ends: torch.Tensor, caller: str) -> None:
    """Raise ValueError unless group_ends is a 1-D int32 tensor (its values are not read)."""
    if not isinstance(group_ends, torch.Tensor) or group_ends.dtype != torch.int32 \
            or group_ends.dim() != 1:
        what = (f"{group_ends.dtype} of shape {tuple(group_ends.shape)}"
                if isinstance(group_ends, torch.Tensor) else type(group_ends).__name__)
        raise ValueError(f"{caller}: group_ends must be a 1-D int32 tensor of end rows "
                         f"(tokens_per_expert.cumsum(0).to(torch.int32)), got {what}")


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
    check_group_ends_tensor(group_ends, "fp8_grouped_gemm")
    if group_ends.numel() != b.num_experts or b.num_experts == 0:
        raise ValueError(f"fp8_grouped_gemm: group_ends has {group_ends.numel()} entries and b "
                         f"has {b.num_experts} experts; give one end row per expert (at least "
                         f"one expert)")
    if group_ends.device != a.data.device or b.data.device != a.data.device:
        raise ValueError(f"fp8_grouped_gemm: a ({a.data.device}), b ({b.data.device}) and "
                         f"group_ends ({group_ends.device}) must be on one device")


def _host_group_bounds(group_ends: torch.Tensor, rows: int, caller: str = "fp8_grouped_gemm",
                       rows_name: str = "M", operand: str = "a") -> list[tuple[int, int]]:
    """[(first row, end row)] per expert from group_ends (one host sync), checked:
    non-negative, non-decreasing, the last at most `rows` (`rows_name`, `operand`'s rows)."""
    ends = group_ends.tolist()
    starts = [0] + ends[:-1]
    if any(end < start for start, end in zip(starts, ends)) or ends[-1] > rows:
        raise ValueError(f"{caller}: group_ends={ends} must be non-decreasing, from 0 up to at "
                         f"most {rows_name}={rows} ({operand}'s rows); build it as "
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


# ----------------------------------------------------------------------------------------------
# The weight gradient: segment-aligned 128x1 tiles (module docstring)
# ----------------------------------------------------------------------------------------------
def segment_tile_count(rows: int, experts: int) -> int:
    """T = ceil(rows / 128) + experts: the scale columns of `rows` rows in segment-aligned
    tiles, known without reading group_ends (module docstring)."""
    return -(-rows // TILE) + experts


@dataclass(frozen=True)
class Fp8SegmentTiles:
    """x [N, I] in E4M3 with one fp32 scale per segment-aligned 128x1 tile (module docstring),
    stored transposed by tile: x[r, i] ~= data[i, 128 tile(r) + offset(r)] * scales[i, tile(r)],
    offset(r) the row's place in its tile.

    data [I, 128 T] float8_e4m3fn (x^T by tile: tile t's tokens, the weight gradient's
    contraction, contiguous in columns 128 t ..; zeros past a tile's last row); scales [I, T]
    fp32, T = ceil(N/128) + E; rows N, the rows of x. Which tile a row is in depends on
    group_ends, which is not held here: dequantize takes it."""

    data: torch.Tensor    # float8_e4m3fn [I, 128 T]
    scales: torch.Tensor  # float32 [I, T], T = ceil(N/128) + E
    rows: int             # N

    def __post_init__(self):
        if self.data.dtype != FP8_DTYPE or self.data.dim() != 2:
            raise ValueError(f"data: a 2-D [I, 128 T] {FP8_DTYPE} tensor is needed, got "
                             f"{self.data.dtype} of shape {tuple(self.data.shape)}")
        if not isinstance(self.rows, int) or self.rows < 0:
            raise ValueError(f"rows={self.rows!r}: the number of rows N of the quantized x "
                             f"[N, I], a non-negative int, is needed")
        features, columns = self.data.shape
        least = segment_tile_count(self.rows, 1)
        if (self.scales.dtype != torch.float32 or self.scales.dim() != 2
                or self.scales.shape[0] != features or self.scales.shape[1] < least
                or columns != TILE * self.scales.shape[1]):
            raise ValueError(f"scales: fp32 of shape (I, T) = ({features}, ceil(N/128) + E) = "
                             f"({features}, {least - 1} + E), E >= 1 the experts, with data "
                             f"[I, 128 T], is needed for N = {self.rows} rows; got data "
                             f"{list(self.data.shape)} and scales {self.scales.dtype} of shape "
                             f"{tuple(self.scales.shape)}")

    @property
    def num_experts(self) -> int:
        return self.scales.shape[1] - segment_tile_count(self.rows, 0)

    def _tiles_and_columns(self, group_ends: torch.Tensor, caller: str):
        """Each row's tile and its column in data (tile * 128 + its place in the tile), after
        checking group_ends on the host (one sync)."""
        check_group_ends_tensor(group_ends, caller)
        if group_ends.numel() != self.num_experts:
            raise ValueError(f"{caller}: group_ends has {group_ends.numel()} entries for tiles "
                             f"of {self.num_experts} experts; pass the group_ends these tiles "
                             f"were quantized with")
        _host_group_bounds(group_ends, self.rows, caller, "N", "x")
        tiles_N, offsets_N = segment_tile_of_rows(group_ends.to(self.data.device), self.rows,
                                                  with_offsets=True)
        return tiles_N, tiles_N * TILE + offsets_N

    def data_by_row(self, group_ends: torch.Tensor) -> torch.Tensor:
        """The FP8 data in row order, x^T's layout [I, N] (as quantize_128x1 stores it)."""
        _, columns_N = self._tiles_and_columns(group_ends, "Fp8SegmentTiles.data_by_row")
        return self.data[:, columns_N]

    def dequantize(self, group_ends: torch.Tensor) -> torch.Tensor:
        """data * scale in fp32, in the layout of the tensor that was quantized: [N, I]; rows
        past the last end are 0. group_ends is checked on the host (one sync)."""
        tiles_N, columns_N = self._tiles_and_columns(group_ends, "Fp8SegmentTiles.dequantize")
        return (self.data[:, columns_N].float() * self.scales[:, tiles_N]).t()


def segment_tile_of_rows(group_ends: torch.Tensor, rows: int, with_offsets: bool = False):
    """The tile of each of `rows` rows in segment-aligned tiles (module docstring): int64 [rows]
    on group_ends' device, computed there (no host sync). Rows past the last end count in
    tiles of their own after the experts' ones. `with_offsets`: also each row's place in its
    tile (0..127), as a second int64 [rows]."""
    ends_E = group_ends.long()
    starts_E = torch.cat([ends_E.new_zeros(1), ends_E[:-1]])
    tiles_E = torch.div(ends_E - starts_E + TILE - 1, TILE, rounding_mode="floor")
    first_tile_E = tiles_E.cumsum(0) - tiles_E
    rows_N = torch.arange(rows, device=group_ends.device)
    expert_N = torch.searchsorted(ends_E, rows_N, right=True)  # E past the last end
    owner_N = expert_N.clamp(max=len(ends_E) - 1)
    in_expert = first_tile_E[owner_N] + torch.div(rows_N - starts_E[owner_N], TILE,
                                                  rounding_mode="floor")
    past_the_end = tiles_E.sum() + torch.div(rows_N - ends_E[-1], TILE, rounding_mode="floor")
    mine = expert_N < len(ends_E)
    tiles = torch.where(mine, in_expert, past_the_end)
    if not with_offsets:
        return tiles
    offsets = torch.where(mine, rows_N - starts_E[owner_N], rows_N - ends_E[-1]) % TILE
    return tiles, offsets


def _raise_on_non_finite_rows(x_NI: torch.Tensor, bounds: list[tuple[int, int]]) -> None:
    """ValueError naming the first non-finite element of the experts' rows of x (row-major
    order), its expert and its segment-aligned tile (rows past the last end are not read)."""
    bad = (~torch.isfinite(x_NI[:bounds[-1][1]])).nonzero()
    if not bad.numel():
        return
    row, col = bad[0].tolist()
    expert = next(e for e, (start, end) in enumerate(bounds) if start <= row < end)
    start, end = bounds[expert]
    first = start + (row - start) // TILE * TILE
    raise ValueError(
        f"x_NI[{row}, {col}] = {x_NI[row, col].item()}: non-finite input has no FP8 scale; it "
        f"lies in expert {expert}'s 128x1 tile of rows {first}:{min(first + TILE, end)}, "
        f"column {col} ({len(bad)} non-finite elements in all); find the operation that "
        f"overflowed before quantizing")


def check_segments_input(x_NI: torch.Tensor, group_ends: torch.Tensor) -> None:
    """The segment-aligned quantizer's inputs, without reading group_ends' values: x_NI a 2-D
    bf16/fp16/fp32 tensor, group_ends 1-D int32 with at least one entry, on x_NI's device."""
    check_quantize_input(x_NI, "x_NI")
    check_group_ends_tensor(group_ends, "quantize_128x1_segments")
    if group_ends.numel() == 0 or group_ends.device != x_NI.device:
        raise ValueError(f"quantize_128x1_segments: group_ends ({group_ends.numel()} entries, "
                         f"{group_ends.device}) needs one end row per expert, at least one, "
                         f"on x_NI's device ({x_NI.device})")


@torch.no_grad()
def quantize_128x1_segments(x_NI: torch.Tensor, group_ends: torch.Tensor, *,
                            pow2_scales: bool = False) -> Fp8SegmentTiles:
    """x [N, I] (rows sorted by expert, expert e's rows ending at group_ends[e]) in 128x1
    tiles that restart at every expert's first row, stored transposed: data [I, N], scales
    [I, ceil(N/128) + E] (module docstring). Each expert's rows are quantized as
    quantize_128x1 quantizes a tensor (the same code: fp8/quantize.py's convention); reads
    group_ends on the host (one sync) and raises on non-finite rows of an expert. The kernel
    is kernels/fp8_grouped_wgrad.py's."""
    check_segments_input(x_NI, group_ends)
    rows, features = x_NI.shape
    bounds = _host_group_bounds(group_ends, rows, "quantize_128x1_segments", "N", "x_NI")
    _raise_on_non_finite_rows(x_NI, bounds)
    slots = segment_tile_count(rows, len(bounds))
    data = torch.zeros(features, slots * TILE, dtype=FP8_DTYPE, device=x_NI.device)
    scales = torch.full((features, slots), MIN_SCALE, device=x_NI.device)
    tile = 0
    for start, end in bounds:
        if end > start:
            expert = _quantize_tiles(x_NI[start:end].t(), "128x1", pow2_scales)
            tiles = expert.scales.shape[1]
            data[:, tile * TILE:tile * TILE + end - start] = expert.data  # its tiles' columns
            scales[:, tile:tile + tiles] = expert.scales
            tile += tiles
    return Fp8SegmentTiles(data, scales, rows)


def check_wgrad_operands(dy_q: Fp8SegmentTiles, x_q: Fp8SegmentTiles,
                         group_ends: torch.Tensor) -> None:
    """What can be checked without reading group_ends' values (no host sync): the operands'
    types, rows and tiles, and group_ends' dtype, shape and device."""
    for name, operand, rows in (("dy_q", dy_q, "dy [N, O]"), ("x_q", x_q, "x [N, I]")):
        if not isinstance(operand, Fp8SegmentTiles):
            raise ValueError(f"fp8_grouped_wgrad: {name} must be an Fp8SegmentTiles "
                             f"(quantize_128x1_segments of {rows}), got "
                             f"{type(operand).__name__}")
    if dy_q.rows != x_q.rows or dy_q.scales.shape[1] != x_q.scales.shape[1]:
        raise ValueError(f"fp8_grouped_wgrad: dy_q holds {dy_q.rows} rows in "
                         f"{dy_q.scales.shape[1]} tile columns and x_q {x_q.rows} in "
                         f"{x_q.scales.shape[1]}; quantize dy and x of the same rows with the "
                         f"same group_ends")
    check_group_ends_tensor(group_ends, "fp8_grouped_wgrad")
    if group_ends.numel() != dy_q.num_experts:
        raise ValueError(f"fp8_grouped_wgrad: group_ends has {group_ends.numel()} entries and "
                         f"the operands' tiles are those of {dy_q.num_experts} experts; pass "
                         f"the group_ends they were quantized with")
    if group_ends.device != dy_q.data.device or x_q.data.device != dy_q.data.device:
        raise ValueError(f"fp8_grouped_wgrad: dy_q ({dy_q.data.device}), x_q "
                         f"({x_q.data.device}) and group_ends ({group_ends.device}) must be on "
                         f"one device")


def fp8_grouped_wgrad_emulated(dy_q: Fp8SegmentTiles, x_q: Fp8SegmentTiles,
                               group_ends: torch.Tensor, out_dtype: torch.dtype = torch.float32
                               ) -> torch.Tensor:
    """dW [E, O, I] in `out_dtype`: dW_e = dy_e^T x_e over expert e's rows, each of its
    128-token tiles' product summed in FP32, scaled there by the two operands' scales of that
    tile and accumulated in FP32 (fp8_gemm_emulated on expert e's columns of dy^T and x^T);
    an expert without rows gets zeros. Reads group_ends on the host (one sync)."""
    check_wgrad_operands(dy_q, x_q, group_ends)
    out_features, in_features = dy_q.data.shape[0], x_q.data.shape[0]
    dW_EOI = torch.zeros(group_ends.numel(), out_features, in_features, dtype=out_dtype,
                         device=dy_q.data.device)
    bounds = _host_group_bounds(group_ends, dy_q.rows, "fp8_grouped_wgrad", "N",
                                "dy_q and x_q")
    tile = 0
    for e, (start, end) in enumerate(bounds):
        tiles = -(-(end - start) // TILE)
        if tiles:  # its tiles' columns: its rows, then zeros to the last tile's end
            own, columns = slice(tile, tile + tiles), slice(tile * TILE, (tile + tiles) * TILE)
            dy_e = Fp8Tensor(dy_q.data[:, columns], dy_q.scales[:, own], "128x1")
            x_e = Fp8Tensor(x_q.data[:, columns], x_q.scales[:, own], "128x1")
            dW_EOI[e] = fp8_gemm_emulated(dy_e, x_e, out_dtype)  # dy_e^T x_e
        tile += tiles
    return dW_EOI
