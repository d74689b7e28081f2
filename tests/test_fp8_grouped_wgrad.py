"""The routed experts' FP8 weight gradient on the CPU: segment-aligned 128x1 tiles and the
grouped wgrad GEMM, the references (fp8/grouped_gemm.py) and the Triton kernels
(kernels/fp8_grouped_wgrad.py) in Triton's interpreter.

  * the reference quantizer's scales against an fp64 computation of the definition, tile by
    tile of each expert's own 128-row tiles, and its data against cast(clamp(x * (1 / scale)))
    from them: bit-equal, on groups of 0, 1, 127, 128, 129 and 300 rows and rows past the last
    end (quantized as zeros; the unused scale columns 2^-126);
  * the tiles are quantize_128x1's when every group is a multiple of 128; an outlier changes
    its own segment tile only; dequantize stays within E4M3's rounding bound;
  * the emulated weight gradient: expert e's dW bit for bit fp8_gemm_emulated of its rows
    alone quantized with quantize_128x1 (gemm.py's promotion); within FP32_REORDER of float64
    products of the dequantized operands; within E4M3's rounding of the exact product of the
    unquantized dy and x (an element-wise bound, below); empty experts zero;
  * the kernels in Triton's interpreter (a fresh process): the quantizer bit for bit the
    reference (fp32 and fp16: the interpreter has no bf16; strided input; NaN in the rows past
    the last end; a non-finite tile's NaN scale); the GEMM within FP32_REORDER of the
    emulation (stored in fp32 / fp16, added into an fp32 sum; empty experts; partial tiles; O
    and I not multiples of the block);
  * the CPU dispatch is the reference / emulation; bad inputs raise naming the argument.
Fresh random inputs each run; the seed is in every failure message.
"""

from __future__ import annotations

import math
import textwrap

import pytest
import torch
from helpers.fp8_cases import E4M3_CAST_LIKE_THE_GPU, fresh_seed, group_ends
from helpers.tolerance import FP32_REORDER, assert_close
from helpers.triton_interpreter import assert_ok_in_triton_interpreter

from megatron_dsv3.fp8.gemm import fp8_gemm_emulated
from megatron_dsv3.fp8.grouped_gemm import (
    Fp8SegmentTiles,
    fp8_grouped_wgrad_emulated,
    quantize_128x1_segments,
    segment_tile_of_rows,
)
from megatron_dsv3.fp8.quantize import FP8_E4M3_MAX, MIN_SCALE, quantize_128x1
from megatron_dsv3.kernels.fp8_grouped_wgrad import (
    fp8_grouped_wgrad,
    fp8_grouped_wgrad_add_,
    launch_config,
    launch_fp8_grouped_wgrad,
    launch_fp8_grouped_wgrad_add_,
    quantize_128x1_segments_fused,
)

# rows per expert: empty experts first, inside and last; one row; 127, 128, 129 rows (a tile
# one short, exact, one over); 300 rows (two whole tiles and a partial one); 7 rows past the
# last end, which belong to no expert
COUNTS = [0, 1, 127, 128, 129, 300, 0]
PADDING = 7
N = sum(COUNTS) + PADDING
O, I = 72, 136  # dy [N, O], x [N, I]: I over one 128-wide block


def _bounds(counts):
    ends = torch.tensor(counts).cumsum(0).tolist()
    return list(zip([0] + ends[:-1], ends))


def _spread(rows: int, cols: int) -> torch.Tensor:
    """Gaussian values whose scale changes by up to 2^±12 between rows and columns, so that
    tiles differ in amax and many values fall far below their tile's amax (E4M3 subnormals)."""
    return (torch.randn(rows, cols) * 2.0 ** torch.randint(-12, 13, (rows, 1)).float()
            * 2.0 ** torch.randint(-12, 1, (1, cols)).float())


