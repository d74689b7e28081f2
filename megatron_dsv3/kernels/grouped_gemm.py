"""The routed experts' bf16 grouped GEMM as a Triton kernel: out [M, N] = rows of expert e of
a [M, K] times B_e (b [E, K, N], any strides), fp32 accumulation, out in a's dtype. The same
product as torch._grouped_mm(a, b, offs=group_ends) (what moe/experts.py's grouped_mm runs,
cutlass on Hopper): the BF16 counterpart of kernels/fp8_grouped_gemm.py, with its tile
schedule and launch-config mechanism, so that the two can be compared and tuned alike
(benchmarks/bench_grouped_gemm.py).

  launch_grouped_gemm(a_MK, b_EKN, group_ends)   the kernel, wherever Triton runs (interpreter
                                                 too); `config` overrides LAUNCH_CONFIG
  grouped_gemm_reference(a_MK, b_EKN, group_ends)  torch matmuls expert by expert (fp32
                                                 products, one host sync): the definition
  grouped_gemm(a_MK, b_EKN, group_ends)          the kernel on a GPU (bf16 / fp16 operands),
                                                 the reference elsewhere
  torch.ops.megatron_dsv3.grouped_gemm(a, w, group_ends, transpose_w)
        a custom operator (traced by torch.compile, with autograd): rows of expert e times
        W_e^T (transpose_w: the forward, W [E, N, K] as the experts keep it) or times W_e
        (the input gradient dX_e = dY_e W_e); W is passed as it is stored and read through
        its strides, never transposed in memory
  grouped_linear(x_NI, w_EOI, group_ends)        y = x_e W_e^T through that operator

The operator's backward: dA by the same kernel with W the other way round, dW by
torch._grouped_mm (dW_e = dY_e^T X_e, as autograd's weight gradient of the grouped_mm experts),
so only the forward and input-gradient GEMMs change; moe/experts.py's experts_impl='triton'
uses it. torch._grouped_mm takes bf16 / fp16 with 16-byte rows on a GPU and when traced (fp32
only in eager CPU code), which the weight gradient inherits.

Tiles (kernels/fp8_grouped_gemm.py's docstring says more): programs over (M slots, N tiles),
N fastest, so that the programs running together share an expert's weight in L2. SCHEDULE
"experts" (the default): slot t is tile j of the expert whose tiles hold it, each expert's rows
cut into ceil(n_e / BLOCK_M) tiles from its first row (fp8_grouped_gemm's _expert_tiles /
_pick, on the device from the ends: no host sync); the slots after them store the zero rows
past the last end. SCHEDULE "rows": M tiles over all rows, a tile across an expert boundary
running the K loop once per expert it touches. Loads along M are unmasked (rows clamped to
M - 1; rows outside the tile's expert are computed and not stored), along K masked only where
BLOCK_K does not divide K, along N only where BLOCK_N does not divide N. Empty experts own no
tile; rows past the last end are stored as zeros.

The interpreter computes a bf16 tl.dot wrongly (numpy has no bf16): tests run fp16 operands
through the same code there, bf16 on a GPU (tests/test_grouped_gemm.py, test_gpu_grouped_gemm.py).
"""

from __future__ import annotations

import torch

from megatron_dsv3.kernels.fp8_quantize import merged_launch_config

try:
    import triton
    import triton.language as tl

    from megatron_dsv3.kernels.fp8_grouped_gemm import _expert_tiles, _pick
except ImportError:  # the reference path (CPU machines without Triton)
    triton = None

# Launch parameters: BLOCK_M rows x BLOCK_N output columns per program, BLOCK_K of the
# contraction per iteration; num_warps / num_stages as Triton takes them; SCHEDULE how M tiles
# are laid (module docstring). Unmeasured: the FP8 kernel's fastest tile (64 x 128, 4 warps,
# experts; its K step of 128 one-byte elements is BLOCK_K 64 in bf16, 128 bytes a row), one
# stage more than its 3 (a stage is 24 KiB here). benchmarks/bench_grouped_gemm.py --tune
# sweeps the candidates. `config` of launch_grouped_gemm overrides them (keys as here).
LAUNCH_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 4,
                 "num_stages": 4, "SCHEDULE": "experts"}
SCHEDULES = ("rows", "experts")  # M tiles over all rows / over each expert's rows
KERNEL_DTYPES = (torch.bfloat16, torch.float16)


def launch_config(config: dict | None) -> dict:
    """LAUNCH_CONFIG updated with `config` (fp8_quantize.merged_launch_config)."""
    return merged_launch_config(LAUNCH_CONFIG, config, "the grouped bf16 GEMM")


