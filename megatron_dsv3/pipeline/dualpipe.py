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

The eight steps (bidirectional.py) run with k = distance from the nearer end, n = PP/2 ranks
per direction, m = M/2 micro-batches per direction. For a rank in the first half, the near
direction is direction 0 (chunk 0); in the second half it is direction 1 (chunk 1). The two
middle ranks, where the directions cross, are the turn.
Bubble (paper): (PP/2-1)(F&B+B-3W); 2x parameters, PP+1 activations.

Requirements (checked, with the fix in the message): PP even, num_microbatches even and
>= 2*PP. Gradients are those of the sum of the micro-batch losses.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from .bidirectional import BidirectionalSchedule, Phases
from .executor import ChunkRoute


class DualPipe(BidirectionalSchedule):
    """DualPipe: rank r holds stage r (chunk 0) and a copy of stage PP-1-r (chunk 1); see the
    module docstring and BidirectionalSchedule for the arguments and `step()`. Micro-batches
    0..M/2-1 go down from rank 0, M/2..M-1 up from rank PP-1; rank PP-1 computes the first
    half's losses, rank 0 the second half's (with PP=2 both ranks are ends)."""

    name = "DualPipe"
    mirrored = True

    @staticmethod
    def stages_of_rank(rank: int, num_ranks: int) -> tuple[int, int]:
        return rank, num_ranks - 1 - rank

    @staticmethod
    def num_stages(num_ranks: int) -> int:
        return num_ranks

    @classmethod
    def validate(cls, num_ranks: int, num_microbatches: Optional[int] = None) -> None:
        """Raise ValueError naming the setting and the fix; num_microbatches None: ranks only."""
        if num_ranks < 2 or num_ranks % 2:
            raise ValueError(f"DualPipe needs an even number of pipeline ranks (>= 2), got "
                             f"{num_ranks}; use an even pipeline size or DualPipeV, which takes "
                             "any")
        if num_microbatches is None:
            return
        if num_microbatches % 2:
            raise ValueError(f"DualPipe needs an even num_microbatches (half enter at each "
                             f"end), got {num_microbatches}; use {num_microbatches + 1}")
        if num_microbatches < 2 * num_ranks:
            raise ValueError(f"DualPipe needs num_microbatches >= 2 * pipeline ranks = "
                             f"{2 * num_ranks}, got num_microbatches={num_microbatches}; raise "
                             "the global batch or lower the micro-batch size")

    @staticmethod
    def microbatches_of_chunk(chunk: int, num_microbatches: int) -> range:
        """Chunk 0 (direction 0) runs the first half, chunk 1 the second."""
        half = num_microbatches // 2
        return range(half) if chunk == 0 else range(half, num_microbatches)

    @staticmethod
    def paper_bubble(num_ranks: int, f_and_b: float, b: float, w: float) -> float:
        """(PP/2 - 1)(F&B + B - 3W)."""
        DualPipe.validate(num_ranks)
        return (num_ranks // 2 - 1) * (f_and_b + b - 3 * w)

    @property
    def mirror_rank(self) -> int:
        """The rank holding the other copies of this rank's two stages."""
        return self.num_ranks - 1 - self.rank

    def _phases(self, num_microbatches: int) -> Phases:
        n = self.num_ranks // 2
        k = min(self.rank, self.num_ranks - 1 - self.rank)
        near, far = (1, 0) if self.rank >= n else (0, 1)
        return Phases(near, far, k=k, n=n, m=num_microbatches // 2, at_turn=k == n - 1)

    def _routes(self, num_microbatches: int) -> tuple[ChunkRoute, ChunkRoute]:
        r, n = self.rank, self.num_ranks
        first, last = r == 0, r == n - 1
        down = ChunkRoute(stage=r,
                          microbatches=tuple(self.microbatches_of_chunk(0, num_microbatches)),
                          recv_from=None if first else r - 1, send_to=None if last else r + 1,
                          first_stage=first, last_stage=last)
        up = ChunkRoute(stage=n - 1 - r,
                        microbatches=tuple(self.microbatches_of_chunk(1, num_microbatches)),
                        recv_from=None if last else r + 1, send_to=None if first else r - 1,
                        first_stage=last, last_stage=first)
        return down, up

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
