"""DualPipeV: DualPipe "cut in half", a V-shaped bidirectional schedule on PP ranks.

The model is cut into 2*PP stages. Rank r holds stage r (chunk 0, the down leg) and stage
2PP-1-r (chunk 1, the up leg). A micro-batch enters at rank 0 (embedding, stage 0), goes down
to rank PP-1, turns there (stage PP-1 -> stage PP, no transfer), and comes back up to rank 0,
whose chunk 1 is the last stage (output head, MTP, loss). So rank 0 holds both ends of the
model, and nothing is duplicated.

    rank 0:  stage 0        ... stage 2PP-1   <- inputs and loss both here
    rank 1:  stage 1        ... stage 2PP-2
    ...
    rank PP-1: stage PP-1 -> stage PP         <- the turn

The phases are DualPipe's (dualpipe.py) for the first half of 2*PP ranks: rank r plays
DualPipe's rank r, and the "near" direction (0) is the down leg, the "far" one (1) the up leg.
Bubble (paper): (PP-1)(F&B+B-3W), DualPipe's on 2*PP ranks, on half the devices and without
DualPipe's second copy of the parameters.

Requirements (checked, with the fix in the message): PP >= 2 ranks; num_microbatches >= 2*PP.
Gradients are those of the sum of the micro-batch losses; losses come back on rank 0.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable, Optional, Sequence

import torch

from .executor import ChunkExecutor, ChunkRoute, StepResult, TwoChunkSchedule, run_steps_3_to_8
from .trace import BACKWARD_FULL, BACKWARD_INPUT, FORWARD, WEIGHT, ScheduledOp, Tracer

DOWN, UP = 0, 1  # local chunk indices: stage r and stage 2PP-1-r


class DualPipeV(TwoChunkSchedule):
    """DualPipeV over `group` (group rank r = pipeline rank r).

    Args:
        modules: (stage r, stage 2*PP-1-r) of this rank; a module may declare `stage_index`
            to have the placement checked.
        p2p_specs: shapes/dtypes of the tensors one stage passes to the next (and of their
            gradients), e.g. [TensorSpec((seq, micro_batch, hidden), torch.bfloat16)].
        group: the pipeline process group (default: the world).
        device: where receive buffers live (default: the modules' parameters' device).
        weight_grad_store: the store that the modules' deferrable layers use; the schedule
            attaches it to every `DeferredWgradLinear` in `modules` (a new one by default).
    """

    name = "DualPipeV"

    @staticmethod
    def stages_of_rank(rank: int, num_ranks: int) -> tuple[int, int]:
        return rank, 2 * num_ranks - 1 - rank

    @classmethod
    def _validate_ranks(cls, num_ranks: int) -> None:
        validate_dualpipev(num_ranks, None)

    @classmethod
    def _validate_microbatches(cls, num_ranks: int, num_microbatches: int) -> None:
        validate_dualpipev(num_ranks, num_microbatches)

    def step(self, num_microbatches: int, *, inputs: Optional[Sequence[Any]] = None,
             labels: Optional[Sequence[Any]] = None,
             loss_fn: Optional[Callable[[tuple, tuple], torch.Tensor]] = None,
             return_outputs: bool = False, tracer: Optional[Tracer] = None) -> StepResult:
        """Run the forward and backward of `num_microbatches` micro-batches (forward only under
        `torch.no_grad()`); gradients accumulate into the modules' parameters.

        Args:
            inputs: rank 0 only: inputs[m] is micro-batch m's input to stage 0 (a tensor or a
                tuple, passed as `module(*inputs[m])`).
            labels, loss_fn: rank 0 only: `loss_fn(outputs, labels[m])` with outputs the last
                stage's outputs as a tuple and labels[m] as a tuple; must return a scalar.
                Gradients are those of the sum over micro-batches: scale inside loss_fn.
            return_outputs: also return the last stage's outputs (rank 0).
            tracer: record this rank's ops (see trace.py).
        Returns: StepResult; on rank 0 the losses of micro-batches 0..M-1.
        """
        return self._step(num_microbatches, inputs, labels, loss_fn, return_outputs, tracer)

    def _routes(self, num_microbatches: int) -> tuple[ChunkRoute, ChunkRoute]:
        r, n = self.rank, self.num_ranks
        everyone = tuple(range(num_microbatches))
        first, last = r == 0, r == n - 1
        down = ChunkRoute(stage=r, microbatches=everyone,
                          recv_from=None if first else r - 1, send_to=None if last else r + 1,
                          first_stage=first, last_stage=False)
        up = ChunkRoute(stage=2 * n - 1 - r, microbatches=everyone,
                        recv_from=None if last else r + 1, send_to=None if first else r - 1,
                        first_stage=False, last_stage=first)
        return down, up

    def _run_phases(self, x: ChunkExecutor, num_microbatches: int) -> None:
        r, n, m = self.rank, self.num_ranks, num_microbatches
        near, far = DOWN, UP
        at_turn = r == n - 1

        # Step 1: nF0 -- warm-up: forwards of the near direction until the far one arrives
        step_1 = (n - r - 1) * 2
        for _ in range(step_1):
            x.forward_chunk(near)

        # Step 2: nF0F1 -- alternate near and far forwards (the receive of each next near
        # input is posted one step early; at the turn the last far output waits for step 4)
        step_2 = r + 1
        x.recv_forward(near)
        for i in range(step_2):
            x.forward_chunk(near, recv=False, send=False)
            x.recv_forward(near)
            x.forward_chunk(far, send=not at_turn or i < step_2 - 1)
            x.send_forward(near)

        # Steps 3-8: shared with DualPipe (executor.run_steps_3_to_8)
        run_steps_3_to_8(x, near, far, k=r, n=n, m=m, at_turn=at_turn)


def validate_dualpipev(num_ranks: int, num_microbatches: Optional[int]) -> None:
    """Raise ValueError naming the setting and the fix; num_microbatches None: ranks only."""
    if num_ranks < 2:
        raise ValueError(f"DualPipeV needs at least 2 pipeline ranks, got {num_ranks}; with one "
                         "rank use Megatron's no-pipelining schedule")
    if num_microbatches is not None and num_microbatches < 2 * num_ranks:
        raise ValueError(f"DualPipeV needs num_microbatches >= 2 * pipeline ranks = "
                         f"{2 * num_ranks}, got num_microbatches={num_microbatches}; raise the "
                         "global batch or lower the micro-batch size")


def expected_order(rank: int, num_ranks: int, num_microbatches: int,
                   forward_only: bool = False) -> list[ScheduledOp]:
    """The compute ops rank `rank` runs, in order (no communication): the oracle that tests
    compare a traced step with. Written apart from `_run_phases` on purpose."""
    validate_dualpipev(num_ranks, num_microbatches)
    r, n, m = rank, num_ranks, num_microbatches
    order: list[ScheduledOp] = []
    forwards, backwards = [0, 0], [0, 0]
    deferred: deque[tuple[int, int]] = deque()

    def f(chunk: int, paired: bool = False) -> None:
        order.append(ScheduledOp(FORWARD, chunk, forwards[chunk], paired and not forward_only))
        forwards[chunk] += 1

    def b(chunk: int, defer_w: bool = False, paired: bool = False) -> None:
        mb = backwards[chunk]
        backwards[chunk] += 1
        if defer_w:
            deferred.append((chunk, mb))
        order.append(ScheduledOp(BACKWARD_INPUT if defer_w else BACKWARD_FULL, chunk, mb, paired))

    def w() -> None:
        order.append(ScheduledOp(WEIGHT, *deferred.popleft()))

    def fb(fwd_chunk: int, bwd_chunk: int) -> None:
        f(fwd_chunk, paired=True)
        b(bwd_chunk, paired=True)

    for _ in range((n - r - 1) * 2):                 # 1: nF0
        f(DOWN)
    for _ in range(r + 1):                           # 2: nF0F1
        f(DOWN), f(UP)
    for _ in range(n - r - 1):                       # 3: nB1W1F1
        b(UP, defer_w=True), w(), f(UP)
    for i in range(m - 2 * n + r + 1):               # 4: nF0B1F1B0
        if i == 0 and r == n - 1:
            f(DOWN), b(UP)
        else:
            fb(DOWN, UP)
        fb(UP, DOWN)
    for _ in range(n - r - 1):                       # 5: nB1F1B0
        b(UP), fb(UP, DOWN)
    half = (r + 1) // 2                              # 6: nB1B0, W deferred from the middle on
    for i in range(r + 1):
        b(UP, defer_w=i > half or (i == half and r % 2 == 1))
        b(DOWN, defer_w=i >= half)
    for _ in range(n - r - 1):                       # 7: nWB0
        w(), b(DOWN, defer_w=True)
    for _ in range(r + 1):                           # 8: nW
        w()
    assert not deferred and forwards == [m, m] and backwards == [m, m], \
        f"{rank=}, {num_ranks=}, {num_microbatches=}: {forwards=}, {backwards=}, {len(deferred)=}"
    if forward_only:
        return [op for op in order if op.op == FORWARD]
    return order
