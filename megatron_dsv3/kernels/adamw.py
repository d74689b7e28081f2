"""AdamW on an fp32 master tensor that also writes its bf16 copy and zeroes its gradient, in one
pass over memory.

With bf16 parameters and fp32 masters (train/master_weights.py) the end of a step is, per
tensor: AdamW on the master (read the gradient, the master and both moments, write the master
and both moments), then the master rounded into the model's bf16 parameter (read the master
again, write bf16), then the gradient sum zeroed (write it again). Fused, the master and the
gradient are read once: 34 bytes per element instead of 46. The arithmetic is that of torch's
fused AdamW (decoupled weight decay; the gradient divided by an optional device scalar
`grad_scale`, as torch's fused kernels do for AMP, which gradient clipping uses to scale inside
the step):

    p    <- p * (1 - lr * weight_decay)
    g    <- g / grad_scale
    m    <- beta1 * m + (1 - beta1) * g
    v    <- beta2 * v + (1 - beta2) * g * g
    p    <- p - (lr / bias_correction1) * m / (sqrt(v) / sqrt(bias_correction2) + eps)
    out  <- bf16(p) (if given);  g_sum <- 0   (unless zero_grad=False: the next step's first gradient
                                   overwrites the sum instead, train/master_weights.py)

The moments may be kept in bf16, as DeepSeek-V3 does ("the BF16 data format instead of FP32 to
track the first and second moments in the AdamW optimizer"): they are widened to fp32 for the
arithmetic and rounded to nearest even when stored, which saves 8 of the 34 bytes per element
(and 4 bytes of memory per parameter per moment).

`adamw_reference` is the same in PyTorch operations (the CPU path and the tests' reference).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference path (CPU machines without Triton)
    triton = None

_BLOCK = 2048

if triton is not None:
    @triton.jit
    def _bf16_rne(x):
        """fp32 -> bf16, the upper half of the bits rounded to nearest even (PyTorch's cast;
        written out so that Triton's interpreter, which truncates, rounds the same way)."""
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)

    @triton.jit
    def _adamw_kernel(param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, out_ptr, scale_ptr, n,
                      decay, beta1, beta2, step_size, bias_correction2_sqrt, eps,
                      HAS_SCALE: tl.constexpr, BF16_MOMENTS: tl.constexpr, ZERO_GRAD: tl.constexpr,
                      HAS_OUT: tl.constexpr, BLOCK: tl.constexpr):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        param = tl.load(param_ptr + offsets, mask=mask) * decay
        grad = tl.load(grad_ptr + offsets, mask=mask)
        if HAS_SCALE:  # IEEE-rounded division and square root, as PyTorch's
            grad = tl.div_rn(grad, tl.load(scale_ptr))
        exp_avg = (beta1 * tl.load(exp_avg_ptr + offsets, mask=mask).to(tl.float32)
                   + (1 - beta1) * grad)
        exp_avg_sq = (beta2 * tl.load(exp_avg_sq_ptr + offsets, mask=mask).to(tl.float32)
                      + (1 - beta2) * grad * grad)
        if BF16_MOMENTS:  # the update uses the moments as stored
            exp_avg = _bf16_rne(exp_avg)
            exp_avg_sq = _bf16_rne(exp_avg_sq)
        tl.store(exp_avg_ptr + offsets, exp_avg, mask=mask)
        tl.store(exp_avg_sq_ptr + offsets, exp_avg_sq, mask=mask)
        exp_avg = exp_avg.to(tl.float32)
        exp_avg_sq = exp_avg_sq.to(tl.float32)
        denom = tl.div_rn(tl.sqrt_rn(exp_avg_sq), bias_correction2_sqrt) + eps
        param = param - step_size * tl.div_rn(exp_avg, denom)
        tl.store(param_ptr + offsets, param, mask=mask)
        if HAS_OUT:
            tl.store(out_ptr + offsets, _bf16_rne(param), mask=mask)
        if ZERO_GRAD:
            tl.store(grad_ptr + offsets, tl.zeros_like(grad), mask=mask)


