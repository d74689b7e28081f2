"""FP8 quantization (fp8/quantize.py, the references; kernels/fp8_quantize.py, the fused kernels).

  * the references' scales against an fp64 computation, tile by tile, of the definition
    max(amax / 448, 2^-126) (rounded up to a power of two when asked): bit-equal, on shapes
    with partial tiles (M=130, K=200) and tiles whose values span many binades;
  * the round trip x -> data * scale within E4M3's rounding bound (test_round_trip...);
  * an outlier changes its own tile only; power-of-two scales; zero rows, all-zero and tiny
    tiles; non-finite input (the references raise naming the tile); bad inputs;
  * the Triton kernels in Triton's interpreter (a fresh process) against the references, bit
    for bit, data and scales, on partial tiles, strided input, fp16 and fp32 (the interpreter
    has no bf16: numpy lacks it; test_gpu.py is where bf16 belongs), and a non-finite tile
    giving a NaN scale while its neighbours stay as they were.
    The interpreter's own fp32 -> fp8 cast is wrong (it rounds the mantissa without carrying
    into the exponent: 31.6 becomes 16, not 32), so the interpreted script replaces it with
    torch's cast, round-to-nearest-even like the GPU's cvt.rn; everything else the kernels do
    (amax, scale, reciprocal, clamp, masking, transposed stores) is the kernels' own.
Fresh random inputs each run; the seed is in every failure message.
"""

from __future__ import annotations

import math
import textwrap

import pytest
import torch

from helpers.fp8_cases import E4M3_CAST_LIKE_THE_GPU, fresh_seed
from helpers.triton_interpreter import assert_ok_in_triton_interpreter
from megatron_dsv3.fp8 import (
    FP8_E4M3_MAX,
    MIN_SCALE,
    Fp8Tensor,
    quantize_1x128,
    quantize_128x1,
    quantize_128x128,
)
from megatron_dsv3.kernels.fp8_quantize import quantize_1x128_fused

QUANTIZERS = {"1x128": quantize_1x128, "128x1": quantize_128x1, "128x128": quantize_128x128}
INPUT_TILE = {"1x128": (1, 128), "128x1": (128, 1), "128x128": (128, 128)}


