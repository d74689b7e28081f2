"""A bf16 (or fp16) gradient added into an fp32 buffer in one pass at memory speed.

The job keeps its gradient sums in fp32 while the GEMMs produce bf16 gradients, so every
micro-batch adds each parameter's gradient into its fp32 sum. PyTorch's `add_` with two dtypes
runs its unvectorised elementwise kernel: on one H200 the proxy preset's 8 micro-batches spent
145 ms of a 706 ms step there (benchmarks/RESULTS.md). The kernel here reads 2 + 4 bytes and
writes 4 per element with wide loads; the arithmetic is PyTorch's (the gradient widened to
fp32, one fp32 addition), so the result is bit-identical to `fp32_sum.add_(grad)`.

  add_into_fp32_(fp32_sum, grad)              # fp32_sum += grad
  add_into_fp32_(fp32_sum, grad, store=True)  # fp32_sum = grad (a step's first: 2 + 4 bytes)
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference path (CPU machines without Triton)
    triton = None

_BLOCK = 4096
_NARROW = (torch.bfloat16, torch.float16)
# Below this many elements PyTorch's add_ takes over: its GPU time (under ~25 us on an H200)
# is then shorter than a Triton launch's host time, which the step would pay for each of the
# model's ~100 small parameters per micro-batch.
MIN_KERNEL_ELEMENTS = 1 << 23

if triton is not None:
    @triton.jit
    def _add_into_kernel(sum_ptr, grad_ptr, n, STORE: tl.constexpr, BLOCK: tl.constexpr):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        total = tl.load(grad_ptr + offsets, mask=mask).to(tl.float32)
        if not STORE:
            total = tl.load(sum_ptr + offsets, mask=mask) + total
        tl.store(sum_ptr + offsets, total, mask=mask)


def uses_kernel(fp32_sum: torch.Tensor, grad: torch.Tensor) -> bool:
    """Whether `add_into_fp32_` runs the Triton kernel for these tensors (else PyTorch's
    add_): both contiguous on one GPU, of one shape and at least MIN_KERNEL_ELEMENTS, the sum
    fp32 and the gradient bf16/fp16."""
    return (triton is not None and fp32_sum.is_cuda and fp32_sum.device == grad.device
            and fp32_sum.numel() >= MIN_KERNEL_ELEMENTS
            and fp32_sum.dtype == torch.float32 and grad.dtype in _NARROW
            and fp32_sum.shape == grad.shape and fp32_sum.is_contiguous()
            and grad.is_contiguous())


def launch_add_into(fp32_sum: torch.Tensor, grad: torch.Tensor, store: bool = False) -> None:
    """The kernel itself (any device Triton runs on, its interpreter included)."""
    n = fp32_sum.numel()
    if n:
        _add_into_kernel[(triton.cdiv(n, _BLOCK),)](fp32_sum, grad, n, STORE=store,
                                                    BLOCK=_BLOCK, num_warps=8)


def add_into_fp32_(fp32_sum: torch.Tensor, grad: torch.Tensor, *, store: bool = False
                   ) -> torch.Tensor:
    """fp32_sum += grad in place (`store`: fp32_sum = grad, widened exactly); returns
    fp32_sum."""
    if uses_kernel(fp32_sum, grad):
        launch_add_into(fp32_sum, grad, store)
    elif store:
        fp32_sum.copy_(grad)
    else:
        fp32_sum.add_(grad)
    return fp32_sum