if triton is not None:

    @triton.jit
    def _rows_times_b(a_ptr, b_ptr, out_tile, e, store_rows, rows, cols, in_n, M, K,
                      stride_am, stride_ak, stride_be, stride_bk, stride_bn,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      EVEN_K: tl.constexpr, EVEN_N: tl.constexpr):
        """This tile's rows of a times B_e (the K loop, fp32 accumulator), stored where
        `store_rows` (expert e's rows) and the columns are in range. Rows are loaded clamped
        to M - 1, unmasked: a row not expert e's is computed and dropped."""
        ks = tl.arange(0, BLOCK_K)
        a_tile = (a_ptr + tl.minimum(rows, M - 1)[:, None] * stride_am
                  + ks[None, :] * stride_ak)
        b_tile = (b_ptr + tl.cast(e, tl.int64) * stride_be + ks[:, None] * stride_bk
                  + cols[None, :] * stride_bn)
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if EVEN_K:
                a = tl.load(a_tile)
                if EVEN_N:
                    b = tl.load(b_tile)
                else:
                    b = tl.load(b_tile, mask=in_n[None, :], other=0.0)
            else:
                in_k = ks < K - k0
                a = tl.load(a_tile, mask=in_k[None, :], other=0.0)
                b = tl.load(b_tile, mask=in_k[:, None] & in_n[None, :], other=0.0)
            acc = tl.dot(a, b, acc)
            a_tile += BLOCK_K * stride_ak
            b_tile += BLOCK_K * stride_bk
        tl.store(out_tile, acc.to(out_tile.dtype.element_ty),
                 mask=store_rows[:, None] & in_n[None, :])

    @triton.jit
    def _grouped_gemm_kernel(
            a_ptr, b_ptr, ends_ptr, out_ptr,             # pointers
            M, N, K, E,                                  # sizes
            stride_am, stride_ak,                        # a [M, K]
            stride_be, stride_bk, stride_bn,             # b [E, K, N]
            stride_om, stride_on,                        # out [M, N]
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
            E_POW2: tl.constexpr, PER_EXPERT: tl.constexpr, EVEN_K: tl.constexpr,
            EVEN_N: tl.constexpr):
        pid = tl.program_id(0)
        n_tiles = tl.cdiv(N, BLOCK_N)
        slot, tile_n = pid // n_tiles, pid % n_tiles  # N fastest: one expert's tiles together
        cols = (tile_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        in_n = cols < N
        total = tl.load(ends_ptr + E - 1)
        zeros = tl.zeros((BLOCK_M, BLOCK_N), tl.float32).to(out_ptr.dtype.element_ty)
        if PER_EXPERT:
            experts, starts, ends, first_tiles, tile_ends = _expert_tiles(ends_ptr, E, E_POW2,
                                                                          BLOCK_M)
            e = tl.sum(((tile_ends <= slot) & (experts < E)).to(tl.int32))
            if e < E:
                rows = (_pick(starts, experts, e) + (slot - _pick(first_tiles, experts, e))
                        * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
                _rows_times_b(a_ptr, b_ptr,
                              out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on,
                              e, rows < _pick(ends, experts, e), rows, cols, in_n, M, K,
                              stride_am, stride_ak, stride_be, stride_bk, stride_bn,
                              BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, EVEN_N)
            else:  # the slots after the experts' tiles: the rows past the last end, zeros
                rows = (total + (slot - tl.max(tile_ends)) * BLOCK_M
                        + tl.arange(0, BLOCK_M)).to(tl.int64)
                tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on,
                         zeros, mask=(rows < M)[:, None] & in_n[None, :])
        else:
            experts = tl.arange(0, E_POW2)
            counted = experts < E
            ends = tl.load(ends_ptr + experts, mask=counted, other=0)
            first_row = slot * BLOCK_M
            last_row = tl.minimum(first_row + BLOCK_M, M) - 1
            rows = (first_row + tl.arange(0, BLOCK_M)).to(tl.int64)
            # expert e owns the rows r with ends[e-1] <= r < ends[e]: the expert of row r is
            # the number of ends at or before r
            first_expert = tl.sum(((ends <= first_row) & counted).to(tl.int32))
            last_expert = tl.minimum(tl.sum(((ends <= last_row) & counted).to(tl.int32)),
                                     E - 1)
            out_tile = out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on
            unowned = (rows >= total) & (rows < M)  # rows past the last end: zeros
            tl.store(out_tile, zeros, mask=unowned[:, None] & in_n[None, :])
            for e in range(first_expert, last_expert + 1):
                start = tl.load(ends_ptr + tl.maximum(e - 1, 0))
                start = tl.where(e > 0, start, 0)
                end = tl.load(ends_ptr + e)
                if end > start:  # an empty expert owns no row
                    _rows_times_b(a_ptr, b_ptr, out_tile, e,
                                  (rows >= start) & (rows < end) & (rows < M), rows, cols,
                                  in_n, M, K, stride_am, stride_ak, stride_be, stride_bk,
                                  stride_bn, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, EVEN_N)


def check_operands(a_MK: torch.Tensor, b_EKN: torch.Tensor, group_ends: torch.Tensor,
                   caller: str = "grouped_gemm") -> None:
    """Shapes and dtypes (no host sync: group_ends' values are the reference's to check)."""
    if not (isinstance(a_MK, torch.Tensor) and a_MK.dim() == 2):
        raise ValueError(f"{caller}: a must be a 2-D tensor [M, K] (the experts' rows, sorted "
                         f"by expert); got {getattr(a_MK, 'shape', type(a_MK))}")
    if not (isinstance(b_EKN, torch.Tensor) and b_EKN.dim() == 3):
        raise ValueError(f"{caller}: b must be a 3-D tensor [E, K, N] (W.transpose(-2, -1) "
                         f"for y = x W_e^T); got {getattr(b_EKN, 'shape', type(b_EKN))}")
    if a_MK.shape[1] != b_EKN.shape[1]:
        raise ValueError(f"{caller}: a [M, K] = {tuple(a_MK.shape)} and b [E, K, N] = "
                         f"{tuple(b_EKN.shape)}: their K differ")
    if a_MK.dtype != b_EKN.dtype:
        raise ValueError(f"{caller}: a is {a_MK.dtype} and b {b_EKN.dtype}; cast one (autocast "
                         f"casts both for the experts)")
    if not (isinstance(group_ends, torch.Tensor) and group_ends.dim() == 1
            and group_ends.dtype == torch.int32):
        raise ValueError(f"{caller}: group_ends must be a 1-D int32 tensor of each expert's "
                         f"end row (torch._grouped_mm's offs)")
    if group_ends.shape[0] != b_EKN.shape[0]:
        raise ValueError(f"{caller}: group_ends has {group_ends.shape[0]} entries and b has "
                         f"{b_EKN.shape[0]} experts; give one end per expert")


def launch_grouped_gemm(a_MK: torch.Tensor, b_EKN: torch.Tensor, group_ends: torch.Tensor, *,
                        config: dict | None = None) -> torch.Tensor:
    """The kernel itself (module docstring), on any device Triton runs on (its interpreter
    included); `config` overrides LAUNCH_CONFIG. group_ends is read on the device only: its
    values are not checked (grouped_gemm_reference checks them, with a host sync)."""
    check_operands(a_MK, b_EKN, group_ends, "launch_grouped_gemm")
    M, K = a_MK.shape
    E, _, N = b_EKN.shape
    launch = launch_config(config)
    schedule = launch.pop("SCHEDULE")
    if schedule not in SCHEDULES:
        raise ValueError(f"launch config of the grouped bf16 GEMM: SCHEDULE={schedule!r}; use "
                         f"one of {SCHEDULES}")
    out_MN = torch.empty(M, N, dtype=a_MK.dtype, device=a_MK.device)
    if M and N and E:
        block_m, block_n, block_k = (launch.pop(key) for key in ("BLOCK_M", "BLOCK_N",
                                                                 "BLOCK_K"))
        # "experts": at most ceil(M / BLOCK_M) + E tiles of the experts' rows and of the rows
        # past the last end together (each expert's last tile may be partial)
        m_slots = triton.cdiv(M, block_m) + (E if schedule == "experts" else 0)
        grid = (m_slots * triton.cdiv(N, block_n),)
        _grouped_gemm_kernel[grid](
            a_MK, b_EKN, group_ends, out_MN, M, N, K, E,
            *a_MK.stride(), *b_EKN.stride(), *out_MN.stride(),
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
            E_POW2=triton.next_power_of_2(E), PER_EXPERT=schedule == "experts",
            EVEN_K=K % block_k == 0, EVEN_N=N % block_n == 0, **launch)
    elif M and N:  # no expert: every row is past the last end
        out_MN.zero_()
    return out_MN


def grouped_gemm_reference(a_MK: torch.Tensor, b_EKN: torch.Tensor,
                           group_ends: torch.Tensor) -> torch.Tensor:
    """Rows of expert e of a times b_EKN[e] in fp32 matmuls, expert by expert, rounded to a's
    dtype; zeros past the last end. Reads group_ends on the host (one sync) and checks them."""
    check_operands(a_MK, b_EKN, group_ends, "grouped_gemm_reference")
    ends = group_ends.tolist()
    if any(later < earlier for earlier, later in zip([0] + ends, ends)) or \
            (ends and ends[-1] > a_MK.shape[0]):
        raise ValueError(f"grouped_gemm_reference: group_ends={ends} must be non-decreasing, "
                         f"from 0 to at most M={a_MK.shape[0]}")
    out = torch.zeros(a_MK.shape[0], b_EKN.shape[2], dtype=torch.float32, device=a_MK.device)
    start = 0
    for e, end in enumerate(ends):
        if end > start:
            out[start:end] = a_MK[start:end].float() @ b_EKN[e].float()
        start = end
    return out.to(a_MK.dtype)


def uses_kernel(a_MK: torch.Tensor, b_EKN: torch.Tensor) -> bool:
    """Whether grouped_gemm runs the kernel: Triton present, both operands on one GPU, bf16 or
    fp16."""
    return (triton is not None and a_MK.is_cuda and b_EKN.device == a_MK.device
            and a_MK.dtype in KERNEL_DTYPES)


def grouped_gemm(a_MK: torch.Tensor, b_EKN: torch.Tensor,
                 group_ends: torch.Tensor) -> torch.Tensor:
    """out [M, N]: expert e's rows of a times b_EKN[e] (torch._grouped_mm(a, b, offs=
    group_ends)'s product): the kernel where it runs (`uses_kernel`; no host sync), else the
    reference (which reads group_ends on the host)."""
    check_operands(a_MK, b_EKN, group_ends)
    if uses_kernel(a_MK, b_EKN):
        return launch_grouped_gemm(a_MK, b_EKN, group_ends)
    return grouped_gemm_reference(a_MK, b_EKN, group_ends)


def _as_b(w: torch.Tensor, transpose_w: bool) -> torch.Tensor:
    """The [E, K, N] operand from a weight as stored: W_e^T (a view) or W_e."""
    return w.transpose(-2, -1) if transpose_w else w


def grouped_gemm_body(a: torch.Tensor, w: torch.Tensor, group_ends: torch.Tensor,
                      transpose_w: bool) -> torch.Tensor:
    """The operator's body, callable without the dispatcher (eager code inside an autograd
    function: its round trip costs host time per call)."""
    return grouped_gemm(a, _as_b(w, transpose_w), group_ends)


@torch.library.custom_op("megatron_dsv3::grouped_gemm", mutates_args=())
def grouped_gemm_op(a: torch.Tensor, w: torch.Tensor, group_ends: torch.Tensor,
                    transpose_w: bool) -> torch.Tensor:
    """Rows of expert e of a times W_e^T (transpose_w) or W_e (module docstring)."""
    return grouped_gemm_body(a, w, group_ends, transpose_w)


@grouped_gemm_op.register_fake
def _(a, w, group_ends, transpose_w) -> torch.Tensor:
    check_operands(a, _as_b(w, transpose_w), group_ends)
    return a.new_empty(a.shape[0], w.shape[1] if transpose_w else w.shape[2])


def _setup_context(ctx, inputs, output) -> None:
    a, w, group_ends, transpose_w = inputs
    ctx.save_for_backward(a, w, group_ends)
    ctx.transpose_w = transpose_w


def _backward(ctx, grad_out):
    """dA_e = dOut_e B_e^T by the kernel (W the other way round); dW by torch._grouped_mm:
    dW_e = dOut_e^T A_e [E, N, K] for the forward (transpose_w), A_e^T dOut_e [E, K, N] for
    the input-gradient form. dOut made contiguous: torch._grouped_mm refuses some strides (an
    expanded gradient's zeros), and the kernel's loads want unit stride along its rows."""
    a, w, group_ends = ctx.saved_tensors
    grad_out = grad_out.contiguous()
    grad_a = grad_w = None
    if ctx.needs_input_grad[0]:
        grad_a = grouped_gemm_op(grad_out, w, group_ends, not ctx.transpose_w)
    if ctx.needs_input_grad[1]:
        grad_w = (torch._grouped_mm(grad_out.t(), a, offs=group_ends) if ctx.transpose_w else
                  torch._grouped_mm(a.t(), grad_out, offs=group_ends))
    return grad_a, grad_w, None, None


grouped_gemm_op.register_autograd(_backward, setup_context=_setup_context)


def call_grouped_gemm(a: torch.Tensor, w: torch.Tensor, group_ends: torch.Tensor,
                      transpose_w: bool) -> torch.Tensor:
    """The operator while torch.compile traces (opaque to it, no graph break), its body in
    eager code; neither records autograd (for autograd functions' own forward and backward)."""
    if torch.compiler.is_compiling():
        return grouped_gemm_op(a, w, group_ends, transpose_w)
    return grouped_gemm_body(a, w, group_ends, transpose_w)


def grouped_linear(x_NI: torch.Tensor, w_EOI: torch.Tensor,
                   group_ends: torch.Tensor) -> torch.Tensor:
    """y_NO = x_e W_e^T on each expert e's rows, differentiable (the operator's autograd:
    module docstring)."""
    return grouped_gemm_op(x_NI, w_EOI, group_ends, True)
