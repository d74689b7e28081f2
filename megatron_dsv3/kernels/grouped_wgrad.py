"""The routed experts' weight gradients in fp32, summed inside one grouped GEMM.

With bf16 expert weights and fp32 gradient sums (train/master_weights.py), autograd computes
each micro-batch's dW_e = dY_e^T X_e as a bf16 grouped GEMM, and a second pass adds it into
the fp32 sum: per weight element 2 bytes written by the GEMM, then 2 + 4 read and 4 written.
Here one Triton grouped GEMM accumulates dY_e^T X_e in fp32 over expert e's rows and writes
the tile into the fp32 sum in its epilogue, adding to it or storing it.

The rows may come in several segments (the micro-batches of an optimizer step, each sorted by
expert, stacked: moe/expert_wgrad.py): expert e's gradient is then summed over its rows of
every segment in the GEMM's fp32 accumulator, and the sum written once per step instead of
once per micro-batch.

  grouped_wgrad_add_(grad_y_NO, x_NI, ends_E, sum_EOI)   # sum_EOI[e] += dY_e^T X_e
  grouped_wgrad_segments(grad_y_SNO, x_SNI, ends_SE, sum_EOI, accumulate=False)
      # sum_EOI[e] (+)= sum_s dY_{s,e}^T X_{s,e}; segment s: rows [0, ends_SE[s, -1]) of
      # grad_y_SNO[s], x_SNI[s]

`ends` are the int32 end offsets of each expert's rows within its segment (what
torch._grouped_mm takes as `offs`). `grouped_wgrad_add_` is a torch custom op that declares
its mutation of `sum_EOI`, so it runs inside torch.compile'd graphs and CUDA graphs; so is
`stash_segment_`, which copies a micro-batch's operands into segment `slot` of such buffers
(`slot` a device tensor: no host sync). The
Triton kernel runs on a GPU (bf16 operands, fp32 sum); `grouped_wgrad_reference` (fp32
matmuls per expert) elsewhere.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference path (CPU machines without Triton)
    triton = None

# Tiles of the weight gradient [O, I] per program, rows per iteration, and the launch settings:
# the fastest of benchmarks/bench_grad_accumulate.py's sweep on one H200 for the proxy preset's
# experts (O, I = 2816, 2048 and 2048, 1408; 8 micro-batches of ~400 rows per expert): 2.14 ms
# for fc2 where 128 x 128 x 64 with 8 warps and 3 stages took 3.04 (RESULTS.md 2026-12-03)
BLOCK_O, BLOCK_I, BLOCK_K, NUM_WARPS, NUM_STAGES = 128, 128, 32, 4, 4

if triton is not None:
    @triton.jit
    def _grouped_wgrad_kernel(grad_y_ptr, x_ptr, ends_ptr, sum_ptr, O, I, EXPERTS, SEGMENTS,
                              stride_gy_segment, stride_gy, stride_x_segment, stride_x,
                              ACCUMULATE: tl.constexpr, BLOCK_O: tl.constexpr,
                              BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_o, pid_i, expert = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
        offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
        acc = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
        row_count = tl.full((), 0, tl.int64)
        grad_y_seg, x_seg, ends = grad_y_ptr, x_ptr, ends_ptr  # segment 0's
        for _ in range(SEGMENTS):
            start = tl.load(ends + expert - 1, mask=expert > 0, other=0).to(tl.int64)
            end = tl.load(ends + expert).to(tl.int64)
            row_count += end - start
            for row0 in range(start, end, BLOCK_K):
                rows = row0 + tl.arange(0, BLOCK_K)
                in_rows = rows < end
                grad_y = tl.load(grad_y_seg + rows[:, None] * stride_gy + offs_o[None, :],
                                 mask=in_rows[:, None] & (offs_o[None, :] < O), other=0.0)
                x = tl.load(x_seg + rows[:, None] * stride_x + offs_i[None, :],
                            mask=in_rows[:, None] & (offs_i[None, :] < I), other=0.0)
                acc += tl.dot(tl.trans(grad_y), x)
            grad_y_seg += stride_gy_segment
            x_seg += stride_x_segment
            ends += EXPERTS
        offsets = (expert.to(tl.int64) * O * I + offs_o[:, None].to(tl.int64) * I
                   + offs_i[None, :])
        in_tile = (offs_o[:, None] < O) & (offs_i[None, :] < I)
        if ACCUMULATE:
            if row_count > 0:  # an expert without rows adds nothing: its sum is left untouched
                total = tl.load(sum_ptr + offsets, mask=in_tile) + acc
                tl.store(sum_ptr + offsets, total, mask=in_tile)
        else:
            tl.store(sum_ptr + offsets, acc, mask=in_tile)


def uses_kernel(grad_y: torch.Tensor, x: torch.Tensor, sum_EOI: torch.Tensor) -> bool:
    """Whether the Triton kernel runs: all on one GPU, bf16/fp16 operands of one dtype with
    contiguous rows, a contiguous fp32 sum."""
    return (triton is not None and grad_y.is_cuda and x.device == sum_EOI.device
            == grad_y.device and grad_y.dtype == x.dtype
            and grad_y.dtype in (torch.bfloat16, torch.float16)
            and sum_EOI.dtype == torch.float32 and sum_EOI.is_contiguous()
            and grad_y.stride(-1) == 1 and x.stride(-1) == 1)


def launch_grouped_wgrad(grad_y_SNO, x_SNI, ends_SE, sum_EOI, *, accumulate: bool = True,
                         block_o: int = BLOCK_O, block_i: int = BLOCK_I,
                         block_k: int = BLOCK_K, num_warps: int = NUM_WARPS,
                         num_stages: int = NUM_STAGES) -> None:
    """The kernel itself (any device Triton runs on, its interpreter included) over segments
    stacked along dim 0; the tile and launch settings are arguments for
    benchmarks/bench_grad_accumulate.py's sweep."""
    experts, out_features, in_features = sum_EOI.shape
    segments = grad_y_SNO.shape[0]
    if not experts or (accumulate and not segments):
        return
    grid = (triton.cdiv(out_features, block_o), triton.cdiv(in_features, block_i), experts)
    _grouped_wgrad_kernel[grid](grad_y_SNO, x_SNI, ends_SE, sum_EOI, out_features,
                                in_features, experts, segments, grad_y_SNO.stride(0),
                                grad_y_SNO.stride(1), x_SNI.stride(0), x_SNI.stride(1),
                                ACCUMULATE=accumulate, BLOCK_O=block_o, BLOCK_I=block_i,
                                BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages)