def _spread(rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """Gaussian values whose scale changes by up to 2^±12 between rows and columns, so that
    tiles differ in amax and many values fall far below their tile's amax (E4M3 subnormals)."""
    row_scale = 2.0 ** torch.randint(-12, 13, (rows, 1)).float()
    col_scale = 2.0 ** torch.randint(-12, 1, (1, cols)).float()
    return (torch.randn(rows, cols) * row_scale * col_scale).to(dtype)


def _tiles(shape, tile):
    """(tile row, tile column, slice of rows, slice of columns) of each tile of `shape`."""
    for i in range(math.ceil(shape[0] / tile[0])):
        for j in range(math.ceil(shape[1] / tile[1])):
            yield i, j, slice(i * tile[0], (i + 1) * tile[0]), slice(j * tile[1], (j + 1) * tile[1])


def _fp64_scales(x: torch.Tensor, tiling: str, pow2: bool):
    """The definition, in fp64, tile by tile over x's own layout: the scales as the quantizer
    stores them (128x1 transposed, like its data) and each element's scale, x's shape.
    Without pow2, max(amax / 448, 2^-126) in fp64 rounded to fp32 is the correctly rounded fp32
    quotient (fp64 keeps 53 >= 2 * 24 + 2 bits, so rounding twice is the same as once)."""
    x64 = x.double()
    tile = INPUT_TILE[tiling]
    grid = torch.zeros(math.ceil(x.shape[0] / tile[0]), math.ceil(x.shape[1] / tile[1]),
                       dtype=torch.float64)
    for i, j, rows, cols in _tiles(x.shape, tile):
        scale = max(x64[rows, cols].abs().max().item() / FP8_E4M3_MAX, MIN_SCALE)
        if pow2:
            mantissa, exponent = math.frexp(scale)  # scale = mantissa * 2^exponent, [0.5, 1)
            scale = 2.0 ** (exponent - 1 if mantissa == 0.5 else exponent)
        grid[i, j] = scale
    per_element = grid.repeat_interleave(tile[0], 0)[:x.shape[0]]
    per_element = per_element.repeat_interleave(tile[1], 1)[:, :x.shape[1]]
    return (grid.t() if tiling == "128x1" else grid), per_element


SHAPES = [(130, 200), (1, 1), (257, 128), (128, 385)]


@pytest.mark.parametrize("tiling", QUANTIZERS)
@pytest.mark.parametrize("pow2", [False, True], ids=["exact", "pow2"])
def test_reference_scales_equal_an_fp64_computation_of_the_definition(tiling, pow2):
    seed = fresh_seed()
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for shape in SHAPES:
            x = _spread(*shape, dtype=torch.float32).clamp(-6e4, 6e4).to(dtype)
            expected, _ = _fp64_scales(x, tiling, pow2)
            got = QUANTIZERS[tiling](x, pow2_scales=pow2)
            assert torch.equal(got.scales, expected.float()), (seed, tiling, dtype, shape)


@pytest.mark.parametrize("tiling", QUANTIZERS)
def test_reference_data_is_x_times_the_correctly_rounded_reciprocal_scale(tiling):
    """data = cast(clamp(x * (1 / scale))), computed here in fp64 from the scales as stored
    (the fp64 definition rounded to fp32): 1 / scale and the product each rounded once to fp32
    (fp64 holds the product of two fp32 exactly and keeps enough bits that rounding its
    quotient to fp32 is correct rounding). Not x / scale: on these inputs some fp32 product
    differs from the quotient (checked)."""
    seed = fresh_seed()
    x = _spread(300, 260, dtype=torch.float32)
    _, scale = _fp64_scales(x, tiling, pow2=False)
    scale = scale.float().double()  # as the quantizer stores it
    inverse = (1.0 / scale).float().double()
    expected = (x.double() * inverse).float().clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX)
    got = QUANTIZERS[tiling](x)
    data = got.data.t() if tiling == "128x1" else got.data
    assert torch.equal(data.view(torch.uint8),
                       expected.to(torch.float8_e4m3fn).view(torch.uint8)), (seed, tiling)
    divided = (x.double() / scale).float().clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX)
    assert not torch.equal(expected, divided), (seed, tiling, "no element tells them apart")


