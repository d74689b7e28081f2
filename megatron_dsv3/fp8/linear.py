"""The FP8 linear y = x W^T (+ b) of DeepSeek-V3's recipe: all three GEMMs in FP8.

  fp8_linear(x, weight, bias=None, store=None)   x [..., K], weight [N, K] -> y [..., N] in
                                                 x's dtype (autocast's where it is on)

  forward       x quantized in 1x128 tiles, W in 128x128 blocks; y = fp8_gemm
  input grad    dy in 1x128 tiles, W^T the forward's blocks transposed; dx = fp8_gemm
  weight grad   dy and x in 128x1 tiles (1x128 along the tokens, stored transposed);
                dW = fp8_gemm, accumulated in FP32, returned in W's dtype

What backward needs is kept in FP8: x as its 128x1 quantization (the weight gradient's
operand, quantized in the forward, where x is at hand) and W as its 128x128 blocks, with their
FP32 scales: one byte per element instead of two for a bf16 x. (One kernel writing both of x's
tilings from one read was slower on an H200 than the two kernels: benchmarks/RESULTS.md.)

The weight gradient (and the bias's) goes through weight_grad.weight_grad_now_or_later: with a
`store` that defers (the DualPipe schedules' B step) it is queued for the W step, with dY
already quantized (FP8 is what the queue holds), else computed in backward as usual.

Every piece is one of fp8/ops.py's custom operators (the quantizers of kernels/fp8_quantize.py,
one fused pass on a GPU and the references elsewhere; fp8/gemm.py's GEMMs), so that
torch.compile traces the layer instead of breaking its graph (eager code calls their bodies,
skipping the dispatcher's host time). W's blocks and their transpose come, in this order of
preference, from the layer's static blocks (`blocks`, inside a training step: refreshed once
per step, read by compiled code and CUDA graphs too), from the per-step cache (eager,
weight_cache.py), or from a quantization at each call (traced code without static blocks).
"""

from __future__ import annotations

from typing import Optional

import torch

from ..weight_grad import WeightGradStore, autocast_dtype, weight_grad_now_or_later
from . import ops  # the custom operators torch.ops.megatron_dsv3.* (traced) and their bodies
from .quantize import INPUT_DTYPES
from .weight_cache import Blocks, current_step, for_step, quantized_weight

Quantized = tuple[torch.Tensor, torch.Tensor]  # (data, scales)


def _quantize(t: torch.Tensor, tiling: str) -> Quantized:
    return ops.call("fp8_quantize", t, tiling)


def _gemm(a: Quantized, a_tiling: str, b: Quantized, b_tiling: str,
          out_dtype: torch.dtype) -> torch.Tensor:
    """A B^T, K-major operands (fp8/gemm.py's fp8_gemm)."""
    return ops.call("fp8_gemm", *a, a_tiling, *b, b_tiling, out_dtype)


def weight_blocks(weight: torch.Tensor) -> Quantized:
    """W [N, K] in 128x128 blocks (what the per-step cache holds)."""
    return _quantize(weight, "128x128")


def transposed_weight_blocks(w: Quantized) -> Quantized:
    """W's blocks as W^T's (the input gradient's operand)."""
    return ops.call("fp8_transposed_blocks", *w)


class _Fp8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                store: Optional[WeightGradStore], cached: bool,
                *blocks: Optional[torch.Tensor]) -> torch.Tensor:
        x_MK = x.reshape(-1, x.shape[-1])
        # W's blocks: the step's static ones (W^T's kept for backward), else once per step
        # where `cached` (eager: weight_cache.py), else here
        static = blocks[0] is not None
        if static:
            w = blocks[:2]
        else:
            w = quantized_weight(weight, weight_blocks) if cached else weight_blocks(weight)
        # x in 1x128 tiles for the forward GEMM and, when W needs a gradient, in 128x1 tiles
        # (x^T in 1x128 tiles along the tokens) for backward, quantized here where x is at hand
        x_q = _quantize(x_MK, "1x128")
        x_t = _quantize(x_MK, "128x1") if weight.requires_grad else ()
        out_dtype = autocast_dtype(x.device.type) or x.dtype
        if bias is None:  # the GEMM writes the output dtype itself: no fp32 pass over y
            y = _gemm(x_q, "1x128", w, "128x128", out_dtype)
        else:
            y = (_gemm(x_q, "1x128", w, "128x128", torch.float32) + bias.float()).to(out_dtype)
        # kept for backward, in FP8: W's blocks (W^T's where static) and x^T
        ctx.save_for_backward(*(blocks[2:] if static else w), *x_t)
        ctx.static = static
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        # the parameters themselves: a deferred gradient is accumulated into them
        ctx.weight, ctx.bias, ctx.store = weight, bias, store
        # the step's cache, for W^T: backward's thread does not see weights_fixed's block
        ctx.step = current_step() if cached else None
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        w_data, w_scales, *x_t = ctx.saved_tensors
        w = (w_data, w_scales)  # W's blocks, or W^T's where static
        dy_MN = grad_y.reshape(-1, grad_y.shape[-1])
        if dy_MN.dtype not in INPUT_DTYPES:  # what the quantizers take
            dy_MN = dy_MN.float()
        grad_x = grad_w = grad_b = None
        # dy in 1x128 tiles for the input gradient, in 128x1 tiles (dy^T) for the weight's,
        # now, even when the weight gradient is deferred (the queue then holds FP8)
        if ctx.needs_input_grad[0]:
            w_T = w if ctx.static else for_step(  # once per step where cached
                ctx.step, ctx.weight, transposed_weight_blocks, lambda: transposed_weight_blocks(w))
            grad_x = _gemm(_quantize(dy_MN, "1x128"), "1x128", w_T, "128x128",
                           ctx.x_dtype).reshape(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            weight, dy_t = ctx.weight, _quantize(dy_MN, "128x1")
            # the GEMM writes W's dtype from its FP32 accumulator: no FP32 pass over dW
            grad_w = weight_grad_now_or_later(ctx.store, weight, lambda: _gemm(
                dy_t, "128x1", tuple(x_t), "128x1", weight.dtype))
        if ctx.bias is not None and ctx.needs_input_grad[2]:
            bias = ctx.bias
            grad_b = weight_grad_now_or_later(ctx.store, bias, lambda: dy_MN.float().sum(
                dim=0).to(bias.dtype))
        return (grad_x, grad_w, grad_b) + (None,) * 6


@torch.compiler.disable  # the per-step cache and the deferral are Python state
def _fp8_linear_eager(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                      store: Optional[WeightGradStore], blocks: Blocks) -> torch.Tensor:
    return _Fp8Linear.apply(x, weight, bias, store, True, *blocks)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
               store: Optional[WeightGradStore] = None,
               blocks: Optional[Blocks] = None) -> torch.Tensor:
    """y = x W^T (+ b) with the forward, input-gradient and weight-gradient GEMMs in FP8
    (module docstring); x [..., K], weight [N, K], y [..., N]; the weight gradient deferred
    while `store` defers. `blocks`: W's and W^T's FP8 blocks as weight_cache.static_blocks
    hands them out (this step's), else W is quantized here: once per step eager, at each call
    traced. Under torch.compile without a store it is traced (no graph break)."""
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"fp8_linear: x [..., K] = {list(x.shape)} and weight [N, K] = "
                         f"{list(weight.shape)} do not match: K must be x's last dimension")
    blocks = (None,) * 4 if blocks is None else blocks
    if torch.compiler.is_compiling() and store is None:
        return _Fp8Linear.apply(x, weight, bias, None, False, *blocks)
    return _fp8_linear_eager(x, weight, bias, store, blocks)