def _coefficients(step: int, lr: float, beta1: float, beta2: float,
                  weight_decay: float) -> tuple[float, float, float]:
    """(decay factor, step size, sqrt of the second bias correction) of 1-based `step`."""
    return (1.0 - lr * weight_decay, lr / (1.0 - beta1 ** step),
            math.sqrt(1.0 - beta2 ** step))


def uses_kernel(tensors: list[torch.Tensor]) -> bool:
    """Whether `adamw_` runs the Triton kernel for (param, grad, exp_avg, exp_avg_sq, out):
    every tensor contiguous on one GPU, param and grad fp32, the moments both fp32 or both
    bf16, `out` bf16 or None."""
    param, grad, exp_avg, exp_avg_sq, out = tensors
    present = [t for t in tensors if t is not None]
    return (triton is not None and all(t.is_cuda and t.is_contiguous() for t in present)
            and len({t.device for t in present}) == 1
            and param.dtype == grad.dtype == torch.float32
            and exp_avg.dtype == exp_avg_sq.dtype in (torch.float32, torch.bfloat16)
            and (out is None or out.dtype == torch.bfloat16))


def launch_adamw(param, grad, exp_avg, exp_avg_sq, out, *, step: int, lr: float,
                 beta1: float, beta2: float, eps: float, weight_decay: float,
                 grad_scale: Optional[torch.Tensor] = None, zero_grad: bool = True) -> None:
    """The kernel itself (any device Triton runs on, its interpreter included)."""
    n = param.numel()
    if not n:
        return
    decay, step_size, bias2_sqrt = _coefficients(step, lr, beta1, beta2, weight_decay)
    _adamw_kernel[(triton.cdiv(n, _BLOCK),)](
        param, grad, exp_avg, exp_avg_sq, out if out is not None else param,
        grad_scale if grad_scale is not None else param,
        n, decay, beta1, beta2, step_size, bias2_sqrt, eps, HAS_SCALE=grad_scale is not None,
        BF16_MOMENTS=exp_avg.dtype == torch.bfloat16, ZERO_GRAD=zero_grad,
        HAS_OUT=out is not None, BLOCK=_BLOCK, num_warps=8)


@torch.no_grad()
def adamw_reference(param, grad, exp_avg, exp_avg_sq, out, *, step: int, lr: float,
                    beta1: float, beta2: float, eps: float, weight_decay: float,
                    grad_scale: Optional[torch.Tensor] = None, zero_grad: bool = True) -> None:
    """The module docstring's update in PyTorch operations."""
    decay, step_size, bias2_sqrt = _coefficients(step, lr, beta1, beta2, weight_decay)
    if grad_scale is not None:
        grad.div_(grad_scale)
    param.mul_(decay)
    # in fp32 whatever the moments' dtype, then stored (rounded) and used as stored
    exp_avg.copy_(exp_avg.float().mul_(beta1).add_(grad, alpha=1 - beta1))
    exp_avg_sq.copy_(exp_avg_sq.float().mul_(beta2).addcmul_(grad, grad, value=1 - beta2))
    param.addcdiv_(exp_avg.float(), exp_avg_sq.float().sqrt().div_(bias2_sqrt).add_(eps),
                   value=-step_size)
    if out is not None:
        out.copy_(param)
    if zero_grad:
        grad.zero_()


def adamw_(param, grad, exp_avg, exp_avg_sq, out, **hyper) -> None:
    """One AdamW step of `param` (fp32, in place) with its moments (fp32 or bf16), its
    rounding written into `out` (unless None) and `grad` zeroed; `hyper`: step (1-based), lr, beta1, beta2,
    eps, weight_decay, grad_scale, zero_grad (False: `grad` is left as it is, divided by
    grad_scale or not). The kernel on a GPU, the reference elsewhere."""
    tensors = [param, grad, exp_avg, exp_avg_sq, out]
    (launch_adamw if uses_kernel(tensors) else adamw_reference)(*tensors, **hyper)