def _e4m3_error_bound(x64: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The most |x - data * scale| may be, element by element: max(2^-4 |x|, 2^-10 scale)
    + 2^-21 |x|. E4M3 keeps 3 mantissa bits, so a value of x / scale in its normal range
    (>= 2^-6) is rounded by at most half an ulp, 2^-4 of itself; below it the subnormal step
    is 2^-9, an absolute error of at most 2^-10 (times the scale). The last term covers the
    three fp32 roundings around the cast (1 / scale and x times it before it, data * scale in
    dequantize(), 2^-24 each)."""
    return torch.maximum(2**-4 * x64.abs(), 2**-10 * scale) + 2**-21 * x64.abs()


@pytest.mark.parametrize("tiling", QUANTIZERS)
@pytest.mark.parametrize("pow2", [False, True], ids=["exact", "pow2"])
def test_round_trip_error_within_the_e4m3_rounding_bound(tiling, pow2):
    """_e4m3_error_bound holds for every element, and is tight: some element uses more than
    half of it."""
    seed = fresh_seed()
    for shape in ((130, 200), (300, 129)):
        x = _spread(*shape, dtype=torch.float32)
        quantized = QUANTIZERS[tiling](x, pow2_scales=pow2)
        _, scale = _fp64_scales(x, tiling, pow2)
        x64 = x.double()
        error = (quantized.dequantize().double() - x64).abs()
        worst = (error / _e4m3_error_bound(x64, scale)).max().item()
        assert worst <= 1.0, (seed, tiling, shape, worst)
        assert worst > 0.5, (seed, tiling, shape, worst, "the bound is not reached")
        assert (x64.abs() / scale < 2**-6).any(), "some values in the E4M3 subnormal range"


@pytest.mark.parametrize("tiling", QUANTIZERS)
def test_an_outlier_changes_its_own_tile_only(tiling):
    seed = fresh_seed()
    x = torch.randn(130, 200, dtype=torch.bfloat16)
    before = QUANTIZERS[tiling](x)
    row, col = int(torch.randint(0, 130, ())), int(torch.randint(0, 200, ()))
    x[row, col] = 1e4
    after = QUANTIZERS[tiling](x)
    tile = INPUT_TILE[tiling]
    changed = torch.zeros(130, 200, dtype=torch.bool)
    changed[row // tile[0] * tile[0]:(row // tile[0] + 1) * tile[0],
            col // tile[1] * tile[1]:(col // tile[1] + 1) * tile[1]] = True
    if tiling == "128x1":
        changed = changed.t()
    same_data = before.data.view(torch.uint8) == after.data.view(torch.uint8)
    assert same_data[~changed].all(), (seed, tiling, row, col)
    assert not same_data[changed].all(), (seed, tiling, "the outlier's tile is rescaled")
    scale_changed = (before.scales != after.scales).nonzero().tolist()
    tile_index = [row // tile[0], col // tile[1]]
    assert scale_changed == [tile_index[::-1] if tiling == "128x1" else tile_index], seed
    assert after.scales.max().item() == pytest.approx(1e4 / FP8_E4M3_MAX, rel=2**-8)


@pytest.mark.parametrize("tiling", QUANTIZERS)
def test_pow2_scales_are_the_smallest_power_of_two_at_or_above_amax_over_448(tiling):
    seed = fresh_seed()
    x = _spread(130, 200, torch.float32)
    x[:128, :128] = 0
    x[0, 0] = FP8_E4M3_MAX * 2**-3  # the first tile's amax / 448 is a power of two already
    scales = QUANTIZERS[tiling](x, pow2_scales=True).scales.double()
    exact, _ = _fp64_scales(x, tiling, pow2=False)
    mantissa, _ = torch.frexp(scales)
    assert (mantissa == 0.5).all(), (seed, "exact powers of two")
    assert (scales >= exact).all() and (scales < 2 * exact).all(), seed
    assert scales[0, 0].item() == 2**-3, "amax / 448 = 2^-3 keeps scale 2^-3"


@pytest.mark.parametrize("tiling", QUANTIZERS)
def test_zero_rows_give_empty_results_of_the_right_shapes(tiling):
    quantized = QUANTIZERS[tiling](torch.zeros(0, 200))
    data_shape, scale_shape = {"1x128": ((0, 200), (0, 2)), "128x1": ((200, 0), (200, 0)),
                               "128x128": ((0, 200), (0, 2))}[tiling]
    assert tuple(quantized.data.shape) == data_shape
    assert tuple(quantized.scales.shape) == scale_shape
    assert tuple(quantized.dequantize().shape) == (0, 200)


@pytest.mark.parametrize("tiling", QUANTIZERS)
def test_all_zero_and_tiny_tiles_get_the_smallest_normal_scale(tiling):
    """scale = max(amax / 448, 2^-126): an all-zero tile gets 2^-126 and dequantizes to exactly
    0 (amax / 448 = 0 would make 0 / 0 = NaN); a tile of fp32 subnormals (amax / 448 would be
    subnormal or 0) gets 2^-126 too and keeps its values within E4M3's rounding bound."""
    x = torch.zeros(256, 256)
    x[128:, 128:] = torch.randn(128, 128) * 1e-39
    quantized = QUANTIZERS[tiling](x)
    assert (quantized.scales == MIN_SCALE).all()
    deq = quantized.dequantize()
    assert torch.equal(deq[:128], torch.zeros(128, 256)), "all-zero tiles dequantize to 0"
    tiny = x[128:, 128:].double()
    error = (deq[128:, 128:].double() - tiny).abs()
    assert (error <= _e4m3_error_bound(tiny, torch.full_like(tiny, MIN_SCALE))).all()
    assert deq[128:, 128:].count_nonzero() > 0


@pytest.mark.parametrize("tiling", QUANTIZERS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_raises_naming_the_element_and_its_tile(tiling, bad):
    x = torch.randn(130, 200, dtype=torch.bfloat16)
    x[129, 150] = bad
    x[129, 199] = bad
    name = "w" if tiling == "128x128" else "x"
    tile = {"1x128": "rows 129:130 and columns 128:200", "128x1": "rows 128:130 and columns "
            "150:151", "128x128": "rows 128:130 and columns 128:200"}[tiling]
    with pytest.raises(ValueError, match=rf"{name}\[129, 150\] = {bad}.*{tiling} tile of "
                                         rf"{tile} \(2 non-finite"):
        QUANTIZERS[tiling](x)


def test_the_fused_entry_points_use_the_reference_on_the_cpu():
    x = torch.randn(130, 200, dtype=torch.bfloat16)
    fused = quantize_1x128_fused(x, pow2_scales=True)
    reference = quantize_1x128(x, pow2_scales=True)
    assert torch.equal(fused.data.view(torch.uint8), reference.data.view(torch.uint8))
    assert torch.equal(fused.scales, reference.scales)
    x[3, 4] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        quantize_1x128_fused(x)


@pytest.mark.parametrize("tiling", QUANTIZERS)
def test_bad_inputs_raise_naming_the_argument_and_the_fix(tiling):
    name = "w" if tiling == "128x128" else "x"
    quantize = QUANTIZERS[tiling]
    with pytest.raises(ValueError, match=rf"{name}: a 2-D tensor .* got shape \(2, 3, 4\); "
                                         rf"flatten"):
        quantize(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match=rf"{name}: a 2-D tensor .* got shape \(5,\)"):
        quantize(torch.zeros(5))
    for dtype in (torch.int32, torch.float64, torch.float8_e4m3fn):
        with pytest.raises(ValueError, match=rf"{name}: dtype {dtype} cannot be quantized; "
                                             rf"convert it to one of torch.bfloat16"):
            quantize(torch.zeros(4, 4).to(dtype))


def test_fp8_tensor_rejects_scales_that_do_not_fit_its_data():
    data = torch.zeros(130, 200, dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match=r"scales: fp32 of shape \(130, 2\)"):
        Fp8Tensor(data, torch.ones(130, 1), "1x128")
    with pytest.raises(ValueError, match=r"scales: fp32 of shape \(2, 2\)"):
        Fp8Tensor(data, torch.ones(2, 2, dtype=torch.float64), "128x128")
    with pytest.raises(ValueError, match="tiling='1x64'"):
        Fp8Tensor(data, torch.ones(130, 2), "1x64")
    with pytest.raises(ValueError, match="data: a 2-D torch.float8_e4m3fn"):
        Fp8Tensor(data.float(), torch.ones(130, 2), "1x128")


_INTERPRETED = E4M3_CAST_LIKE_THE_GPU + textwrap.dedent("""
    from megatron_dsv3.fp8 import MIN_SCALE, quantize_1x128, quantize_128x1, quantize_128x128
    from megatron_dsv3.kernels.fp8_quantize import (
        launch_quantize_1x128, launch_quantize_128x1,
        launch_quantize_128x128)

    PAIRS = {"1x128": (launch_quantize_1x128, quantize_1x128),
             "128x1": (launch_quantize_128x1, quantize_128x1),
             "128x128": (launch_quantize_128x128, quantize_128x128)}
    seed = int(torch.randint(0, 2**31 - 1, ()))
    torch.manual_seed(seed)

    def bits(t):
        return t.data.view(torch.uint8)

    def inputs(rows, cols, dtype):
        # magnitudes 2^-14..2^10 per row (fp16's range); all-zero tiles of every tiling in
        # x[:128, :128]; values far below the smallest normal scale in the last quarter
        x = torch.randn(rows, cols) * 2.0 ** torch.randint(-14, 11, (rows, 1)).float()
        x[:128, :128] = 0
        x[rows // 2:, cols // 2:] *= 1e-7 if dtype == torch.float16 else 1e-38
        return x.to(dtype)

    def assert_bit_identical(kernel, reference, x, pow2, case):
        got, want = kernel(x, pow2_scales=pow2), reference(x, pow2_scales=pow2)
        assert torch.equal(bits(got), bits(want)), case
        assert torch.equal(got.scales, want.scales), case
        if got.tiling != "128x128":  # outer-dimension-major, as cuBLASLt reads them
            assert got.scales.stride(0) == 1 == want.scales.stride(0), case
        assert (want.scales == MIN_SCALE).any(), case  # the zero tiles were reached

    # (130, 200): partial tiles along both dimensions and several programs along both axes of
    # every grid; (1, 1): one partial tile
    for dtype in (torch.float32, torch.float16):
        for rows, cols in ((130, 200), (1, 1)):
            x = inputs(rows, cols, dtype)
            for tiling, (kernel, reference) in PAIRS.items():
                for pow2 in (False, True):
                    assert_bit_identical(kernel, reference, x, pow2,
                                         (seed, tiling, dtype, rows, cols, pow2))
    strided = inputs(200, 130, torch.float32).t()  # a column-major view: the strides are used
    for tiling, (kernel, reference) in PAIRS.items():
        assert_bit_identical(kernel, reference, strided, False, (seed, tiling, "strided"))

    # a non-finite tile: NaN scale; every other tile as the reference gives for finite input
    x = torch.randn(130, 200)
    for bad, pow2 in ((float("nan"), True), (float("inf"), False)):
        broken = x.clone()
        broken[129, 150] = bad
        for tiling, (kernel, reference) in PAIRS.items():
            got, want = kernel(broken, pow2_scales=pow2), reference(x, pow2_scales=pow2)
            nan_tiles = got.scales.isnan().nonzero().tolist()
            expected_tile = {"1x128": [129, 1], "128x1": [150, 1],
                             "128x128": [1, 1]}[got.tiling]
            assert nan_tiles == [expected_tile], (seed, tiling, bad, nan_tiles)
            assert got.dequantize().isnan().any(), (seed, tiling, "NaN reaches the values")
            keep = ~got.scales.isnan()
            assert torch.equal(got.scales[keep], want.scales[keep]), (seed, tiling, bad)
            tile_rows, tile_cols = (128, 128) if got.tiling == "128x128" else (1, 128)
            rows_ok = keep.repeat_interleave(tile_rows, 0)[: got.data.shape[0]]
            ok = rows_ok.repeat_interleave(tile_cols, 1)[:, : got.data.shape[1]]
            assert torch.equal(bits(got)[ok], bits(want)[ok]), (seed, tiling, bad)

    # a block's largest element in every 8th row of a block (the 128x128 kernel reads a block
    # in row slices): column block b's outlier in row 8 b + 7 of the first row block and in
    # row 8 b of the second
    x = torch.randn(256, 16 * 128)
    for block in range(16):
        x[8 * block + 7, 128 * block + 3] = 1e3
        x[128 + 8 * block, 128 * block + 100] = -1e3
    got, want = launch_quantize_128x128(x), quantize_128x128(x)
    assert torch.equal(bits(got), bits(want)) and torch.equal(got.scales, want.scales), seed

    for tiling, (kernel, reference) in PAIRS.items():  # zero rows: nothing launched
        got, want = kernel(torch.zeros(0, 200)), reference(torch.zeros(0, 200))
        assert got.data.shape == want.data.shape and got.scales.shape == want.scales.shape
    print("ok")
""")


def test_kernels_in_triton_interpreter_match_the_reference_bit_for_bit():
    assert_ok_in_triton_interpreter(_INTERPRETED)


def test_a_launch_config_with_an_unknown_key_is_refused():
    from megatron_dsv3.kernels.fp8_quantize import launch_config

    assert launch_config("128x1", {"BLOCK_K": 32})["BLOCK_K"] == 32
    with pytest.raises(ValueError, match=r"unknown keys \['BLOCK_M'\].*\['BLOCK_K', "
                                         r"'num_warps'\]"):
        launch_config("128x1", {"BLOCK_M": 32})
