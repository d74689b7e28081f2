"""Routed experts (SwiGLU) over tokens already sorted by expert, and the dense SwiGLU FFN.

Shape legend: N token-expert assignments sorted by expert, D hidden, E local experts,
F expert FFN width on this TP rank (the width is split over tensor-parallel ranks).

Expert parallelism: a rank holds E = num_experts / EP whole experts (the global experts
[expert_offset, expert_offset + E)). fc1/fc2 carry `expert_parallel = True` (split along dim 0
over the EP group, read by `parallel.shard_state_dict` / `gather_state_dict`) and Megatron's
`allreduce = False` (their gradient is reduced over the expert-data-parallel group, not DP).

  fc1_EFD2 = weight [E, 2F, D] holding [gate; up] rows per expert (TP: each rank its slice
             of gate and of up, i.e. stride 2), fc2_EDF = weight [E, D, F].
  y_ND = (silu(x W_gate^T) * (x W_up^T)) W_2^T, per expert on its contiguous rows.

Implementations with one result: `grouped_mm` (one `torch._grouped_mm` per projection,
the GPU path, no host sync), `loop` (a Python loop over experts, the reference) and `triton`
(opt-in: the forward and input-gradient GEMMs by our Triton grouped GEMM,
kernels/grouped_gemm.py, a custom operator torch.compile traces; the weight gradient as
grouped_mm's).

Weight-gradient deferral (weight_grad.py): while a schedule's store is attached
(`RoutedExperts.weight_grad_store`), each projection runs as one autograd function,
`experts_linear` (y_NO = x_NI W_e^T on expert e's rows), whose backward computes dX now and
dW_e = dY_e^T X_e (w_EOI, all experts at once) now or in the W step: the same GEMMs autograd
runs for `_grouped_mm` (grouped_mm) or for the per-expert F.linear (loop). Without a store
the plain functions above run, unchanged. With a store the experts leave torch.compile's graph
and run eager (`RoutedExperts._eager`): whether to defer is decided in the backward, which a
traced function would have fixed at trace time.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F

from ..config import ConfigError
from ..fp8 import ops as fp8_ops  # the FP8 pieces: custom operators (traced), bodies (eager)
from ..fp8.weight_cache import Blocks, current_step, for_step, quantized_weight, static_blocks
from ..kernels.grouped_gemm import call_grouped_gemm, grouped_linear
from ..kernels.grouped_wgrad import grouped_wgrad_add_, stash_segment_
from ..layers import mark_tensor_parallel, normal_init, tp_size
from ..sharded_checkpoint import sharded_state_dict_of
from ..weight_grad import WeightGradStore, autocast_dtype, weight_grad_now_or_later


class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up that saves only its input h = [gate; up] and recomputes the activation in
    backward (DeepSeek-V3's precision map: "SwiGLU input saved"), where autograd's composition
    saved gate, silu(gate) and up: half of h again. The backward runs autograd's own kernels
    on the recomputed activation (the mul's products, aten.silu_backward), so its gradient is
    bit for bit autograd's."""

    @staticmethod
    def forward(ctx, h: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(h)
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (h,) = ctx.saved_tensors
        gate, up = h.chunk(2, dim=-1)
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate)
        return torch.cat([grad_gate, grad * F.silu(gate)], dim=-1)


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for h = [gate; up] along the last dimension. Eager: _SwiGLU (only h
    saved for backward); under torch.compile the plain expression, whose backward the
    compiler's partitioner already recomputes from h."""
    if torch.compiler.is_compiling():
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    return _SwiGLU.apply(h)