def _fp64_segment_scales(x: torch.Tensor, counts, pow2: bool):
    """The definition in fp64, tile by tile of each expert's own 128-row tiles: the scales as
    stored, [I, ceil(N/128) + E] with 2^-126 in the columns no tile uses, and each element's
    scale [N, I] (2^-126 past the last end), as fp32 values held in fp64. max(amax / 448,
    2^-126) in fp64 rounded once to fp32 is the correctly rounded fp32 quotient (fp64 keeps
    more than 2 * 24 + 2 bits)."""
    rows, cols = x.shape
    x64 = x.double()
    grid = torch.full((cols, math.ceil(rows / 128) + len(counts)), MIN_SCALE,
                      dtype=torch.float64)
    per_element = torch.full((rows, cols), MIN_SCALE, dtype=torch.float64)
    tile = 0
    for start, end in _bounds(counts):
        for first in range(start, end, 128):
            block = slice(first, min(first + 128, end))
            scale = torch.clamp_min(x64[block].abs().amax(0) / FP8_E4M3_MAX, MIN_SCALE)
            if pow2:
                mantissa, exponent = torch.frexp(scale)  # scale = mantissa * 2^exponent
                scale = torch.ldexp(torch.ones_like(scale), exponent - (mantissa == 0.5).long())
            scale = scale.float().double()
            grid[:, tile] = scale
            per_element[block] = scale
            tile += 1
    return grid, per_element


@pytest.mark.parametrize("pow2", [False, True], ids=["exact", "pow2"])
def test_reference_tiles_equal_an_fp64_computation_per_expert_segment(pow2):
    """Scales bit-equal to the fp64 definition; data bit-equal to cast(clamp(x * (1/scale)))
    with 1 / scale and the product each rounded once to fp32 (computed in fp64 from the fp64
    scales), and 0 for the rows past the last end."""
    seed = fresh_seed()
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        x = _spread(N, I).clamp(-6e4, 6e4).to(dtype)
        got = quantize_128x1_segments(x, group_ends(COUNTS), pow2_scales=pow2)
        grid, scale = _fp64_segment_scales(x, COUNTS, pow2)
        assert torch.equal(got.scales, grid.float()), (seed, dtype)
        inverse = (1.0 / scale).float().double()
        expected = (x.double() * inverse).float().clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX)
        expected[sum(COUNTS):] = 0
        assert torch.equal(got.data_by_row(group_ends(COUNTS)).view(torch.uint8),
                           expected.t().to(torch.float8_e4m3fn).view(torch.uint8)), (seed, dtype)
        tiles = sum(math.ceil(c / 128) for c in COUNTS)
        assert (got.scales[:, tiles:] == MIN_SCALE).all(), (seed, "unused columns: 2^-126")


@pytest.mark.parametrize("pow2", [False, True], ids=["exact", "pow2"])
def test_groups_of_whole_tiles_give_quantize_128x1s_data_and_scales(pow2):
    seed = fresh_seed()
    counts = [128, 0, 256, 384, 0]
    x = _spread(sum(counts), I).to(torch.bfloat16)
    got = quantize_128x1_segments(x, group_ends(counts), pow2_scales=pow2)
    want = quantize_128x1(x, pow2_scales=pow2)
    # whole tiles from column 0: quantize_128x1's data, then the five experts' unused tiles
    assert torch.equal(got.data[:, :768].view(torch.uint8), want.data.view(torch.uint8)), seed
    assert (got.data[:, 768:].float() == 0).all() and got.data.shape == (I, 128 * 11), seed
    assert torch.equal(got.scales[:, :6], want.scales), seed
    assert (got.scales[:, 6:] == MIN_SCALE).all() and got.scales.shape == (I, 6 + 5), seed


def test_an_outlier_changes_its_own_segment_tile_only():
    """Expert 5 owns rows 385..684, its tiles 385..512, 513..640 (tile 6 of all), 641..684:
    row 600 is in tile 6, whose rows no quantize_128x1 tile (512..639, 640..767) matches."""
    seed = fresh_seed()
    x = torch.randn(N, I, dtype=torch.bfloat16)
    ends = group_ends(COUNTS)
    before = quantize_128x1_segments(x, ends)
    col = int(torch.randint(0, I, ()))
    x[600, col] = 1e4
    after = quantize_128x1_segments(x, ends)
    assert (before.scales != after.scales).nonzero().tolist() == [[col, 6]], (seed, col)
    assert after.scales[col, 6].item() == pytest.approx(1e4 / FP8_E4M3_MAX, rel=2**-8)
    changed = (before.data.view(torch.uint8) != after.data.view(torch.uint8)).nonzero()
    assert changed[:, 0].eq(col).all(), (seed, "the outlier's column only")
    assert changed[:, 1].min() >= 6 * 128 and changed[:, 1].max() < 7 * 128, (seed, "tile 6")
    assert len(changed) > 64, (seed, "the tile is rescaled")


