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

The quantizers are kernels/fp8_quantize.py's (one fused pass on a GPU, the references
elsewhere); the GEMMs fp8/gemm.py's.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..kernels.fp8_quantize import (quantize_1x128_fused, quantize_128x1_fused,
                                    quantize_128x128_fused)
from ..weight_grad import WeightGradStore, autocast_dtype, weight_grad_now_or_later
from . import ops  # noqa: F401  registers the custom operators torch.ops.megatron_dsv3.*
from .gemm import fp8_gemm, transposed_blocks
from .quantize import INPUT_DTYPES, Fp8Tensor
from .weight_cache import current_step, for_step, quantized_weight


class _Fp8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                store: Optional[WeightGradStore]) -> torch.Tensor:
        x_MK = x.reshape(-1, x.shape[-1])
        w = quantized_weight(weight, quantize_128x128_fused)  # once per step (weight_cache.py)
        # x in 1x128 tiles for the forward GEMM and, when W needs a gradient, in 128x1 tiles
        # (x^T in 1x128 tiles along the tokens) for backward, quantized here where x is at hand
        x_q = quantize_1x128_fused(x_MK)
        x_t = quantize_128x1_fused(x_MK) if weight.requires_grad else None
        out_dtype = autocast_dtype(x.device.type) or x.dtype
        if bias is None:  # the GEMM writes the output dtype itself: no fp32 pass over y
            y = fp8_gemm(x_q, w, out_dtype=out_dtype)
        else:
            y = (fp8_gemm(x_q, w, out_dtype=torch.float32) + bias.float()).to(out_dtype)
        # kept for backward, in FP8: x^T and W's blocks
        ctx.save_for_backward(*(t for q in (x_t, w) if q is not None
                                for t in (q.data, q.scales)))
        ctx.saved_x = x_t is not None
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        # the parameters themselves: a deferred gradient is accumulated into them
        ctx.weight, ctx.bias, ctx.store = weight, bias, store
        ctx.step = current_step()  # backward's thread does not see weights_fixed's block
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        saved = list(ctx.saved_tensors)
        x_t = Fp8Tensor(saved.pop(0), saved.pop(0), "128x1") if ctx.saved_x else None
        w = Fp8Tensor(saved.pop(0), saved.pop(0), "128x128")
        dy_MN = grad_y.reshape(-1, grad_y.shape[-1])
        if dy_MN.dtype not in INPUT_DTYPES:  # what the quantizers take
            dy_MN = dy_MN.float()
        grad_x = grad_w = grad_b = None
        # dy in 1x128 tiles for the input gradient, in 128x1 tiles (dy^T) for the weight's,
        # now, even when the weight gradient is deferred (the queue then holds FP8)
        if ctx.needs_input_grad[0]:
            w_T = for_step(ctx.step, ctx.weight, transposed_blocks,  # once per step
                           lambda: transposed_blocks(w))
            grad_x = fp8_gemm(quantize_1x128_fused(dy_MN), w_T,
                              out_dtype=ctx.x_dtype).reshape(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            weight, dy_t = ctx.weight, quantize_128x1_fused(dy_MN)
            # the GEMM writes W's dtype from its FP32 accumulator: no FP32 pass over dW
            grad_w = weight_grad_now_or_later(ctx.store, weight, lambda: fp8_gemm(
                dy_t, x_t, out_dtype=weight.dtype))
        if ctx.bias is not None and ctx.needs_input_grad[2]:
            bias = ctx.bias
            grad_b = weight_grad_now_or_later(ctx.store, bias, lambda: dy_MN.float().sum(
                dim=0).to(bias.dtype))
        return grad_x, grad_w, grad_b, None


class _Fp8LinearTraced(torch.autograd.Function):
    """_Fp8Linear's arithmetic as torch.compile traces it: every piece a custom operator
    (fp8/ops.py), tensors only on ctx, the weight gradient to autograd. W's blocks are
    quantized at each call: the per-step cache (weight_cache.py) is Python state that a
    compiled graph, and a CUDA graph recorded from it, would not revisit."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor,
                bias: Optional[torch.Tensor]) -> torch.Tensor:
        op = torch.ops.megatron_dsv3
        x_MK = x.reshape(-1, x.shape[-1])
        w_data, w_scales = op.fp8_quantize(weight, "128x128")
        x_data, x_scales = op.fp8_quantize(x_MK, "1x128")
        out_dtype = autocast_dtype(x.device.type) or x.dtype
        if bias is None:
            y = op.fp8_gemm(x_data, x_scales, "1x128", w_data, w_scales, "128x128", out_dtype)
        else:
            y = (op.fp8_gemm(x_data, x_scales, "1x128", w_data, w_scales, "128x128",
                              torch.float32) + bias.float()).to(out_dtype)
        x_t = op.fp8_quantize(x_MK, "128x1") if weight.requires_grad else ()
        ctx.save_for_backward(w_data, w_scales, *x_t)
        ctx.x_shape, ctx.x_dtype, ctx.w_dtype = x.shape, x.dtype, weight.dtype
        ctx.has_bias = bias is not None
        ctx.b_dtype = bias.dtype if bias is not None else None
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        op = torch.ops.megatron_dsv3
        w_data, w_scales, *x_t = ctx.saved_tensors
        dy_MN = grad_y.reshape(-1, grad_y.shape[-1])
        if dy_MN.dtype not in INPUT_DTYPES:
            dy_MN = dy_MN.float()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            wt_data, wt_scales = op.fp8_transposed_blocks(w_data, w_scales)
            dy_data, dy_scales = op.fp8_quantize(dy_MN, "1x128")
            grad_x = op.fp8_gemm(dy_data, dy_scales, "1x128", wt_data, wt_scales, "128x128",
                                  ctx.x_dtype).reshape(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            dyt_data, dyt_scales = op.fp8_quantize(dy_MN, "128x1")
            grad_w = op.fp8_gemm(dyt_data, dyt_scales, "128x1", x_t[0], x_t[1], "128x1",
                                  ctx.w_dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = dy_MN.float().sum(dim=0).to(ctx.b_dtype)
        return grad_x, grad_w, grad_b


@torch.compiler.disable  # the eager path's per-step cache and deferral are Python state
def _fp8_linear_eager(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                      store: Optional[WeightGradStore]) -> torch.Tensor:
    return _Fp8Linear.apply(x, weight, bias, store)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
               store: Optional[WeightGradStore] = None) -> torch.Tensor:
    """y = x W^T (+ b) with the forward, input-gradient and weight-gradient GEMMs in FP8
    (module docstring); x [..., K], weight [N, K], y [..., N]; the weight gradient deferred
    while `store` defers. Under torch.compile without a store it is traced (the same
    arithmetic from custom operators, no graph break; W quantized at each call); eager, and
    with a store, it runs as written (W's blocks once per step)."""
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"fp8_linear: x [..., K] = {list(x.shape)} and weight [N, K] = "
                         f"{list(weight.shape)} do not match: K must be x's last dimension")
    if torch.compiler.is_compiling() and store is None:
        return _Fp8LinearTraced.apply(x, weight, bias)
    return _fp8_linear_eager(x, weight, bias, store)
