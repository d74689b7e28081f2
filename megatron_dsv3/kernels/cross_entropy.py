"""Cross-entropy over the whole vocabulary in two passes over the bf16 logits.

Megatron's vocab-parallel cross-entropy (tensor_parallel.vocab_parallel_cross_entropy) copies
the logits to fp32, then takes the max, subtracts it, exponentiates, sums and normalises in
place, and saves the fp32 softmax for the backward, which subtracts the one-hot target and
multiplies by the loss gradient: ~6.5 GB of memory traffic for the proxy preset's 4,096 x 32,768
logits, and a 0.5 GB fp32 tensor kept from forward to backward. Here, with the vocabulary on one
rank (no tensor parallelism):

  forward   one read of the logits per row (an online max and sum of exponentials): the loss
            lse - x[target] and the log-sum-exp, 4 bytes per row, kept for the backward;
  backward  one read of the logits and one write of their gradient,
            (exp(x - lse) - onehot(target)) * dloss, rounded once to the logits' dtype.

  loss_SB = cross_entropy(logits_SBV, target_SB)     # fp32, as Megatron's

The Triton kernels run on a GPU; `uses_kernel` says when. The arithmetic is fp32 throughout,
as Megatron's; the results differ from it only by the order of the fp32 sums.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU machines without Triton: the model uses Megatron's
    triton = None

BLOCK_V = 4096  # vocabulary columns per iteration

if triton is not None:
    @triton.jit
    def _cross_entropy_forward_kernel(logits_ptr, target_ptr, loss_ptr, lse_ptr, V, stride_row,
                                      BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * stride_row
        running_max = tl.full((), float("-inf"), tl.float32)
        running_sum = tl.full((), 0.0, tl.float32)
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            new_max = tl.maximum(running_max, tl.max(x, axis=0))
            running_sum = (running_sum * tl.exp(running_max - new_max)
                           + tl.sum(tl.exp(x - new_max), axis=0))
            running_max = new_max
        lse = running_max + tl.log(running_sum)
        target = tl.load(target_ptr + row).to(tl.int64)
        tl.store(loss_ptr + row, lse - tl.load(base + target).to(tl.float32))
        tl.store(lse_ptr + row, lse)

    @triton.jit
    def _cross_entropy_backward_kernel(logits_ptr, target_ptr, lse_ptr, grad_loss_ptr, grad_ptr,
                                       V, stride_row, stride_grad_loss, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * stride_row
        lse = tl.load(lse_ptr + row)
        scale = tl.load(grad_loss_ptr + row * stride_grad_loss).to(tl.float32)
        target = tl.load(target_ptr + row).to(tl.int64)
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            in_row = cols < V
            x = tl.load(base + cols, mask=in_row, other=0.0).to(tl.float32)
            p = tl.exp(x - lse) - tl.where(cols == target, 1.0, 0.0)
            tl.store(grad_ptr + row * V + cols, (p * scale).to(grad_ptr.dtype.element_ty),
                     mask=in_row)


def uses_kernel(logits: torch.Tensor) -> bool:
    """Whether the Triton kernels run: logits on a GPU in bf16/fp16/fp32 with contiguous
    rows."""
    return (triton is not None and logits.is_cuda and logits.stride(-1) == 1
            and logits.dtype in (torch.bfloat16, torch.float16, torch.float32))


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_NV: torch.Tensor, target_N: torch.Tensor) -> torch.Tensor:
        rows, vocab = logits_NV.shape
        target_N = target_N.contiguous()
        loss = torch.empty(rows, dtype=torch.float32, device=logits_NV.device)
        lse = torch.empty_like(loss)
        if rows:
            _cross_entropy_forward_kernel[(rows,)](logits_NV, target_N, loss, lse, vocab,
                                                   logits_NV.stride(0), BLOCK=BLOCK_V,
                                                   num_warps=8)
        ctx.save_for_backward(logits_NV, target_N, lse)
        return loss

    @staticmethod
    def backward(ctx, grad_loss_N: torch.Tensor):
        logits_NV, target_N, lse = ctx.saved_tensors
        rows, vocab = logits_NV.shape
        grad = torch.empty(rows, vocab, dtype=logits_NV.dtype, device=logits_NV.device)
        if rows:
            _cross_entropy_backward_kernel[(rows,)](logits_NV, target_N, lse, grad_loss_N, grad,
                                                    vocab, logits_NV.stride(0),
                                                    grad_loss_N.stride(0), BLOCK=BLOCK_V,
                                                    num_warps=8)
        return grad, None


def cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-position cross-entropy (fp32, shaped like `target`) of logits [..., V] with the
    whole vocabulary on this rank; the Triton kernels (`uses_kernel(logits)` must hold)."""
    vocab = logits.shape[-1]
    return _CrossEntropy.apply(logits.reshape(-1, vocab), target.reshape(-1)).view(target.shape)