def test_empty_experts_take_no_tile_and_rows_past_the_last_end_are_zeros():
    """Tiles are numbered across the experts in order, an empty expert taking none; NaN in the
    rows past the last end is never read (their data 0, no error); no expert with rows: every
    scale 2^-126."""
    seed = fresh_seed()
    ends = group_ends(COUNTS)
    tile_of_row = segment_tile_of_rows(ends, N).tolist()
    expected, tile = [], 0
    for start, end in _bounds(COUNTS):
        expected += [tile + (row - start) // 128 for row in range(start, end)]
        tile += math.ceil((end - start) / 128)
    assert tile == 8, "1, 127, 128, 129 and 300 rows: 1, 1, 1, 2, 3 tiles; empty experts none"
    expected += [tile + row // 128 for row in range(PADDING)]  # then the rows past the end
    assert tile_of_row == expected
    x = torch.randn(N, I)
    x[sum(COUNTS):] = float("nan")
    q = quantize_128x1_segments(x, ends)
    assert (q.data_by_row(ends)[:, sum(COUNTS):].float() == 0).all(), seed
    assert (q.data[:, 8 * 128:].float() == 0).all(), (seed, "past the experts' 8 tiles")
    assert (q.dequantize(ends)[sum(COUNTS):] == 0).all(), seed
    nobody = quantize_128x1_segments(torch.randn(5, I), group_ends([0, 0]))
    assert (nobody.scales == MIN_SCALE).all() and (nobody.data.float() == 0).all()
    assert nobody.scales.shape == (I, 1 + 2)


def test_dequantize_is_within_e4m3s_rounding_of_x():
    """|x - data * scale| <= max(2^-4 |x|, 2^-10 scale) + 2^-21 |x| element by element:
    half an E4M3 ulp of x / scale in its normal range (3 mantissa bits), the subnormal step's
    half below it, and three fp32 roundings (1 / scale, x times it, data * scale). Tight: some
    element uses more than half of the bound."""
    seed = fresh_seed()
    x = _spread(N, I)
    q = quantize_128x1_segments(x, group_ends(COUNTS))
    _, scale = _fp64_segment_scales(x, COUNTS, pow2=False)
    x64 = x.double()[:sum(COUNTS)]
    scale = scale[:sum(COUNTS)]
    error = (q.dequantize(group_ends(COUNTS)).double()[:sum(COUNTS)] - x64).abs()
    bound = torch.maximum(2**-4 * x64.abs(), 2**-10 * scale) + 2**-21 * x64.abs()
    worst = (error / bound).max().item()
    assert 0.5 < worst <= 1.0, (seed, worst)


def _wgrad_problem():
    dy = torch.randn(N, O) * 1e-3 * torch.rand(N, 1)  # rows of different magnitudes
    x = torch.randn(N, I) * 4 * torch.rand(N, 1)
    ends = group_ends(COUNTS)
    return dy, x, ends, quantize_128x1_segments(dy, ends), quantize_128x1_segments(x, ends)


def test_each_experts_dw_is_the_dense_fp8_gemm_of_its_rows_alone_bit_for_bit():
    """Expert e's tiles are quantize_128x1 of its rows alone, and its dW the dense emulated
    FP8 GEMM of them (gemm.py: each 128-token block's product scaled in FP32); empty experts'
    dW zero; a bf16 result is the fp32 one rounded."""
    seed = fresh_seed()
    dy, x, ends, dy_q, x_q = _wgrad_problem()
    dW = fp8_grouped_wgrad_emulated(dy_q, x_q, ends)
    assert dW.shape == (len(COUNTS), O, I)
    for e, (start, end) in enumerate(_bounds(COUNTS)):
        if end == start:
            assert (dW[e] == 0).all(), (seed, e)
            continue
        want = fp8_gemm_emulated(quantize_128x1(dy[start:end]), quantize_128x1(x[start:end]))
        assert torch.equal(dW[e], want), (seed, e)
    assert torch.equal(fp8_grouped_wgrad_emulated(dy_q, x_q, ends, torch.bfloat16),
                       dW.bfloat16()), seed


def test_emulated_wgrad_is_the_fp64_product_of_the_dequantized_operands():
    """Within FP32_REORDER: the products of two E4M3 values are exact in fp32 (4 significant
    bits each), so only the fp32 sums of a tile's 128 products, the two scale multiplications
    and the accumulation over an expert's tiles round (2^-24 each, a few hundred of them at
    most, mostly cancelling)."""
    seed = fresh_seed()
    _, _, ends, dy_q, x_q = _wgrad_problem()
    dy64, x64 = dy_q.dequantize(ends).double(), x_q.dequantize(ends).double()
    want = torch.stack([dy64[start:end].t() @ x64[start:end] for start, end in _bounds(COUNTS)])
    assert_close(fp8_grouped_wgrad_emulated(dy_q, x_q, ends), want, FP32_REORDER,
                 "exact FP8 products, fp32 sums of 128-token tiles", name=f"seed {seed}")


def test_emulated_wgrad_is_within_e4m3s_rounding_of_the_exact_product():
    """Against dy_e^T x_e of the unquantized operands in fp64, element by element:
    |dy' x' - dy x| <= |dy|^T e_x + e_dy^T |x| + e_dy^T e_x, with e the per-element rounding
    bound of test_dequantize_is_within_e4m3s_rounding_of_x (about 2^-4 of each element), plus
    FP32_REORDER of |dy|^T |x| for the fp32 sums. Relative to max |dW| the error is a few
    percent (random rounding errors partly cancel): between 2^-10 and 2^-3."""
    seed = fresh_seed()
    dy, x, ends, dy_q, x_q = _wgrad_problem()
    _, scale_dy = _fp64_segment_scales(dy, COUNTS, pow2=False)
    _, scale_x = _fp64_segment_scales(x, COUNTS, pow2=False)
    dy64, x64 = dy.double(), x.double()
    e_dy = torch.maximum(2**-4 * dy64.abs(), 2**-10 * scale_dy) + 2**-21 * dy64.abs()
    e_x = torch.maximum(2**-4 * x64.abs(), 2**-10 * scale_x) + 2**-21 * x64.abs()
    got = fp8_grouped_wgrad_emulated(dy_q, x_q, ends).double()
    for e, (start, end) in enumerate(_bounds(COUNTS)):
        rows = slice(start, end)
        exact = dy64[rows].t() @ x64[rows]
        magnitude = dy64[rows].abs().t() @ x64[rows].abs()
        bound = (dy64[rows].abs().t() @ e_x[rows] + e_dy[rows].t() @ x64[rows].abs()
                 + e_dy[rows].t() @ e_x[rows] + FP32_REORDER * magnitude)
        assert ((got[e] - exact).abs() <= bound).all(), (seed, e)
    want = torch.stack([dy64[s:t].t() @ x64[s:t] for s, t in _bounds(COUNTS)])
    error = ((got - want).abs().max() / want.abs().max()).item()
    assert 2**-10 < error < 2**-3, (seed, error)


def test_the_cpu_dispatch_is_the_reference_and_the_emulation():
    seed = fresh_seed()
    dy, x, ends, dy_q, x_q = _wgrad_problem()
    fused = quantize_128x1_segments_fused(x, ends, pow2_scales=True)
    reference = quantize_128x1_segments(x, ends, pow2_scales=True)
    assert torch.equal(fused.data.view(torch.uint8), reference.data.view(torch.uint8)), seed
    assert torch.equal(fused.scales, reference.scales), seed
    want = fp8_grouped_wgrad_emulated(dy_q, x_q, ends)
    assert torch.equal(fp8_grouped_wgrad(dy_q, x_q, ends), want), seed
    sum_EOI = torch.randn(len(COUNTS), O, I)
    before = sum_EOI.clone()
    fp8_grouped_wgrad_add_(dy_q, x_q, ends, sum_EOI)
    assert torch.equal(sum_EOI, before + want), seed


_INTERPRETED = E4M3_CAST_LIKE_THE_GPU + textwrap.dedent("""
    import math
    _empty = torch.empty

    def _poisoned_empty(*args, **kwargs):  # an output element a kernel misses stays NaN
        t = _empty(*args, **kwargs)
        return t.fill_(math.nan) if t.is_floating_point() else t

    torch.empty = _poisoned_empty

    from megatron_dsv3.fp8.grouped_gemm import (fp8_grouped_wgrad_emulated,
        quantize_128x1_segments)
    from megatron_dsv3.kernels.fp8_grouped_wgrad import (launch_fp8_grouped_wgrad,
        launch_fp8_grouped_wgrad_add_, launch_quantize_128x1_segments)

    seed = int(torch.randint(0, 2**31 - 1, ()))
    torch.manual_seed(seed)

    def bits(t):
        return t.data.view(torch.uint8)

    def ends_of(counts):
        return torch.tensor(counts).cumsum(0).to(torch.int32)

    # The quantizer: groups of 0, 1, 127, 128, 129, 300 rows and 140 rows past the last end
    # (NaN: never read; two tiles of zeros); with 32-column blocks two, the last partial
    COUNTS, PADDING, I = [0, 1, 127, 128, 129, 300, 0], 140, 40
    ends = ends_of(COUNTS)
    rows = sum(COUNTS) + PADDING
    for dtype, pow2, config in ((torch.float32, False, None),
                                (torch.float16, True, {"BLOCK_I": 32, "num_warps": 2})):
        x = torch.randn(rows, I) * 2.0 ** torch.randint(-14, 11, (rows, 1)).float()
        x[:128, :20] = 0  # all-zero tiles
        x[sum(COUNTS):] = math.nan
        x = x.to(dtype)
        case = (seed, dtype, pow2, config)
        got = launch_quantize_128x1_segments(x, ends, pow2_scales=pow2, config=config)
        want = quantize_128x1_segments(x, ends, pow2_scales=pow2)
        assert torch.equal(bits(got), bits(want)), case
        assert torch.equal(got.scales, want.scales), case
    strided = torch.randn(I, rows).t()  # a column-major view: the strides are used
    got, want = (launch_quantize_128x1_segments(strided, ends),
                 quantize_128x1_segments(strided, ends))
    assert torch.equal(bits(got), bits(want)) and torch.equal(got.scales, want.scales), seed
    # a non-finite element: a NaN scale for its tile (expert 5's second, tile 6), the rest
    # as the reference gives for finite input
    x = torch.randn(rows, I)
    broken = x.clone()
    broken[600, 9] = math.inf
    got, want = launch_quantize_128x1_segments(broken, ends), quantize_128x1_segments(x, ends)
    assert got.scales.isnan().nonzero().tolist() == [[9, 6]], seed
    keep = torch.ones_like(bits(got), dtype=torch.bool)
    keep[9, 6 * 128:7 * 128] = False
    assert torch.equal(bits(got)[keep], bits(want)[keep]), seed

    # The GEMM: store (fp32, fp16 output) and add modes against the emulation, within
    # tolerance.FP32_REORDER (the same FP8 products, fp32 sums reordered). O = 96, I = 40:
    # with 64 x 32 blocks two of each, the second partial; rows past the last end (first
    # case); the reference's operands and the kernel's; in the third, the experts before one
    # counted 4 at a time (BLOCK_E; 128 by default): up to three rounds
    O = 96
    dy = torch.randn(rows, O) * 1e-3 * torch.rand(rows, 1)
    x = torch.randn(rows, I) * 4 * torch.rand(rows, 1)
    for counts, quantize, config in (
            (COUNTS, quantize_128x1_segments, None),
            ([0, 256, 0, 137, 432], launch_quantize_128x1_segments,
             {"BLOCK_O": 64, "BLOCK_I": 32, "num_warps": 4}),
            ([0, 3, 0, 3, 0, 3, 0, 3, 5, 9], launch_quantize_128x1_segments,
             {"BLOCK_E": 4})):
        ends = ends_of(counts)
        dy_q, x_q = quantize(dy, ends), quantize(x, ends)
        want = fp8_grouped_wgrad_emulated(dy_q, x_q, ends)
        case = f"seed {seed}, {counts}, {config}"
        got = launch_fp8_grouped_wgrad(dy_q, x_q, ends, config=config)
        assert not got.isnan().any(), case + ": every element written"
        error = ((got - want).abs().max() / want.abs().max()).item()
        assert error <= 1e-5, f"{case}: relative error {error:.3e}"
        empty = [e for e, c in enumerate(counts) if c == 0]
        assert (got[empty] == 0).all(), case + ": empty experts' dW is zero"
        half = launch_fp8_grouped_wgrad(dy_q, x_q, ends, torch.float16, config=config)
        assert torch.equal(half, got.half()), case + ": fp16 is fp32 rounded"
        # the running sum at dW's own magnitude: fp32 rounds the addition relative to the
        # larger of the two, so a sum 100x larger than dW would leave ~1e-5 of dW's size
        sum_EOI = torch.randn_like(want) * want.abs().max()
        before = sum_EOI.clone()
        launch_fp8_grouped_wgrad_add_(dy_q, x_q, ends, sum_EOI, config=config)
        error = ((sum_EOI - before - want).abs().max() / want.abs().max()).item()
        assert error <= 1e-5, f"{case}: added, relative error {error:.3e}"
        assert torch.equal(sum_EOI[empty], before[empty]), case + ": untouched"
    print("ok")
""")


def test_kernels_in_triton_interpreter_match_the_references():
    assert_ok_in_triton_interpreter(_INTERPRETED)


def test_bad_inputs_raise_naming_the_argument_and_the_fix():
    dy, x, ends, dy_q, x_q = _wgrad_problem()
    with pytest.raises(ValueError, match=r"x_NI: a 2-D tensor .* flatten"):
        quantize_128x1_segments(x[None], ends)
    with pytest.raises(ValueError, match="x_NI: dtype torch.int32 cannot be quantized"):
        quantize_128x1_segments(x.int(), ends)
    with pytest.raises(ValueError, match="group_ends must be a 1-D int32 tensor"):
        quantize_128x1_segments(x, ends.long())
    with pytest.raises(ValueError, match="group_ends must be a 1-D int32 tensor"):
        quantize_128x1_segments_fused(x, ends[None])
    with pytest.raises(ValueError, match="at least one, on x_NI's device"):
        quantize_128x1_segments(x, ends[:0])
    with pytest.raises(ValueError, match="at least one, on x_NI's device"):
        quantize_128x1_segments(x, torch.zeros(3, dtype=torch.int32, device="meta"))
    with pytest.raises(ValueError, match="must be non-decreasing"):
        quantize_128x1_segments(x, group_ends([5, -1, 3]))
    with pytest.raises(ValueError, match=f"at most N={N}"):
        quantize_128x1_segments(x, group_ends([N, 1]))
    x_bad = x.clone()
    x_bad[600, 9] = float("inf")
    with pytest.raises(ValueError, match=r"x_NI\[600, 9\] = inf.*expert 5's 128x1 tile of rows "
                                         r"513:641, column 9 \(1 non-finite"):
        quantize_128x1_segments(x_bad, ends)
    with pytest.raises(ValueError, match=r"scales: fp32 of shape \(I, T\) = \(136, ceil\(N/128\) \+ E\)"):
        Fp8SegmentTiles(x_q.data, x_q.scales[:, :6], x_q.rows)
    with pytest.raises(ValueError, match=r"scales: fp32 .* with data \[I, 128 T\]"):
        Fp8SegmentTiles(x_q.data[:, :-1], x_q.scales, x_q.rows)
    with pytest.raises(ValueError, match="rows=-1: the number of rows N"):
        Fp8SegmentTiles(x_q.data, x_q.scales, -1)
    with pytest.raises(ValueError, match="data: a 2-D"):
        Fp8SegmentTiles(x_q.data.float(), x_q.scales, x_q.rows)
    with pytest.raises(ValueError, match="dequantize: group_ends has 6 entries for tiles of 7"):
        x_q.dequantize(ends[:6])
    with pytest.raises(ValueError, match="dy_q must be an Fp8SegmentTiles"):
        fp8_grouped_wgrad(quantize_128x1(dy), x_q, ends)
    with pytest.raises(ValueError, match="x_q must be an Fp8SegmentTiles"):
        fp8_grouped_wgrad_emulated(dy_q, x, ends)
    with pytest.raises(ValueError, match="same rows with the same group_ends"):
        fp8_grouped_wgrad(dy_q, quantize_128x1_segments(x[:-PADDING], ends), ends)
    with pytest.raises(ValueError, match="group_ends has 6 entries and the operands' tiles are "
                                         "those of 7 experts"):
        fp8_grouped_wgrad(dy_q, x_q, ends[:6])
    with pytest.raises(ValueError, match="group_ends must be a 1-D int32 tensor"):
        fp8_grouped_wgrad(dy_q, x_q, ends.long())
    with pytest.raises(ValueError, match=r"sum_EOI must be an fp32 \[E, O, I\] = \[7, 72, 136\]"):
        fp8_grouped_wgrad_add_(dy_q, x_q, ends, torch.zeros(7, 72, 136, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="sum_EOI must be an fp32"):
        launch_fp8_grouped_wgrad_add_(dy_q, x_q, ends, torch.zeros(7, 136, 72))
    # the kernels' own checks come before any launch, so they run on the CPU too
    with pytest.raises(ValueError, match="out_dtype=torch.int32"):
        launch_fp8_grouped_wgrad(dy_q, x_q, ends, torch.int32)
    with pytest.raises(ValueError, match=r"unknown keys \['BLOCK_K'\]"):
        launch_config("wgrad", {"BLOCK_K": 64})
    with pytest.raises(ValueError, match=r"unknown keys \['BLOCK_O'\]"):
        launch_config("quantize", {"BLOCK_O": 64})
