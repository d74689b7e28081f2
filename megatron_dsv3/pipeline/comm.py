"""Point-to-point transfers between pipeline ranks.

  P2PComm(group, specs, device)   posts sends/receives of one message (a tuple of tensors of
                                  known shapes) to/from a neighbour rank, lazily; `flush()`
                                  starts everything posted as one `batch_isend_irecv` and waits.
  TensorSpec(shape, dtype)        the shape of one tensor of a message, known in advance (the
                                  receiver allocates its buffer before the data arrives).

Design notes
  * Backend-neutral: only `torch.distributed.batch_isend_irecv` and group-relative peers,
    which gloo (CPU tests) and NCCL (GPU) both implement. No device is hard-coded: receive
    buffers go on the `device` given.
  * Lazy posting, as in DualPipe: a schedule posts the receives it will need and the sends it
    has ready, and they all start together right before the next compute step. Both ends of a
    link must post their matching operations in the same order: NCCL matches sends to
    receives per peer in issue order and ignores tags. We use tag 0 everywhere so that gloo
    matches in issue order too, and a mis-ordered schedule fails its CPU test (wrong gradients
    or a hang) instead of working on gloo and breaking on NCCL.
  * Every message between two neighbours has the same spec (hidden states and their
    gradients have the same shape), so a receiver needs no header. A send is checked against
    the spec here: a wrong shape would otherwise hang or corrupt the peer.
  * On NCCL `Work.wait()` only makes the current stream wait for the transfer, so the host runs
    ahead; on gloo it blocks the host. Either way data is ready for the next compute step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        if any(d <= 0 for d in self.shape):
            raise ValueError(f"TensorSpec.shape={self.shape}: every dimension must be positive")


class P2PComm:
    """Lazily posted point-to-point messages to neighbours in `group` (peers are group ranks)."""

    def __init__(self, group: Optional[dist.ProcessGroup], specs: Sequence[TensorSpec],
                 device: torch.device) -> None:
        if not specs:
            raise ValueError("P2PComm needs at least one TensorSpec (the message between stages)")
        self.group = group if group is not None else dist.group.WORLD
        self.specs = tuple(specs)
        self.device = torch.device(device)
        self._ops: list[dist.P2POp] = []
        self._keep_alive: list[torch.Tensor] = []

    def post_recv(self, peer: int) -> tuple[torch.Tensor, ...]:
        """Post the receive of one message from `peer`; the tensors hold it after `flush()`."""
        tensors = tuple(torch.empty(s.shape, dtype=s.dtype, device=self.device) for s in self.specs)
        self._ops.extend(dist.P2POp(dist.irecv, t, group=self.group, group_peer=peer)
                         for t in tensors)
        return tensors

    def post_send(self, tensors: Sequence[torch.Tensor], peer: int) -> None:
        """Post the send of one message to `peer` (it leaves at the next `flush()`)."""
        if len(tensors) != len(self.specs):
            raise ValueError(f"sending {len(tensors)} tensors to rank {peer}, but the message "
                             f"has {len(self.specs)} ({self.specs})")
        for i, (tensor, spec) in enumerate(zip(tensors, self.specs)):
            if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
                raise ValueError(f"tensor {i} sent to rank {peer} is {tuple(tensor.shape)} "
                                 f"{tensor.dtype}, but the p2p spec says {spec.shape} "
                                 f"{spec.dtype}: stage outputs (and their gradients) must "
                                 "match the schedule's p2p_specs")
            tensor = tensor.detach().contiguous()
            self._keep_alive.append(tensor)
            self._ops.append(dist.P2POp(dist.isend, tensor, group=self.group, group_peer=peer))

    def flush(self) -> None:
        """Start every posted operation together and wait for all of them."""
        if not self._ops:
            return
        for work in dist.batch_isend_irecv(self._ops):
            work.wait()
        self._ops = []
        self._keep_alive = []
