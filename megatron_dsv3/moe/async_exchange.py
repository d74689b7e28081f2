"""Expert-parallel all-to-alls started now and finished later, so that another micro-batch
computes while the rows (or the route's counts) travel: what the MoE pieces (moe/pieces.py) use
when the F&B overlap interleaves two micro-batches. The one device-specific module of moe/.

  CommStream(device)    a CUDA stream for communication beside compute; a no-op on CPU, so
                        the same code runs in gloo tests
  AsyncExchange         `start(rows, group, output_splits, input_splits)` -> pending,
                        `finish(pending)` -> the received rows; `.counts`: an AsyncCounts
  AsyncCounts           the dispatcher's count exchange (its `CountExchange` protocol,
                        moe/dispatcher.py) started now and finished later

Streams and events. On GPU an all-to-all is issued on a side stream (`CommStream`) that first
waits for the compute stream (the rows are ready), with `async_op=True`; `finish` waits for the
work on the side stream, then makes the compute stream wait for the side stream. Buffers are
allocated on the compute stream and the sent rows are kept alive until the wait, so no
`record_stream` is needed. On CPU (gloo) the same calls run: gloo executes the asynchronous
all-to-all on its own threads while the host computes the other micro-batch.

The count exchange (`AsyncCounts`) also runs on the side stream and copies its counts to pinned
host memory there; the route plan's host wait is for that copy's event alone, so the device
keeps computing what was queued meanwhile (a `.tolist()` on the compute stream would wait for
all of it, and the device would idle while the host issues the next kernels). By default the
counts travel on the EP group's communicator, in issue order behind any row exchange issued
before them; `AsyncExchange(count_groups=)` sends them over a duplicate of the EP group
(`parallel.duplicate_group`) on their own stream instead.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
import torch.distributed as dist


class CommStream:
    """Communication on its own CUDA stream, ordered against compute by events only where data
    flows. On a CPU device every call is a no-op, so the same layer code runs in gloo tests.

        comm_stream.wait_compute()      # the tokens to send have been computed
        with comm_stream:
            work = dispatch(tokens)       # runs on the side stream ...
        other_microbatch_compute()        # ... while this runs on the compute stream
        comm_stream.compute_waits()     # before the experts read the dispatched tokens

    Tensors made on one stream and freed on the other need `tensor.record_stream(...)`."""

    def __init__(self, device: torch.device) -> None:
        device = torch.device(device)
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def __enter__(self) -> None:
        self._context = (torch.cuda.stream(self._stream) if self._stream is not None
                         else nullcontext())
        self._context.__enter__()

    def __exit__(self, *exc) -> None:
        self._context.__exit__(*exc)

    def wait_compute(self) -> None:
        if self._stream is not None:
            self._stream.wait_stream(torch.cuda.current_stream(self._stream.device))

    def compute_waits(self) -> None:
        if self._stream is not None:
            torch.cuda.current_stream(self._stream.device).wait_stream(self._stream)


@dataclass
class PendingRows:
    output: torch.Tensor
    work: Any = None                      # torch.distributed Work, None when nothing was sent
    sent: Optional[torch.Tensor] = None   # kept alive until the wait
    stream: Optional[CommStream] = None


@dataclass(eq=False)
class PendingCounts:
    """A count exchange in flight (`AsyncCounts`)."""
    recv_PL: torch.Tensor                 # [P, L] on the device, written by the exchange
    sent: tuple                           # send_PL and the staging tensor, kept alive
    host_2PL: Optional[torch.Tensor] = None   # GPU: pinned [2, P, L], filled by the copy
    event: Any = None                     # GPU: recorded on the comm stream after the copy
    work: Any = None                      # CPU: the gloo Work


class AsyncCounts:
    """The count exchange of `AllToAllDispatcher.plan_start` (its `CountExchange`), started
    now and finished later without waiting for the compute stream.

    GPU: the side stream waits for the compute stream (send_PL is ready), issues the
    all-to-all with `async_op=True`, waits for it, then copies [send_PL; recv_PL] into pinned
    host memory (`non_blocking`) and records an event, all on the side stream. `finish` waits
    for that event only (the host wakes as soon as the counts are on the host, however much
    compute is queued behind them), then makes the compute stream wait for the event before it
    reads recv_PL; `wait_event`, not `compute_waits()`, so that row exchanges issued on the side
    stream after the counts do not become a dependency. recv_PL is allocated on the compute
    stream and send_PL and the staging tensor are held until `finish`, so no `record_stream`
    is needed. CPU (gloo): the all-to-all runs on gloo's threads; `finish` waits for it."""

    def __init__(self, stream_of, groups: Optional[Mapping] = None) -> None:
        self._stream_of = stream_of  # device -> CommStream
        self.groups = dict(groups or {})  # EP group's ranks -> the group the counts go over

    def start(self, send_PL: torch.Tensor, group) -> PendingCounts:
        if self.groups:
            group = self.groups.get(tuple(dist.get_process_group_ranks(group)), group)
        P, L = send_PL.shape
        send = send_PL.contiguous()
        recv_PL = torch.empty_like(send)
        if send.device.type != "cuda":
            work = dist.all_to_all_single(recv_PL, send, group=group, async_op=True)
            return PendingCounts(recv_PL, (send,), work=work)
        host_2PL = torch.empty((2, P, L), dtype=send.dtype, pin_memory=True)
        stream = self._stream_of(send.device)
        stream.wait_compute()
        with stream:
            dist.all_to_all_single(recv_PL, send, group=group, async_op=True).wait()
            staged_2PL = torch.stack([send, recv_PL])
            host_2PL.copy_(staged_2PL, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        return PendingCounts(recv_PL, (send, staged_2PL), host_2PL, event)

    @staticmethod
    def finish(pending: PendingCounts) -> tuple[torch.Tensor, torch.Tensor]:
        if pending.event is None:
            pending.work.wait()
            return pending.recv_PL, torch.stack([pending.sent[0], pending.recv_PL])
        pending.event.synchronize()
        torch.cuda.current_stream(pending.recv_PL.device).wait_event(pending.event)
        return pending.recv_PL, pending.host_2PL


class AsyncExchange:
    """Row all-to-alls issued now and waited for later (see the module note); `counts`, the
    count exchange of the route plan.

    count_groups: {EP group's ranks: group} to send the counts over instead of the EP group
    itself (`parallel.duplicate_group(ep_group)`: the same ranks on their own communicator). On
    one communicator a count exchange queues behind the row exchange in flight, and the host,
    which waits for the counts, waits for the rows too. With count_groups the counts also get
    their own side stream; without, they share the rows' one."""

    def __init__(self, count_groups: Optional[Mapping] = None) -> None:
        self._streams: dict[tuple[torch.device, str], CommStream] = {}
        count_stream = "counts" if count_groups else "rows"
        self.counts = AsyncCounts(lambda device: self._stream(device, count_stream),
                                  count_groups)

    @property
    def count_groups(self) -> dict:
        return self.counts.groups

    def _stream(self, device: torch.device, kind: str = "rows") -> CommStream:
        if (device, kind) not in self._streams:
            self._streams[device, kind] = CommStream(device)
        return self._streams[device, kind]

    def start(self, rows: torch.Tensor, group, output_splits: Optional[list[int]],
              input_splits: Optional[list[int]]) -> PendingRows:
        if group is None:  # no expert parallelism: the rows stay here
            return PendingRows(rows)
        rows = rows.contiguous()
        output = rows.new_empty((sum(output_splits),) + tuple(rows.shape[1:]))
        stream = self._stream(rows.device)
        stream.wait_compute()
        with stream:
            work = dist.all_to_all_single(output, rows, output_splits, input_splits, group=group,
                                          async_op=True)
        return PendingRows(output, work, rows, stream)

    @staticmethod
    def finish(pending: PendingRows) -> torch.Tensor:
        if pending.work is not None:
            with pending.stream:
                pending.work.wait()
            pending.stream.compute_waits()
        return pending.output


__all__ = ["AsyncCounts", "AsyncExchange", "CommStream", "PendingCounts", "PendingRows"]
