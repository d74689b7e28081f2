"""Token dispatch to the routed experts and back: on one rank, or over an expert-parallel group.

Shape legend: T tokens on this rank, K experts per token, N = T*K token-expert assignments,
D hidden, E routed experts in all, P ranks in the expert-parallel (EP) group, L = E/P experts
per rank (EP rank p holds the global experts [p*L, (p+1)*L)), M rows this rank's experts
receive from the whole EP group.

LocalDispatcher (no EP)
  dispatch  x_TD -> x_ND: each token copied to its K slots, sorted by expert (stable)
  combine   y_ND -> out_TD = sum_k gate_{t,k} * y_{t,k}        (un-permute, weight, sum over K)

AllToAllDispatcher(ep_group)
  dispatch  1. the same permutation as LocalDispatcher: x_ND sorted by global expert id, which
               also sorts it by destination rank (experts are contiguous per rank)
            2. counts: tokens_per_expert_E viewed [P, L] go through one all-to-all of E int64
               -> recv_PL[p, l] = rows source p sends to local expert l
            3. HOST SYNC (the only one): the split sizes, send_P = sum_l, recv_P = sum_l of recv
               (waits for the counts only where the count exchange is asynchronous, below)
            4. all_to_all_single of the rows with those splits: x_ND -> x_MD (source-major)
            5. regroup x_MD source-major -> local-expert-major (a permutation built on device)
            returns (x_MD, tokens_per_local_expert_L, state)
  combine   5 and 4 undone (the reverse all-to-all, splits swapped: the rows come home), then
            LocalDispatcher's un-permute and gate-weighted sum, on the source rank. EP=1 and
            EP=P therefore run the same arithmetic on the same rows; only the order in which
            an expert's weight gradient sums its rows differs.

What crosses the wire, per MoE layer and micro-batch: forward E int64 counts, N rows of D
activations out (dispatch) and M rows of D expert outputs back (combine), in the activations'
dtype; backward the same row volumes in the opposite directions (the gradient of a dispatch
all-to-all is a combine-direction all-to-all and vice versa; `_AllToAllRows`). Expert ids, gates
and their gradients never leave the source rank. Under tensor parallelism each TP rank of a
replica sends the same tokens to the same-TP-rank peers of its EP group (expert TP = TP), and
the routed partial sums are all-reduced over TP after combine (`moe/layer.py`).

Node-limited routing (`router.select_experts`) keeps each token within `topk_groups` expert
groups; when the number of groups is a multiple of P, each rank holds whole groups and a
token's rows go to at most `topk_groups` ranks.

dispatch and combine share nothing but the returned state, so a schedule (DualPipe) can run
the dispatch of one micro-batch, the experts of another and the combine of a third in any
interleaving. For that, both dispatchers also expose the steps one by one (the DualPipe split,
`moe/pieces.py`):
  plan(x_TD, routing)          1-3 and the index of 5: x_ND (still on this rank), the counts,
                               the state; the host sync happens here, before any row moves
  plan_start / plan_finish     plan in two halves: 1 and the launch of 2 / the wait for 2, 3
                               and the index of 5; plan = plan_finish . plan_start. Between
                               them the caller may compute something else (the other
                               micro-batch) while the counts are in flight. How the counts
                               travel is the `counts=` object's business (`CountExchange`):
                               the default `SyncCountExchange` is the blocking all-to-all and
                               `.tolist()` of before; `AsyncExchange.counts`
                               (moe/async_exchange.py) launches them on a side stream and
                               waits only for them
  send_rows / return_rows      4 and its reverse, as autograd functions (identity without EP);
                               `row_splits(state, toward_experts)` gives their split sizes to
                               a caller that runs the exchange itself (asynchronously)
  to_expert_order / to_source_order   5 and its inverse (identity without EP)
  weighted_sum                 the un-permute and gate-weighted sum of combine
dispatch = to_expert_order . send_rows . plan, combine = weighted_sum . return_rows .
to_source_order. Every permutation here is a gather in forward and in backward (no scatter-add,
no atomics: deterministic). Device-agnostic: the collectives are torch.distributed's, on
gloo (CPU) and NCCL (GPU) alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Protocol

import torch
import torch.distributed as dist

from ..config import ConfigError
from ..fp8.wire import pack_rows, unpack_rows
from .router import Routing


# ----------------------------------------------------------------------------------------------
# Row permutations with gather-only backward
# ----------------------------------------------------------------------------------------------
class _DispatchRows(torch.autograd.Function):
    """x_TD -> x_ND = x_TD[order_N // K]: each token copied to its K sorted positions.

    Backward sums the K copies' gradients with a gather and a reduction (deterministic, no
    atomics), instead of autograd's scatter-add for indexing."""

    @staticmethod
    def forward(ctx, x_TD, order_N, inverse_N, top_k: int):
        ctx.save_for_backward(inverse_N)
        ctx.top_k = top_k
        return x_TD.index_select(0, order_N // top_k)

    @staticmethod
    def backward(ctx, grad_ND):
        (inverse_N,) = ctx.saved_tensors
        tokens = inverse_N.numel() // ctx.top_k
        grad_TD = grad_ND.index_select(0, inverse_N).view(tokens, ctx.top_k, -1).sum(dim=1)
        return grad_TD, None, None, None


class _PermuteRows(torch.autograd.Function):
    """out[i] = x[index[i]] for a permutation `index`; backward is the inverse permutation
    (`inverse[index[i]] = i`), again a gather, not autograd's scatter."""

    @staticmethod
    def forward(ctx, x, index, inverse):
        ctx.save_for_backward(inverse)
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def _unpermute_rows(y_ND: torch.Tensor, order_N: torch.Tensor,
                    inverse_N: torch.Tensor) -> torch.Tensor:
    """y_ND (expert-sorted) -> y_N (token-major, n = t*K + k)."""
    return _PermuteRows.apply(y_ND, inverse_N, order_N)


def _inverse_permutation(order: torch.Tensor) -> torch.Tensor:
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return inverse


# ----------------------------------------------------------------------------------------------
# One rank
# ----------------------------------------------------------------------------------------------
@dataclass
class DispatchState:
    """What combine needs to undo dispatch."""

    order_N: torch.Tensor    # sorted position -> assignment n = t*K + k
    inverse_N: torch.Tensor  # assignment n -> its sorted position
    num_tokens: int


@dataclass(eq=False)
class PlanStart:
    """A plan between `plan_start` and `plan_finish`: step 1 done, step 2 in flight."""

    x_ND: torch.Tensor            # routed rows sorted by expert (= destination rank)
    local: DispatchState          # step 1's sort
    send_PL: torch.Tensor         # [P, L] rows this rank sends to each (rank, local expert)
    counts: Optional[CountExchange] = None  # how step 2 travels (EP only)
    pending: Any = None           # the count exchange's handle until `wait`
    received: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # (recv_PL, host_2PL)

    def wait(self) -> None:
        """Finish the count exchange (idempotent): a caller may wait here, apart from the
        index building of `plan_finish`, to see the two in a trace."""
        if self.pending is not None:
            handle, self.pending = self.pending, None
            self.received = self.counts.finish(handle)


def _sort_by_expert(x_TD: torch.Tensor, routing: Routing) -> tuple[torch.Tensor, DispatchState]:
    T, K = routing.topk_TK.shape
    order_N = routing.topk_TK.flatten().argsort(stable=True)  # sorted position -> assignment
    inverse_N = _inverse_permutation(order_N)
    return _DispatchRows.apply(x_TD, order_N, inverse_N, K), DispatchState(order_N, inverse_N, T)


def _weighted_sum(y_ND: torch.Tensor, gates_TK: torch.Tensor, state: DispatchState
                  ) -> torch.Tensor:
    """sum_k gate_{t,k} * y_{t,k}, in y's dtype (bf16 products, fp32-accumulated sum)."""
    T, K = gates_TK.shape
    y_TKD = _unpermute_rows(y_ND, state.order_N, state.inverse_N).view(T, K, -1)
    return (y_TKD * gates_TK.unsqueeze(-1).to(y_ND.dtype)).sum(dim=1)


class LocalDispatcher:
    """Permutation to and from expert-sorted order, on one rank (no expert parallelism)."""

    ep_group = None  # no rows leave this rank

    def plan_start(self, x_TD: torch.Tensor, routing: Routing,
                   counts: Optional[CountExchange] = None) -> PlanStart:
        """The sort; there are no counts to exchange (`counts` is accepted and unused)."""
        x_ND, state = _sort_by_expert(x_TD, routing)
        return PlanStart(x_ND, state, routing.tokens_per_expert_E.view(1, -1))

    def plan_finish(self, started: PlanStart
                    ) -> tuple[torch.Tensor, torch.Tensor, DispatchState]:
        return started.x_ND, started.send_PL.view(-1), started.local

    def plan(self, x_TD: torch.Tensor, routing: Routing
             ) -> tuple[torch.Tensor, torch.Tensor, DispatchState]:
        return self.plan_finish(self.plan_start(x_TD, routing))

    def send_rows(self, x_ND: torch.Tensor, state: DispatchState) -> torch.Tensor:
        return x_ND

    def return_rows(self, y_ND: torch.Tensor, state: DispatchState) -> torch.Tensor:
        return y_ND

    @staticmethod
    def to_wire(x_ND: torch.Tensor) -> torch.Tensor:
        return x_ND  # no exchange, nothing to pack

    @staticmethod
    def from_wire(received: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return received

    def to_expert_order(self, x_ND: torch.Tensor, state: DispatchState) -> torch.Tensor:
        return x_ND

    def to_source_order(self, y_ND: torch.Tensor, state: DispatchState) -> torch.Tensor:
        return y_ND

    def weighted_sum(self, y_ND: torch.Tensor, gates_TK: torch.Tensor,
                     state: DispatchState) -> torch.Tensor:
        return _weighted_sum(y_ND, gates_TK, state)

    def dispatch(self, x_TD: torch.Tensor, routing: Routing
                 ) -> tuple[torch.Tensor, torch.Tensor, DispatchState]:
        return self.plan(x_TD, routing)

    def combine(self, y_ND: torch.Tensor, gates_TK: torch.Tensor,
                state: DispatchState) -> torch.Tensor:
        return self.weighted_sum(y_ND, gates_TK, state)


# ----------------------------------------------------------------------------------------------
# Expert parallelism: all-to-all over the EP group
# ----------------------------------------------------------------------------------------------
def _all_to_all(x: torch.Tensor, output_splits: list[int], input_splits: list[int],
                group) -> torch.Tensor:
    out = x.new_empty((sum(output_splits),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
    return out


class _AllToAllRows(torch.autograd.Function):
    """Rows exchanged over `group` with the given split sizes; backward is the reverse
    exchange (splits swapped) of the gradients."""

    @staticmethod
    def forward(ctx, x, output_splits: list[int], input_splits: list[int], group):
        ctx.output_splits, ctx.input_splits, ctx.group = output_splits, input_splits, group
        return _all_to_all(x, output_splits, input_splits, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_to_all(grad, ctx.input_splits, ctx.output_splits, ctx.group), None, None, None


class CountExchange(Protocol):
    """How step 2's counts travel: `start` launches the all-to-all of send_PL [P, L] over
    `group` and returns a handle; `finish(handle)` returns (recv_PL [P, L] on send_PL's device,
    ready for the current stream; host_2PL, an int64 CPU tensor [2, P, L] holding send_PL then
    recv_PL). Only `finish` may wait, and it must not wait for more than the counts: the
    caller runs other work between the two calls."""

    def start(self, send_PL: torch.Tensor, group) -> Any: ...

    def finish(self, handle: Any) -> tuple[torch.Tensor, torch.Tensor]: ...


class SyncCountExchange:
    """The default `CountExchange`: a blocking all-to-all, then the copy to the host (on GPU a
    `.cpu()` on the compute stream, which waits for everything queued there)."""

    @staticmethod
    def start(send_PL: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor]:
        P, L = send_PL.shape
        recv_PL = _all_to_all(send_PL.flatten(), [L] * P, [L] * P, group).view(P, L)
        return send_PL, recv_PL

    @staticmethod
    def finish(handle: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        send_PL, recv_PL = handle
        return recv_PL, torch.stack([send_PL, recv_PL]).cpu()


@dataclass
class AllToAllState:
    """What combine needs to send the expert outputs home and undo the permutations."""

    local: DispatchState      # the source-side sort by global expert (as LocalDispatcher's)
    send_splits: list[int]    # [P] rows this rank sent to each EP rank
    recv_splits: list[int]    # [P] rows this rank received from each EP rank
    order_M: torch.Tensor     # expert-major position -> received (source-major) row
    inverse_M: torch.Tensor   # received row -> its expert-major position


def experts_per_rank(num_experts: int, ep_size: int) -> int:
    """L = E / P, with an error naming the fix when P does not divide E."""
    if num_experts % ep_size != 0:
        raise ConfigError(f"expert_parallel_size={ep_size} is invalid: it must divide "
                          f"MoEConfig.num_experts={num_experts} (each EP rank holds E/EP whole "
                          "experts); pick a divisor of num_experts")
    return num_experts // ep_size


def destination_ranks(topk_TK: torch.Tensor, num_experts: int, ep_size: int) -> torch.Tensor:
    """[T, K] the EP rank holding each chosen expert."""
    return topk_TK // experts_per_rank(num_experts, ep_size)


class _Fp8AllToAllRows(torch.autograd.Function):
    """Rows exchanged over `group` in FP8 (fp8/wire.py: E4M3 data with their 1x128 scales in
    one uint8 row), dequantized to x's dtype on arrival; backward is _AllToAllRows' reverse
    exchange of the gradients in their own dtype (BF16 on the combine side, DeepSeek-V3's
    recipe): the gradient passes the quantization straight through."""

    @staticmethod
    def forward(ctx, x, output_splits: list[int], input_splits: list[int], group):
        ctx.output_splits, ctx.input_splits, ctx.group = output_splits, input_splits, group
        received = _all_to_all(pack_rows(x), output_splits, input_splits, group)
        return unpack_rows(received, x.shape[1], x.dtype)

    @staticmethod
    def backward(ctx, grad):
        return _all_to_all(grad, ctx.input_splits, ctx.output_splits, ctx.group), None, None, None


class AllToAllDispatcher:
    """Dispatch/combine with the experts sharded over `ep_group` (module docstring). `fp8`:
    the dispatch all-to-all (step 4 toward the experts, forward) sends the rows in FP8 with
    their scales (fp8/wire.py); combine and every backward exchange stay in the rows' dtype."""

    def __init__(self, ep_group, fp8: bool = False):
        self.ep_group = ep_group
        self.fp8 = fp8

    def plan_start(self, x_TD: torch.Tensor, routing: Routing,
                   counts: Optional[CountExchange] = None) -> PlanStart:
        """Step 1 and the launch of step 2 through `counts` (default: synchronous)."""
        P = self.ep_group.size()
        L = experts_per_rank(routing.tokens_per_expert_E.numel(), P)
        # Step 1: sort by global expert id (= by destination rank).
        x_ND, local = _sort_by_expert(x_TD, routing)
        # Step 2: counts per (destination, local expert) -> per (source, local expert).
        send_PL = routing.tokens_per_expert_E.view(P, L)
        counts = counts if counts is not None else SyncCountExchange()
        return PlanStart(x_ND, local, send_PL, counts, counts.start(send_PL, self.ep_group))

    def plan_finish(self, started: PlanStart
                    ) -> tuple[torch.Tensor, torch.Tensor, AllToAllState]:
        """The wait for step 2, step 3 and the index of step 5: (x_ND,
        tokens_per_local_expert_L, state)."""
        started.wait()
        recv_PL, host_2PL = started.received
        P, L = recv_PL.shape
        # Step 3: the host sync: all-to-all split sizes must be Python ints.
        send_splits, recv_splits = host_2PL.sum(2).tolist()
        # Step 5's index: the rows will arrive source-major, each source's rows by local
        # expert; block (p, l) of recv_PL -> expert-major key l * P + p; stable sort of the keys.
        M = sum(recv_splits)
        block_M = torch.repeat_interleave(torch.arange(P * L, device=recv_PL.device),
                                          recv_PL.flatten(), output_size=M)
        order_M = ((block_M % L) * P + block_M // L).argsort(stable=True)
        inverse_M = _inverse_permutation(order_M)
        state = AllToAllState(started.local, send_splits, recv_splits, order_M, inverse_M)
        return started.x_ND, recv_PL.sum(0), state

    def plan(self, x_TD: torch.Tensor, routing: Routing
             ) -> tuple[torch.Tensor, torch.Tensor, AllToAllState]:
        """Steps 1-3 and the index of step 5 at once (synchronous count exchange)."""
        return self.plan_finish(self.plan_start(x_TD, routing))

    @staticmethod
    def row_splits(state: AllToAllState, toward_experts: bool) -> tuple[list[int], list[int]]:
        """(output_splits, input_splits) of step 4 (toward_experts) or of its reverse."""
        if toward_experts:
            return state.recv_splits, state.send_splits
        return state.send_splits, state.recv_splits

    def send_rows(self, x_ND: torch.Tensor, state: AllToAllState) -> torch.Tensor:
        """Step 4: x_ND -> x_MD (source-major); in FP8 when the dispatcher's `fp8` is set."""
        exchange = _Fp8AllToAllRows if self.fp8 else _AllToAllRows
        return exchange.apply(x_ND, *self.row_splits(state, True), self.ep_group)

    def to_wire(self, x_ND: torch.Tensor) -> torch.Tensor:
        """The rows step 4 sends for x_ND, for a caller that runs the exchange itself
        (moe/pieces.py): x_ND, or its FP8 packing when `fp8` is set."""
        return pack_rows(x_ND) if self.fp8 else x_ND

    def from_wire(self, received: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """What to_wire's rows become on arrival: the rows of `like`'s width and dtype."""
        return unpack_rows(received, like.shape[1], like.dtype) if self.fp8 else received

    def return_rows(self, y_MD: torch.Tensor, state: AllToAllState) -> torch.Tensor:
        """Step 4 reversed: y_MD (source-major) -> y_ND, back on the source rank."""
        return _AllToAllRows.apply(y_MD, *self.row_splits(state, False), self.ep_group)

    def to_expert_order(self, x_MD: torch.Tensor, state: AllToAllState) -> torch.Tensor:
        """Step 5: source-major -> local-expert-major."""
        return _PermuteRows.apply(x_MD, state.order_M, state.inverse_M)

    def to_source_order(self, y_MD: torch.Tensor, state: AllToAllState) -> torch.Tensor:
        return _PermuteRows.apply(y_MD, state.inverse_M, state.order_M)

    def weighted_sum(self, y_ND: torch.Tensor, gates_TK: torch.Tensor,
                     state: AllToAllState) -> torch.Tensor:
        return _weighted_sum(y_ND, gates_TK, state.local)

    def dispatch(self, x_TD: torch.Tensor, routing: Routing
                 ) -> tuple[torch.Tensor, torch.Tensor, AllToAllState]:
        x_ND, tokens_per_local_expert_L, state = self.plan(x_TD, routing)
        x_MD = self.to_expert_order(self.send_rows(x_ND, state), state)
        return x_MD, tokens_per_local_expert_L, state

    def combine(self, y_MD: torch.Tensor, gates_TK: torch.Tensor,
                state: AllToAllState) -> torch.Tensor:
        y_ND = self.return_rows(self.to_source_order(y_MD, state), state)
        return self.weighted_sum(y_ND, gates_TK, state)
