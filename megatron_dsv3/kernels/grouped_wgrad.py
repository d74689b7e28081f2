"""The routed experts' weight gradients added into fp32 sums inside the grouped GEMM.

With bf16 expert weights and fp32 gradient sums (train/master_weights.py), autograd computes
each micro-batch's dW_e = dY_e^T X_e as a bf16 grouped GEMM, and a second pass adds it into
the fp32 sum: per weight element 2 bytes written by the GEMM, then 2 + 4 read and 4 written.
Here one Triton grouped GEMM accumulates dY_e^T X_e in fp32 over expert e's rows and adds the
tile into the fp32 sum in its epilogue: 4 bytes read and 4 written per element, one kernel,
and no bf16 rounding of the micro-batch's gradient before the sum.

  grouped_wgrad_add_(grad_y_NO, x_NI, ends_E, sum_EOI)   # sum_EOI[e] += dY_e^T X_e

Rows are sorted by expert; `ends_E` are the int32 end offsets of each expert's rows (what
torch._grouped_mm takes as `offs`). It is a torch custom op that declares its mutation of
`sum_EOI`, so it runs inside torch.compile'd graphs and CUDA graphs. The Triton kernel runs
on a GPU (bf16 operands, fp32 sum); `grouped_wgrad_reference` (fp32 matmuls per expert)
elsewhere.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference path (CPU machines without Triton)
    triton = None

# Tiles of the weight gradient [O, I] per program, rows per iteration. Sized for an H200 on the
# proxy preset's experts (O, I = 2816, 2048 and 2048, 1408; ~400 rows per expert).
BLOCK_O, BLOCK_I, BLOCK_K = 128, 128, 64

if triton is not None:
    @triton.jit
    def _grouped_wgrad_add_kernel(grad_y_ptr, x_ptr, ends_ptr, sum_ptr, O, I, stride_gy,
                                  stride_x, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr,
                                  BLOCK_K: tl.constexpr):
        pid_o, pid_i, expert = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        start = tl.load(ends_ptr + expert - 1, mask=expert > 0, other=0).to(tl.int64)
        end = tl.load(ends_ptr + expert).to(tl.int64)
        offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
        offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
        acc = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
        for row0 in range(start, end, BLOCK_K):
            rows = row0 + tl.arange(0, BLOCK_K)
            in_rows = rows < end
            grad_y = tl.load(grad_y_ptr + rows[:, None] * stride_gy + offs_o[None, :],
                             mask=in_rows[:, None] & (offs_o[None, :] < O), other=0.0)
            x = tl.load(x_ptr + rows[:, None] * stride_x + offs_i[None, :],
                        mask=in_rows[:, None] & (offs_i[None, :] < I), other=0.0)
            acc += tl.dot(tl.trans(grad_y), x)
        if end > start:  # an expert without rows adds nothing: its sum is left untouched
            offsets = (expert.to(tl.int64) * O * I + offs_o[:, None].to(tl.int64) * I
                       + offs_i[None, :])
            in_tile = (offs_o[:, None] < O) & (offs_i[None, :] < I)
            total = tl.load(sum_ptr + offsets, mask=in_tile) + acc
            tl.store(sum_ptr + offsets, total, mask=in_tile)


def uses_kernel(grad_y_NO: torch.Tensor, x_NI: torch.Tensor, sum_EOI: torch.Tensor) -> bool:
    """Whether the Triton kernel runs: all on one GPU, bf16/fp16 operands of one dtype with
    contiguous rows, a contiguous fp32 sum."""
    return (triton is not None and grad_y_NO.is_cuda and x_NI.device == sum_EOI.device
            == grad_y_NO.device and grad_y_NO.dtype == x_NI.dtype
            and grad_y_NO.dtype in (torch.bfloat16, torch.float16)
            and sum_EOI.dtype == torch.float32 and sum_EOI.is_contiguous()
            and grad_y_NO.stride(-1) == 1 and x_NI.stride(-1) == 1)


def launch_grouped_wgrad_add(grad_y_NO, x_NI, ends_E, sum_EOI, *, block_o: int = BLOCK_O,
                             block_i: int = BLOCK_I, block_k: int = BLOCK_K,
                             num_warps: int = 8, num_stages: int = 3) -> None:
    """The kernel itself (any device Triton runs on, its interpreter included); the tile and
    launch settings are arguments for benchmarks/bench_grad_accumulate.py's sweep."""
    experts, out_features, in_features = sum_EOI.shape
    if not experts or not grad_y_NO.shape[0]:
        return
    grid = (triton.cdiv(out_features, block_o), triton.cdiv(in_features, block_i), experts)
    _grouped_wgrad_add_kernel[grid](grad_y_NO, x_NI, ends_E, sum_EOI, out_features,
                                    in_features, grad_y_NO.stride(0), x_NI.stride(0),
                                    BLOCK_O=block_o, BLOCK_I=block_i, BLOCK_K=block_k,
                                    num_warps=num_warps, num_stages=num_stages)


@torch.no_grad()
def grouped_wgrad_reference(grad_y_NO, x_NI, ends_E, sum_EOI) -> None:
    """sum_EOI[e] += dY_e^T X_e in fp32 matmuls, expert by expert (one host sync)."""
    start = 0
    for expert, end in enumerate(ends_E.tolist()):
        if end > start:
            sum_EOI[expert] += grad_y_NO[start:end].float().t() @ x_NI[start:end].float()
        start = end


@torch.library.custom_op("megatron_dsv3::grouped_wgrad_add_", mutates_args=("sum_EOI",))
def grouped_wgrad_add_(grad_y_NO: torch.Tensor, x_NI: torch.Tensor, ends_E: torch.Tensor,
                       sum_EOI: torch.Tensor) -> None:
    """sum_EOI[e] += dY_e^T X_e for each expert e's rows (module docstring)."""
    if uses_kernel(grad_y_NO, x_NI, sum_EOI):
        launch_grouped_wgrad_add(grad_y_NO, x_NI, ends_E, sum_EOI)
    else:
        grouped_wgrad_reference(grad_y_NO, x_NI, ends_E, sum_EOI)


@grouped_wgrad_add_.register_fake
def _(grad_y_NO, x_NI, ends_E, sum_EOI) -> None:
    return None
