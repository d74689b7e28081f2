"""The compute ops each rank of DualPipe / DualPipeV must run, in order: the oracle that the
schedule tests compare a traced step with. Written from the DeepSeek-V3 report's figure and
DualPipe's reference implementation, apart from the package's `_run_phases` on purpose."""

from __future__ import annotations

from collections import deque

from megatron_dsv3.pipeline import DualPipe, DualPipeV
from megatron_dsv3.pipeline.trace import BACKWARD_FULL, BACKWARD_INPUT, FORWARD, WEIGHT, ScheduledOp


def expected_order(schedule: type, rank: int, num_ranks: int, num_microbatches: int,
                   forward_only: bool = False) -> list[ScheduledOp]:
    """The ops rank `rank` runs (no communication). DualPipeV plays DualPipe's first half on
    2 PP ranks: every chunk runs every micro-batch, the near direction is chunk 0. DualPipe:
    n = PP/2 ranks per direction, h = distance from the nearer end, chunk 0 runs micro-batches
    0..M/2-1 and chunk 1 M/2..M-1, the near direction is chunk 1 in the second half."""
    schedule.validate(num_ranks, num_microbatches)
    if schedule is DualPipeV:
        n, h, m = num_ranks, rank, num_microbatches
        near, far = 0, 1
        first_microbatch = (0, 0)
    elif schedule is DualPipe:
        n, m = num_ranks // 2, num_microbatches // 2
        h = min(rank, num_ranks - 1 - rank)
        near, far = (1, 0) if rank >= n else (0, 1)
        first_microbatch = (0, m)
    else:
        raise ValueError(f"no oracle for {schedule}")
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