def experts_loop(x_ND: torch.Tensor, fc1_EFD2: torch.Tensor, fc2_EDF: torch.Tensor,
                 tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
    """Reference: one dense SwiGLU per expert on its slice of rows."""
    counts = tokens_per_expert_E.tolist()
    outputs, start = [], 0
    for e, count in enumerate(counts):
        rows = x_ND[start:start + count]
        outputs.append(F.linear(swiglu(F.linear(rows, fc1_EFD2[e])), fc2_EDF[e]))
        start += count
    return torch.cat(outputs, dim=0) if outputs else x_ND.new_zeros(0, fc2_EDF.shape[1])


def experts_grouped_mm(x_ND: torch.Tensor, fc1_EFD2: torch.Tensor, fc2_EDF: torch.Tensor,
                       tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
    """Fast path: `torch._grouped_mm` with per-expert row offsets (bf16 on Hopper)."""
    offsets_E = tokens_per_expert_E.cumsum(0).to(torch.int32)
    h_NF2 = torch._grouped_mm(x_ND, fc1_EFD2.transpose(-2, -1), offs=offsets_E)
    return torch._grouped_mm(swiglu(h_NF2), fc2_EDF.transpose(-2, -1), offs=offsets_E)


def experts_triton(x_ND: torch.Tensor, fc1_EFD2: torch.Tensor, fc2_EDF: torch.Tensor,
                   tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
    """grouped_mm's experts with the forward and input-gradient GEMMs by the Triton grouped
    GEMM (kernels/grouped_gemm.py; its reference on the CPU), dW by torch._grouped_mm."""
    offsets_E = tokens_per_expert_E.cumsum(0).to(torch.int32)
    h_NF2 = grouped_linear(x_ND, fc1_EFD2, offsets_E)
    return grouped_linear(swiglu(h_NF2), fc2_EDF, offsets_E)


EXPERT_IMPLS = {"loop": experts_loop, "grouped_mm": experts_grouped_mm,
                "triton": experts_triton}
GROUPED_IMPLS = ("grouped_mm", "triton")  # rows found by int32 end offsets, no host sync


def resolve_experts_impl(impl: str, device: torch.device) -> str:
    """'loop', 'grouped_mm' or 'triton' for `MoEConfig.experts_impl` on this device."""
    if impl == "auto":
        impl = "grouped_mm" if device.type == "cuda" else "loop"
    if impl == "grouped_mm" and device.type == "cpu" and torch.is_grad_enabled():
        raise ConfigError("experts_impl='grouped_mm' is invalid for training on the CPU: "
                          "torch._grouped_mm has no CPU backward (its forward runs); use "
                          "'loop' or 'auto'")
    return impl


def pick_experts_impl(impl: str, device: torch.device):
    return EXPERT_IMPLS[resolve_experts_impl(impl, device)]


# ----------------------------------------------------------------------------------------------
# One projection of all experts with a deferrable weight gradient
# ----------------------------------------------------------------------------------------------
def row_bounds(counts: list[int]) -> list[tuple[int, int]]:
    """[start, end) of each expert's rows, from the row counts."""
    starts = [0]
    for count in counts:
        starts.append(starts[-1] + count)
    return list(zip(starts[:-1], starts[1:]))


class _ExpertsLinear(torch.autograd.Function):
    """y_NO = x_NI W_e^T on expert e's contiguous rows; dW deferrable (see module docstring).

    `groups`: int32 end offsets [E] (grouped_mm) or the row counts as a list (loop)."""

    @staticmethod
    def forward(ctx, x_NI: torch.Tensor, w_EOI: torch.Tensor, impl: str, groups,
                store: Optional[WeightGradStore], fp32_grad: Optional[torch.Tensor],
                fp8: bool, fp8_wgrad: bool, cached: bool, stash_grad_y: Optional[torch.Tensor],
                stash_x: Optional[torch.Tensor], stash_ends: Optional[torch.Tensor],
                slot: Optional[torch.Tensor], *blocks: Optional[torch.Tensor]) -> torch.Tensor:
        x_c, w_c = x_NI, w_EOI
        dtype = autocast_dtype(x_NI.device.type)  # as RoutedExperts casts for _grouped_mm
        if dtype is not None:
            x_c, w_c = x_NI.to(dtype), w_EOI.to(dtype)
        w_q = None
        static = fp8 and blocks[0] is not None
        if fp8:  # forward and input gradient in FP8 (fp8/grouped_gemm.py); W kept in FP8,
            # its blocks: the step's static ones, else once per step where `cached` (eager:
            # weight_cache.py), else here
            if static:
                w_q = blocks[:2]
            else:
                w_q = (quantized_weight(w_EOI, fp8_ops.grouped_weight, dtype) if cached else
                       fp8_ops.call("fp8_grouped_weight", w_c))
            y_NO = fp8_ops.call("fp8_grouped_gemm", *fp8_ops.call("fp8_quantize", x_c, "1x128"),
                                *w_q, _group_ends(groups), x_c.dtype)
        elif impl == "grouped_mm":
            y_NO = torch._grouped_mm(x_c, w_c.transpose(-2, -1), offs=groups)
        elif impl == "triton":
            y_NO = call_grouped_gemm(x_c, w_c, groups, True)
        else:
            y_NO = torch.cat([F.linear(x_c[a:b], w_c[e]) for e, (a, b) in
                              enumerate(row_bounds(groups))], dim=0)
        # x for the weight gradient: in FP8, each expert's rows in 128-token tiles along the
        # tokens, with the weight gradient in FP8 (fp8_wgrad), else as it is; W's FP8 blocks
        # for the input gradient
        x_saved = (x_c,)
        if fp8_wgrad:
            if slot is not None:
                raise ValueError(
                    "the routed experts' weight gradient in FP8 ('routed_experts_wgrad' in "
                    "ModelConfig.fp8_layers) cannot go through --expert-wgrad step, whose "
                    "buffers hold BF16 operands: use --expert-wgrad in-gemm or micro-batch, "
                    "or leave 'routed_experts_wgrad' out of --fp8-layers")
            x_saved = fp8_ops.call("fp8_quantize_segments", x_c, _group_ends(groups))
        # W's FP8 blocks for the input gradient (W^T's where static), else W itself
        ctx.save_for_backward(*x_saved, *(blocks[2:] if static else w_q if fp8 else (w_c,)))
        ctx.static = static
        ctx.fp8_wgrad, ctx.x_dtype, ctx.rows = fp8_wgrad, x_c.dtype, x_c.shape[0]
        ctx.weight, ctx.impl, ctx.groups, ctx.store = w_EOI, impl, groups, store
        ctx.fp32_grad, ctx.fp8 = fp32_grad, fp8
        # the step's cache, for W^T: backward's thread does not see weights_fixed's block
        ctx.step = current_step() if cached else None
        ctx.stash = None if slot is None else (stash_grad_y, stash_x, stash_ends, slot)
        return y_NO

    @staticmethod
    def backward(ctx, grad_y_NO: torch.Tensor):
        saved = list(ctx.saved_tensors)
        x_t = (saved.pop(0), saved.pop(0)) if ctx.fp8_wgrad else None  # x's segment tiles
        x_NI = None if ctx.fp8_wgrad else saved.pop(0)
        w_saved = saved
        groups = ctx.groups
        grouped = ctx.impl in GROUPED_IMPLS
        bounds = None if grouped else row_bounds(groups)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0] and ctx.fp8:  # dX_e = dY_e W_e, in FP8
            w_T = w_saved if ctx.static else for_step(  # once per step where cached
                ctx.step, ctx.weight, fp8_ops.grouped_transposed,
                lambda: fp8_ops.call("fp8_grouped_transposed", *w_saved))
            grad_x = fp8_ops.call("fp8_grouped_gemm", *fp8_ops.call(
                "fp8_quantize", grad_y_NO.contiguous(), "1x128"), *w_T, _group_ends(groups),
                ctx.x_dtype)
        elif ctx.needs_input_grad[0]:  # dX_e = dY_e W_e
            (w_EOI,) = w_saved
            if ctx.impl == "triton":
                grad_x = call_grouped_gemm(grad_y_NO, w_EOI, groups, False)
            else:
                grad_x = (torch._grouped_mm(grad_y_NO, w_EOI, offs=groups) if grouped else
                          torch.cat([grad_y_NO[a:b] @ w_EOI[e] for e, (a, b) in
                                     enumerate(bounds)]))

        if ctx.needs_input_grad[1] and ctx.fp8_wgrad:  # dY in the tiles of x's
            ends = _group_ends(groups)
            dy_t = fp8_ops.call("fp8_quantize_segments", grad_y_NO.contiguous(), ends)

        def weight_grad_EOI() -> torch.Tensor:  # dW_e = dY_e^T X_e
            if ctx.fp8_wgrad:
                return fp8_ops.call("fp8_grouped_wgrad", *dy_t, *x_t, ctx.rows, ends,
                                    ctx.weight.dtype)
            if grouped:
                return torch._grouped_mm(grad_y_NO.t(), x_NI, offs=groups)
            return torch.stack([grad_y_NO[a:b].t() @ x_NI[a:b] for a, b in bounds])

        if ctx.needs_input_grad[1] and ctx.stash is not None:  # expert_wgrad.py: later,
            stash_grad_y, stash_x, stash_ends, slot = ctx.stash  # over micro-batches
            for buffer, rows in ((stash_grad_y, grad_y_NO), (stash_x, x_NI),
                                 (stash_ends, _group_ends(groups).to(slot.device))):
                stash_segment_(buffer, slot, rows.to(buffer.dtype))
        elif ctx.needs_input_grad[1] and ctx.fp32_grad is not None:
            # into the fp32 sum, inside the GEMM
            if ctx.fp8_wgrad:
                fp8_ops.call("fp8_grouped_wgrad_add_", *dy_t, *x_t, ctx.rows, ends,
                             ctx.fp32_grad)
            else:
                grouped_wgrad_add_(grad_y_NO, x_NI, groups, ctx.fp32_grad)
        elif ctx.needs_input_grad[1]:
            grad_w = weight_grad_now_or_later(ctx.store, ctx.weight, weight_grad_EOI)
        return (grad_x, grad_w) + (None,) * 15


Groups = Union[torch.Tensor, list[int]]


def _group_ends(groups: Groups) -> torch.Tensor:
    """The int32 end row of each expert: grouped_mm's offsets as they are, the loop's counts
    summed (on the CPU: the loop runs there)."""
    if isinstance(groups, torch.Tensor):
        return groups
    return torch.tensor(groups, dtype=torch.int64).cumsum(0).to(torch.int32)


def expert_groups(tokens_per_expert_E: torch.Tensor, impl: str) -> Groups:
    """What `experts_linear` needs to find each expert's rows: int32 end offsets (grouped_mm,
    triton: no host sync) or the counts as a list (loop, one host sync)."""
    if impl in GROUPED_IMPLS:
        return tokens_per_expert_E.cumsum(0).to(torch.int32)
    return tokens_per_expert_E.tolist()


def experts_linear(x_NI: torch.Tensor, w_EOI: torch.Tensor, impl: str, groups: Groups,
                   store: Optional[WeightGradStore] = None, segments=None,
                   fp32_grad: Optional[torch.Tensor] = None, fp8: bool = False,
                   fp8_wgrad: bool = False, blocks: Optional[Blocks] = None) -> torch.Tensor:
    """x_NI W_e^T on each expert e's rows, by `impl` ('loop' | 'grouped_mm' | 'triton'); the weight
    gradient's operands are copied into `segments` (expert_wgrad.Segments, at the merger's
    slot) when given, the
    gradient into `fp32_grad` (w_EOI's fp32 sum; grouped_mm only) by the grouped GEMM itself
    (kernels/grouped_wgrad.py) when given, to `store` while it defers, else to autograd as
    usual. `fp8`: the forward and input-gradient GEMMs in FP8 (x and dY in 1x128 tiles, each
    expert's W in 128x128 blocks, the grouped FP8 GEMM); `fp8_wgrad`: the weight gradient in
    FP8 too (x and dY in 128-token tiles of each expert's rows, x kept in FP8 for backward,
    kernels/fp8_grouped_wgrad.py), into `fp32_grad` or to `store` / autograd as above. FP8
    pieces are fp8/ops.py's custom operators, traced by torch.compile; W's blocks are `blocks`
    where given (weight_cache.static_blocks: this step's W and W^T), else quantized once per
    step eager (weight_cache.py), at each call traced."""
    stash = (None,) * 4
    if segments is not None:
        if x_NI.shape[0] > segments.x.shape[1]:
            raise ValueError(
                f"ExpertGradMerger: a micro-batch brought {x_NI.shape[0]} expert rows, its "
                f"buffers hold {segments.x.shape[1]} (rows = tokens per micro-batch x top-k); "
                "make the merger with the micro-batch's row count")
        stash = (segments.grad_y, segments.x, segments.ends, segments.slot)
    cached = not torch.compiler.is_compiling()  # a compiled graph would not revisit the cache
    return _ExpertsLinear.apply(x_NI, w_EOI, impl, groups, store, fp32_grad, fp8,
                                fp8 and fp8_wgrad, cached, *stash,
                                *((None,) * 4 if blocks is None else blocks))


def mark_expert_parallel(param: torch.nn.Parameter) -> None:
    """A routed-expert weight: dim 0 indexes experts, split over the EP group; replicated only
    over the expert-data-parallel group (Megatron's `allreduce = False` convention)."""
    param.expert_parallel = True
    param.allreduce = False


class RoutedExperts(torch.nn.Module):
    """This rank's routed experts' weights: the global experts
    [expert_offset, expert_offset + num_local_experts)."""

    weight_grad_store: Optional[WeightGradStore] = None  # set by attach_weight_grad_store
    weight_grad_merger = None  # set by expert_wgrad.ExpertGradMerger.attach, with
    fc1_segments = fc2_segments = None  # the buffers of fc1's and fc2's operands
    # True: each backward adds the weight gradients into fc1/fc2.main_grad (fp32) inside the
    # grouped GEMM instead of handing them to autograd (set by sum_expert_grads_in_gemm)
    grads_into_main_grad = False
    # True: the forward and input-gradient GEMMs in FP8 (model.mark_fp8_linears, part
    # "routed_experts"); fp8_wgrad (part "routed_experts_wgrad"): the weight gradients too
    fp8 = False
    fp8_wgrad = False

    def __init__(self, num_local_experts: int, hidden_size: int, ffn_size: int, *, tp_group,
                 dtype: torch.dtype, device=None, init_std: float = 0.006, impl: str = "auto",
                 expert_offset: int = 0):
        super().__init__()
        tp = tp_size(tp_group)
        local_ffn = ffn_size // tp
        self.impl = impl
        self.num_local_experts = num_local_experts
        self.expert_offset = expert_offset
        self.fc1 = torch.nn.Parameter(
            torch.empty(num_local_experts, 2 * local_ffn, hidden_size, dtype=dtype,
                        device=device))
        self.fc2 = torch.nn.Parameter(
            torch.empty(num_local_experts, hidden_size, local_ffn, dtype=dtype, device=device))
        mark_tensor_parallel(self.fc1, dim=1, stride=2)
        mark_tensor_parallel(self.fc2, dim=2)
        mark_expert_parallel(self.fc1)
        mark_expert_parallel(self.fc2)
        with torch.no_grad():
            self.fc1.normal_(0.0, init_std)
            self.fc2.normal_(0.0, init_std)

    def forward(self, x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor,
                impl: Optional[str] = None) -> torch.Tensor:
        # where the weight gradients go (one of): the step's merged GEMM, a schedule's store,
        # the fp32 sums inside the GEMM; the same GEMMs for the input gradient
        grad = torch.is_grad_enabled()
        merged = self.weight_grad_merger is not None and grad
        store = None if merged else self.weight_grad_store
        into_main_grad = self.grads_into_main_grad and grad and not merged and store is None
        if store is not None or (self.fp8 and merged):  # Python state: outside torch.compile
            return self._eager(x_ND, tokens_per_expert_E, impl, store, merged, into_main_grad)
        # FP8 (traced under torch.compile: fp8/ops.py's custom operators) or the weight
        # gradients going elsewhere than autograd (the merger's segments, the fp32 sums)
        if self.fp8 or merged or store is not None or into_main_grad:
            return self._through_experts_linear(x_ND, tokens_per_expert_E, impl, store, merged,
                                                into_main_grad)
        run = pick_experts_impl(impl or self.impl, x_ND.device)
        fc1, fc2 = self.fc1, self.fc2
        device_type = x_ND.device.type
        if torch.is_autocast_enabled(device_type):
            # torch._grouped_mm has no autocast rule: cast as autocast casts F.linear's inputs.
            dtype = torch.get_autocast_dtype(device_type)
            x_ND, fc1, fc2 = x_ND.to(dtype), fc1.to(dtype), fc2.to(dtype)
        return run(x_ND, fc1, fc2, tokens_per_expert_E)

    @torch.compiler.disable  # a schedule's store or the step's FP8 merger: Python state, eager
    def _eager(self, x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor,
               impl: Optional[str], store: Optional[WeightGradStore], merged: bool,
               into_main_grad: bool) -> torch.Tensor:
        """The experts outside torch.compile: a store's deferral is decided in the backward
        (traced, dynamo would fold its trace-time answer, not deferring, into the compiled
        backward and B would compute W's gradients); the FP8 merger's caches are Python."""
        return self._through_experts_linear(x_ND, tokens_per_expert_E, impl, store, merged,
                                            into_main_grad)

    def _through_experts_linear(self, x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor,
                                impl: Optional[str], store: Optional[WeightGradStore] = None,
                                merged: bool = False, into_main_grad: bool = False
                                ) -> torch.Tensor:
        """fc1, SwiGLU, fc2 as two `experts_linear` calls, whose weight gradients go to `store`
        or (`merged`) into the merger's segments, or into the weights' fp32 `main_grad`
        (grouped_mm)."""
        name = resolve_experts_impl(impl or self.impl, x_ND.device)
        groups = expert_groups(tokens_per_expert_E, name)
        sums = (None, None)
        if into_main_grad:
            sums = tuple(getattr(w, "main_grad", None) for w in (self.fc1, self.fc2))
            if name not in GROUPED_IMPLS or any(s is None or s.dtype != torch.float32
                                                for s in sums):
                raise ValueError(
                    "RoutedExperts.grads_into_main_grad needs the grouped_mm or triton experts "
                    "and an fp32 "
                    f"`main_grad` on fc1 and fc2 (experts_impl={name!r}); give the weights one "
                    "(train/master_weights.MasterWeights does) or turn it off")
        seg1, seg2 = (self.fc1_segments, self.fc2_segments) if merged else (None, None)
        h_NF2 = experts_linear(x_ND, self.fc1, name, groups, store, seg1, sums[0], self.fp8,
                               self.fp8_wgrad, static_blocks(self, "fc1_blocks"))
        return experts_linear(swiglu(h_NF2), self.fc2, name, groups, store, seg2, sums[1],
                              self.fp8, self.fp8_wgrad, static_blocks(self, "fc2_blocks"))


def sum_expert_grads_in_gemm(module: torch.nn.Module, on: bool = True) -> int:
    """Every RoutedExperts under `module` adds its weight gradients into the weights' fp32
    `main_grad` inside the grouped GEMM (kernels/grouped_wgrad.py) instead of handing bf16
    gradients to autograd (`on`), or stops; returns how many. For bf16 weights with fp32
    sums that nothing else accumulates (not with Megatron's DDP hooks, which wait for
    autograd's accumulation)."""
    experts = [m for m in module.modules() if isinstance(m, RoutedExperts)]
    for m in experts:
        m.grads_into_main_grad = on
    return len(experts)


class SwiGLUMLP(torch.nn.Module):
    """Dense FFN (and DeepSeekMoE's shared experts): fc1 [gate; up] column-parallel with
    stride 2, fc2 row-parallel (its output is all-reduced over TP)."""

    def __init__(self, hidden_size: int, ffn_size: int, *, backend, config, tp_group,
                 init_std: float):
        super().__init__()
        init = normal_init(init_std)
        self.linear_fc1 = backend.column(hidden_size, 2 * ffn_size, config=config,
                                         init_method=init, tp_group=tp_group, stride=2)
        self.linear_fc2 = backend.row(ffn_size, hidden_size, config=config, init_method=init,
                                      tp_group=tp_group)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None) -> dict:
        """Megatron's distributed checkpoint (sharded_checkpoint.py), linear_fc1's fused
        [gate; up] saved as two TP-split halves, as Megatron's own MLP saves it."""
        from megatron.core.transformer.mlp import apply_swiglu_sharded_factory

        out = sharded_state_dict_of(self, prefix, sharded_offsets, metadata)
        key = f"{prefix}linear_fc1.weight"
        if getattr(self.linear_fc1.weight, "partition_stride", 1) == 2 and \
                tp_size(self.linear_fc1.tp_group) > 1:
            out[key] = apply_swiglu_sharded_factory(out[key], sharded_offsets)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.linear_fc1(x)
        out, _ = self.linear_fc2(swiglu(h))
        return out
