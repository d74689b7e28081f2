"""DualPipe: micro-batches fed from both ends of the pipeline (DeepSeek-V3 report, section 3.2).

The model is cut into PP stages, and every stage is held twice. Rank r holds stage r (chunk 0)
and stage PP-1-r (chunk 1). The first half of the micro-batches (direction 0) enters at rank 0
and flows down through the chunk-0 copies; the second half (direction 1) enters at rank PP-1
and flows up through the chunk-1 copies. Both ends hold an embedding (stage 0) and an output
head (stage PP-1):

    rank 0:     stage 0    | stage PP-1   <- direction-0 inputs, direction-1 loss
    rank 1:     stage 1    | stage PP-2
    ...
    rank PP-1:  stage PP-1 | stage 0      <- direction-1 inputs, direction-0 loss

Two copies of a stage, one per direction: both must start equal (`sync_mirrored_parameters`
copies rank r's chunk 0 into rank PP-1-r's chunk 1) and, after the step, each copy holds the
gradient of its direction's micro-batches only. `reduce_mirrored_grads()` adds the two (a
send/receive with the mirror rank PP-1-r), so both copies hold the full, bit-identical
gradient, and identical optimizer steps keep them equal.

Phases (the 8 steps of the reference implementation, named by their op pattern, 0 = near
direction, 1 = far). For a rank in the first half, the near direction is direction 0 (chunk
0); in the second half it is direction 1 (chunk 1). `half_rank` = distance from the nearer
end. The two middle ranks, where the directions cross, send differently in steps 2 and 4.
Bubble (paper): (PP/2-1)(F&B+B-3W); 2x parameters, PP+1 activations.

Requirements (checked, with the fix in the message): PP even, num_microbatches even and
>= 2*PP. Gradients are those of the sum of the micro-batch losses.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist

from .executor import ChunkExecutor, ChunkRoute, StepResult, TwoChunkSchedule, run_steps_3_to_8
from .trace import BACKWARD_FULL, BACKWARD_INPUT, FORWARD, WEIGHT, ScheduledOp, Tracer


class DualPipe(TwoChunkSchedule):
    """DualPipe over `group` (group rank r = pipeline rank r).

    Args:
        modules: (stage r, stage PP-1-r) of this rank; a module may declare `stage_index` to
            have the placement checked.
        p2p_specs: shapes/dtypes of the tensors one stage passes to the next (and of their
            gradients), e.g. [TensorSpec((seq, micro_batch, hidden), torch.bfloat16)].
        group: the pipeline process group (default: the world).
        device: where receive buffers live (default: the modules' parameters' device).
        weight_grad_store: the store that the modules' deferrable layers use; the schedule
            attaches it to every `DeferredWgradLinear` in `modules` (a new one by default).
    """

    name = "DualPipe"

    @staticmethod
    def stages_of_rank(rank: int, num_ranks: int) -> tuple[int, int]:
        return rank, num_ranks - 1 - rank

    @classmethod
    def _validate_ranks(cls, num_ranks: int) -> None:
        validate_dualpipe(num_ranks, None)

    @classmethod
    def _validate_microbatches(cls, num_ranks: int, num_microbatches: int) -> None:
        validate_dualpipe(num_ranks, num_microbatches)

    @property
    def mirror_rank(self) -> int:
        """The rank holding the other copies of this rank's two stages."""
        return self.num_ranks - 1 - self.rank

    def step(self, num_microbatches: int, *, inputs: Optional[Sequence[Any]] = None,
             labels: Optional[Sequence[Any]] = None,
             loss_fn: Optional[Callable[[tuple, tuple], torch.Tensor]] = None,
             return_outputs: bool = False, tracer: Optional[Tracer] = None) -> StepResult:
        """Run the forward and backward of `num_microbatches` micro-batches (forward only under
        `torch.no_grad()`); gradients accumulate into the modules' parameters, each copy
        getting its own direction's share (then call `reduce_mirrored_grads()`).

        Micro-batches 0..M/2-1 go down from rank 0, M/2..M-1 up from rank PP-1.
        Args:
            inputs: ranks 0 and PP-1: inputs[m] is micro-batch m's input to stage 0 (a tensor or
                a tuple); rank 0 reads the first half, rank PP-1 the second.
            labels, loss_fn: ranks 0 and PP-1: `loss_fn(outputs, labels[m])` with outputs the
                last stage's outputs as a tuple; rank PP-1 computes the first half's losses,
                rank 0 the second half's. Must return a scalar; gradients are those of the sum
                over micro-batches.
            return_outputs: also return the last stage's outputs.
            tracer: record this rank's ops (see trace.py).
        Returns: StepResult; on rank PP-1 the losses of micro-batches 0..M/2-1, on rank 0 those
            of M/2..M-1 (with PP=2 both ranks are ends: see StepResult.microbatches).
        """
        return self._step(num_microbatches, inputs, labels, loss_fn, return_outputs, tracer)

    def _routes(self, num_microbatches: int) -> tuple[ChunkRoute, ChunkRoute]:
        r, n = self.rank, self.num_ranks
        half = num_microbatches // 2
        first, last = r == 0, r == n - 1
        down = ChunkRoute(stage=r, microbatches=tuple(range(half)),
                          recv_from=None if first else r - 1, send_to=None if last else r + 1,
                          first_stage=first, last_stage=last)
        up = ChunkRoute(stage=n - 1 - r, microbatches=tuple(range(half, num_microbatches)),
                        recv_from=None if last else r + 1, send_to=None if first else r - 1,
                        first_stage=last, last_stage=first)
        return down, up

    def _run_phases(self, x: ChunkExecutor, num_microbatches: int) -> None:
        n = self.num_ranks // 2                      # ranks per half
        h = min(self.rank, self.num_ranks - 1 - self.rank)  # half_rank
        m = num_microbatches // 2                    # micro-batches per direction
        in_second_half = self.rank >= n
        near, far = (1, 0) if in_second_half else (0, 1)
        middle = h == n - 1

        # Step 1: nF0 -- warm-up: forwards of the near direction until the far one arrives
        step_1 = (n - h - 1) * 2
        for _ in range(step_1):
            x.forward_chunk(near)

        # Step 2: nF0F1 -- alternate near and far forwards (the receive of each next near
        # input is posted one step early; the middle ranks pass the near output on at once,
        # and their last far output waits for step 4)
        step_2 = h + 1
        x.recv_forward(near)
        for i in range(step_2):
            x.forward_chunk(near, recv=False, send=middle)
            x.recv_forward(near)
            x.forward_chunk(far, send=not middle or i < step_2 - 1)
            if not middle:
                x.send_forward(near)

        # Steps 3-8: shared with DualPipeV (executor.run_steps_3_to_8)
        run_steps_3_to_8(x, near, far, k=h, n=n, m=m, at_turn=middle)

    # ---- the mirrored copies --------------------------------------------------------------

    def sync_mirrored_parameters(self) -> None:
        """Copy each stage's chunk-0 parameters (rank r) into its chunk-1 copy (rank PP-1-r)."""
        send = [p.detach() for p in self.modules[0].parameters()]
        recv = [torch.empty_like(p) for p in self.modules[1].parameters()]
        self._p2p_with_mirror(send, recv)
        with torch.no_grad():
            for param, value in zip(self.modules[1].parameters(), recv):
                param.copy_(value)

    def exchange_with_mirror(self, chunk0: list[torch.Tensor], chunk1: list[torch.Tensor]
                             ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Send this rank's chunk-0 and chunk-1 tensors to the mirror rank PP-1-r, receive its.

        The mirror's chunk 0 is the other copy of my chunk 1 and vice versa, so its messages
        arrive laid out [like my chunk 1] + [like my chunk 0] (stages may differ in shapes).
        Returns the mirror's tensors matching my chunk 0 and my chunk 1."""
        theirs_of_my_chunk1 = [torch.empty_like(t) for t in chunk1]  # = its chunk 0
        theirs_of_my_chunk0 = [torch.empty_like(t) for t in chunk0]  # = its chunk 1
        self._p2p_with_mirror([*chunk0, *chunk1], [*theirs_of_my_chunk1, *theirs_of_my_chunk0])
        return theirs_of_my_chunk0, theirs_of_my_chunk1

    def reduce_mirrored_grads(self) -> None:
        """Add the mirror copy's gradient to each parameter's (`main_grad` if it has one), so
        both copies of a stage hold the gradient of all micro-batches. The two sums have the
        same operands (a + b on one rank, b + a on the other), so the copies stay bit-identical."""
        grads = [[_grad_of(p) for p in module.parameters() if p.requires_grad]
                 for module in self.modules]
        theirs0, theirs1 = self.exchange_with_mirror(grads[0], grads[1])
        with torch.no_grad():
            for grad, other in zip(grads[0] + grads[1], theirs0 + theirs1):
                grad.add_(other)

    def _p2p_with_mirror(self, send: list[torch.Tensor], recv: list[torch.Tensor]) -> None:
        ops = [dist.P2POp(dist.isend, t.contiguous(), group=self.group, group_peer=self.mirror_rank)
               for t in send]
        ops += [dist.P2POp(dist.irecv, t, group=self.group, group_peer=self.mirror_rank)
                for t in recv]
        for work in dist.batch_isend_irecv(ops):
            work.wait()


def _grad_of(param: torch.Tensor) -> torch.Tensor:
    """The gradient buffer to reduce: Megatron's `main_grad`, else `.grad` (zeros if none)."""
    main_grad = getattr(param, "main_grad", None)
    if main_grad is not None:
        return main_grad
    if param.grad is None:
        param.grad = torch.zeros_like(param)
    return param.grad


def validate_dualpipe(num_ranks: int, num_microbatches: Optional[int]) -> None:
    """Raise ValueError naming the setting and the fix; num_microbatches None: ranks only."""
    if num_ranks < 2 or num_ranks % 2:
        raise ValueError(f"DualPipe needs an even number of pipeline ranks (>= 2), got "
                         f"{num_ranks}; use an even pipeline size or DualPipeV, which takes any")
    if num_microbatches is None:
        return
    if num_microbatches % 2:
        raise ValueError(f"DualPipe needs an even num_microbatches (half enter at each end), got "
                         f"{num_microbatches}; use {num_microbatches + 1}")
    if num_microbatches < 2 * num_ranks:
        raise ValueError(f"DualPipe needs num_microbatches >= 2 * pipeline ranks = "
                         f"{2 * num_ranks}, got num_microbatches={num_microbatches}; raise the "
                         "global batch or lower the micro-batch size")


def expected_order(rank: int, num_ranks: int, num_microbatches: int,
                   forward_only: bool = False) -> list[ScheduledOp]:
    """The compute ops rank `rank` runs, in order (no communication): the oracle that tests
    compare a traced step with. Written apart from `_run_phases` on purpose."""
    validate_dualpipe(num_ranks, num_microbatches)
    n, m = num_ranks // 2, num_microbatches // 2
    h = min(rank, num_ranks - 1 - rank)
    near, far = (1, 0) if rank >= n else (0, 1)
    first_microbatch = (0, m)  # chunk 0 runs micro-batches 0..m-1, chunk 1 m..2m-1
    order: list[ScheduledOp] = []
    forwards, backwards = [0, 0], [0, 0]
    deferred: deque[tuple[int, int]] = deque()

    def f(chunk: int, paired: bool = False) -> None:
        mb = first_microbatch[chunk] + forwards[chunk]
        forwards[chunk] += 1
        order.append(ScheduledOp(FORWARD, chunk, mb, paired and not forward_only))

    def b(chunk: int, defer_w: bool = False, paired: bool = False) -> None:
        mb = first_microbatch[chunk] + backwards[chunk]
        backwards[chunk] += 1
        if defer_w:
            deferred.append((chunk, mb))
        order.append(ScheduledOp(BACKWARD_INPUT if defer_w else BACKWARD_FULL, chunk, mb, paired))

    def w() -> None:
        order.append(ScheduledOp(WEIGHT, *deferred.popleft()))

    def fb(fwd_chunk: int, bwd_chunk: int) -> None:
        f(fwd_chunk, paired=True)
        b(bwd_chunk, paired=True)

    for _ in range((n - h - 1) * 2):                 # 1: nF0
        f(near)
    for _ in range(h + 1):                           # 2: nF0F1
        f(near), f(far)
    for _ in range(n - h - 1):                       # 3: nB1W1F1
        b(far, defer_w=True), w(), f(far)
    for i in range(m - 2 * n + h + 1):               # 4: nF0B1F1B0
        if i == 0 and h == n - 1:
            f(near), b(far)
        else:
            fb(near, far)
        fb(far, near)
    for _ in range(n - h - 1):                       # 5: nB1F1B0
        b(far), fb(far, near)
    half = (h + 1) // 2                              # 6: nB1B0, W deferred from the middle on
    for i in range(h + 1):
        b(far, defer_w=i > half or (i == half and h % 2 == 1))
        b(near, defer_w=i >= half)
    for _ in range(n - h - 1):                       # 7: nWB0
        w(), b(near, defer_w=True)
    for _ in range(h + 1):                           # 8: nW
        w()
    assert not deferred and forwards == [m, m] and backwards == [m, m], \
        f"{rank=}, {num_ranks=}, {num_microbatches=}: {forwards=}, {backwards=}, {len(deferred)=}"
    if forward_only:
        return [op for op in order if op.op == FORWARD]
    return order