@torch.no_grad()
def grouped_wgrad_reference(grad_y_SNO, x_SNI, ends_SE, sum_EOI, *,
                            accumulate: bool = True) -> None:
    """sum_EOI[e] (+)= sum_s dY_{s,e}^T X_{s,e} in fp32 matmuls, expert by expert (one host
    sync)."""
    total = torch.zeros_like(sum_EOI)
    for grad_y_NO, x_NI, ends_E in zip(grad_y_SNO, x_SNI, ends_SE):
        start = 0
        for expert, end in enumerate(ends_E.tolist()):
            if end > start:
                total[expert] += grad_y_NO[start:end].float().t() @ x_NI[start:end].float()
            start = end
    if accumulate:
        sum_EOI += total
    else:
        sum_EOI.copy_(total)


def grouped_wgrad_segments(grad_y_SNO, x_SNI, ends_SE, sum_EOI, *,
                           accumulate: bool = True) -> None:
    """sum_EOI[e] (+)= sum_s dY_{s,e}^T X_{s,e} (module docstring): the Triton kernel on a GPU,
    the reference elsewhere."""
    run = launch_grouped_wgrad if uses_kernel(grad_y_SNO, x_SNI, sum_EOI) else \
        grouped_wgrad_reference
    run(grad_y_SNO, x_SNI, ends_SE, sum_EOI, accumulate=accumulate)


@torch.library.custom_op("megatron_dsv3::grouped_wgrad_add_", mutates_args=("sum_EOI",))
def grouped_wgrad_add_(grad_y_NO: torch.Tensor, x_NI: torch.Tensor, ends_E: torch.Tensor,
                       sum_EOI: torch.Tensor) -> None:
    """sum_EOI[e] += dY_e^T X_e for each expert e's rows (module docstring)."""
    grouped_wgrad_segments(grad_y_NO[None], x_NI[None], ends_E[None], sum_EOI)


@grouped_wgrad_add_.register_fake
def _(grad_y_NO, x_NI, ends_E, sum_EOI) -> None:
    return None


@torch.library.custom_op("megatron_dsv3::stash_segment_", mutates_args=("buffer_SNC",))
def stash_segment_(buffer_SNC: torch.Tensor, slot: torch.Tensor, rows_NC: torch.Tensor) -> None:
    """buffer_SNC[slot, :N] = rows_NC, with `slot` a one-element int64 tensor on the buffer's
    device (no host sync)."""
    buffer_SNC.narrow(1, 0, rows_NC.shape[0]).index_copy_(0, slot, rows_NC.unsqueeze(0))


@stash_segment_.register_fake
def _(buffer_SNC, slot, rows_NC) -> None:
    return None
