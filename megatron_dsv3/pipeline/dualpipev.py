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

The eight steps (bidirectional.py) are DualPipe's for the first half of 2*PP ranks: rank r
plays DualPipe's rank r (k = r, n = PP, m = M), the "near" direction is the down leg (chunk 0),
the "far" one the up leg (chunk 1), and the last rank is the turn.
Bubble (paper): (PP-1)(F&B+B-3W), DualPipe's on 2*PP ranks, on half the devices and without
DualPipe's second copy of the parameters.

Requirements (checked, with the fix in the message): PP >= 2 ranks; num_microbatches >= 2*PP.
Gradients are those of the sum of the micro-batch losses; losses come back on rank 0.
"""

from __future__ import annotations

from typing import Optional

from .bidirectional import BidirectionalSchedule, Phases
from .executor import ChunkRoute

DOWN, UP = 0, 1  # local chunk indices: stage r and stage 2PP-1-r


class DualPipeV(BidirectionalSchedule):
    """DualPipeV: rank r holds stage r (chunk 0, down) and stage 2PP-1-r (chunk 1, up); see the
    module docstring and BidirectionalSchedule for the arguments and `step()`. Every chunk runs
    every micro-batch; inputs and losses are on rank 0."""

    name = "DualPipeV"

    @staticmethod
    def stages_of_rank(rank: int, num_ranks: int) -> tuple[int, int]:
        return rank, 2 * num_ranks - 1 - rank

    @staticmethod
    def num_stages(num_ranks: int) -> int:
        return 2 * num_ranks

    @classmethod
    def validate(cls, num_ranks: int, num_microbatches: Optional[int] = None) -> None:
        """Raise ValueError naming the setting and the fix; num_microbatches None: ranks only."""
        if num_ranks < 2:
            raise ValueError(f"DualPipeV needs at least 2 pipeline ranks, got {num_ranks}; with "
                             "one rank use Megatron's no-pipelining schedule")
        if num_microbatches is not None and num_microbatches < 2 * num_ranks:
            raise ValueError(f"DualPipeV needs num_microbatches >= 2 * pipeline ranks = "
                             f"{2 * num_ranks}, got num_microbatches={num_microbatches}; raise "
                             "the global batch or lower the micro-batch size")

    @staticmethod
    def microbatches_of_chunk(chunk: int, num_microbatches: int) -> range:
        return range(num_microbatches)

    @staticmethod
    def paper_bubble(num_ranks: int, f_and_b: float, b: float, w: float) -> float:
        """DualPipe's on 2 PP ranks (DualPipeV is DualPipe cut in half): (PP-1)(F&B+B-3W)."""
        DualPipeV.validate(num_ranks)
        return (num_ranks - 1) * (f_and_b + b - 3 * w)

    def _phases(self, num_microbatches: int) -> Phases:
        r, n = self.rank, self.num_ranks
        return Phases(DOWN, UP, k=r, n=n, m=num_microbatches, at_turn=r == n - 1)

    def _routes(self, num_microbatches: int) -> tuple[ChunkRoute, ChunkRoute]:
        r, n = self.rank, self.num_ranks
        everyone = tuple(self.microbatches_of_chunk(DOWN, num_microbatches))
        first, last = r == 0, r == n - 1
        down = ChunkRoute(stage=r, microbatches=everyone,
                          recv_from=None if first else r - 1, send_to=None if last else r + 1,
                          first_stage=first, last_stage=False)
        up = ChunkRoute(stage=2 * n - 1 - r, microbatches=everyone,
                        recv_from=None if last else r + 1, send_to=None if first else r - 1,
                        first_stage=False, last_stage=first)
        return down, up
