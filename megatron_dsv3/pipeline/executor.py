"""The per-rank machinery both bidirectional schedules drive: two local chunks, their buffers,
compute steps (F, B, W, F&B) and the p2p messages between them.

A schedule file (dualpipe.py, dualpipev.py) says *where* each local chunk's activations come
from and go to (`ChunkRoute`), bidirectional.py *in which order* the steps run (the eight
steps); this file does the steps. Every chunk processes its micro-batches in a fixed order
(`route.microbatches`), so a step needs no micro-batch argument: the k-th forward of a chunk
is its k-th micro-batch, and so is its k-th backward, k-th received input, and so on.

Chunk-level steps, as the schedules call them (communication posted lazily, see comm.py):
  forward_chunk(c)          post recv of c's input; flush; F; post send of c's output
  backward_chunk(c, defer_w)  post recv of c's output grad; flush; B (or BW); post send of
                            c's input grad. defer_w: weight gradients go to the store (a W later)
  forward_backward_chunk(cf, cb)   both receives; flush; the F&B step (fb_overlap.py); both
                            sends
  weight_chunk()            flush; W of the oldest deferred B
  recv_forward / send_forward / send_backward  the same posts on their own, where a schedule
                            places a transfer apart from its compute

Design notes
  * Buffers are per chunk, indexed by position k in the chunk's micro-batch order; an entry is
    dropped (set to None) as soon as nothing needs it any more.
  * In forward-only mode (`torch.no_grad()` around `step`), backward, W and the gradient
    transfers are no-ops, so the same phase program runs inference.
  * Gradients are those of the sum of the micro-batch losses; scale inside `loss_fn`.
  * Not done: freeing the data of sent activations early (Megatron's
    `deallocate_output_tensor`); with DualPipe's PP+1 live activations that matters at scale.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn

from ..weight_grad import WeightGradStore
from .comm import P2PComm
from .fb_overlap import forward_backward
from .trace import BACKWARD_FULL, BACKWARD_INPUT, FORWARD, WEIGHT, ScheduledOp, Tracer
from .work import BackwardWork, ForwardWork, LossFn, as_tensors, run_backward, run_forward


@dataclass(frozen=True)
class ChunkRoute:
    """Where one local chunk gets its inputs and sends its outputs (peers are group ranks).

    recv_from None: the inputs are the step's data (first_stage) or, on the rank where a
    V-shaped pipeline turns, the other local chunk's outputs. send_to None: the outputs go to
    the loss (last_stage) or to the other local chunk. Gradients travel the opposite way."""
    stage: int
    microbatches: tuple[int, ...]
    recv_from: Optional[int]
    send_to: Optional[int]
    first_stage: bool
    last_stage: bool

    @property
    def input_from_other_chunk(self) -> bool:
        return self.recv_from is None and not self.first_stage

    @property
    def output_to_other_chunk(self) -> bool:
        return self.send_to is None and not self.last_stage


class ChunkExecutor:
    """State of one step on one rank. Built by a schedule's `step()`, used once."""

    def __init__(self, modules: Sequence[nn.Module], routes: Sequence[ChunkRoute],
                 comm: P2PComm, store: WeightGradStore, tracer: Optional[Tracer], *,
                 loss_fn: Optional[LossFn], inputs: Optional[Sequence[Any]],
                 labels: Optional[Sequence[Any]], forward_only: bool, return_outputs: bool) -> None:
        self.modules, self.routes, self.comm, self.store = modules, routes, comm, store
        self.tracer = tracer
        self.loss_fn, self.labels = loss_fn, labels
        self.forward_only, self.return_outputs = forward_only, return_outputs
        # per chunk, per position k in route.microbatches
        self._inputs: list[list[Any]] = [[], []]
        self._outputs: list[list[Any]] = [[], []]
        self._losses: list[list[Any]] = [[], []]
        self._output_grads: list[list[Any]] = [[], []]
        self._input_grads: list[list[Any]] = [[], []]
        self._num_forward, self._num_backward = [0, 0], [0, 0]
        self._num_sent_forward, self._num_sent_backward = [0, 0], [0, 0]
        self.loss_values: dict[int, torch.Tensor] = {}
        self.output_values: dict[int, tuple] = {}
        for chunk, route in enumerate(routes):
            if route.first_stage:
                self._inputs[chunk] = [as_tensors(inputs[mb]) for mb in route.microbatches]

    # ---- transfers ----------------------------------------------------------------------

    def recv_forward(self, chunk: int) -> None:
        peer = self.routes[chunk].recv_from
        if peer is not None:
            self._inputs[chunk].append(self.comm.post_recv(peer))

    def send_forward(self, chunk: int) -> None:
        peer = self.routes[chunk].send_to
        if peer is None:
            return
        k = self._num_sent_forward[chunk]
        assert k < self._num_forward[chunk], f"send_forward before forward: {chunk=}, {k=}"
        self._num_sent_forward[chunk] += 1
        self.comm.post_send(self._outputs[chunk][k], peer)
        if self.forward_only:
            self._outputs[chunk][k] = None  # the comm keeps the tensors until they are sent

    def recv_backward(self, chunk: int) -> None:
        peer = self.routes[chunk].send_to
        if peer is not None and not self.forward_only:
            self._output_grads[chunk].append(self.comm.post_recv(peer))

    def send_backward(self, chunk: int) -> None:
        peer = self.routes[chunk].recv_from
        if peer is None or self.forward_only:
            return
        k = self._num_sent_backward[chunk]
        assert k < self._num_backward[chunk], f"send_backward before backward: {chunk=}, {k=}"
        self._num_sent_backward[chunk] += 1
        self.comm.post_send(self._input_grads[chunk][k], peer)
        self._input_grads[chunk][k] = None

    # ---- chunk-level steps (what the schedules call) ------------------------------------

    def forward_chunk(self, chunk: int, *, recv: bool = True, send: bool = True) -> None:
        if recv:
            self.recv_forward(chunk)
        self.comm.flush()
        self._forward(chunk)
        if send:
            self.send_forward(chunk)

    def backward_chunk(self, chunk: int, *, defer_w: bool = False, recv: bool = True,
                       send: bool = True) -> None:
        if recv:
            self.recv_backward(chunk)
        self.comm.flush()
        if not self.forward_only:
            self._backward(chunk, defer_w)
        if send:
            self.send_backward(chunk)

    def forward_backward_chunk(self, fwd_chunk: int, bwd_chunk: int, *,
                               recv_forward: bool = True) -> None:
        if recv_forward:
            self.recv_forward(fwd_chunk)
        self.recv_backward(bwd_chunk)
        self.comm.flush()
        if self.forward_only:
            self._forward(fwd_chunk)
        else:
            self._forward_backward(fwd_chunk, bwd_chunk)
        self.send_forward(fwd_chunk)
        self.send_backward(bwd_chunk)

    def weight_chunk(self) -> None:
        if self.forward_only:
            return
        self.comm.flush()
        chunk, microbatch = self.store.peek_label()
        with self._span(ScheduledOp(WEIGHT, chunk, microbatch)):
            self.store.run_next()

    def finish(self) -> None:
        """Flush the last transfers and check that every micro-batch went all the way."""
        self.comm.flush()
        for chunk, route in enumerate(self.routes):
            expected = len(route.microbatches)
            no_backward = self.forward_only
            done = {"forward": self._num_forward[chunk],
                    "backward": expected if no_backward else self._num_backward[chunk],
                    "sent forward": (expected if route.send_to is None
                                     else self._num_sent_forward[chunk]),
                    "sent backward": (expected if route.recv_from is None or no_backward
                                      else self._num_sent_backward[chunk])}
            for what, count in done.items():
                if count != expected:
                    raise RuntimeError(f"schedule bug: chunk {chunk} (stage {route.stage}) ran "
                                       f"{count} {what} of {expected} micro-batches")
        if len(self.store):
            raise RuntimeError(f"schedule bug: {len(self.store)} deferred weight-gradient "
                               "groups were never run (a W step is missing)")

    # ---- compute ------------------------------------------------------------------------

    def _span(self, *ops: ScheduledOp):
        return self.tracer.span(*ops) if self.tracer is not None else nullcontext()

    def _forward_work(self, chunk: int) -> tuple[int, ForwardWork]:
        k = self._num_forward[chunk]
        self._num_forward[chunk] += 1
        route = self.routes[chunk]
        microbatch = route.microbatches[k]
        inputs = self._inputs[chunk][k]
        if not route.first_stage and not self.forward_only:
            inputs = tuple(t.requires_grad_() for t in inputs)
        if route.last_stage and self.loss_fn is not None:
            loss_fn, labels = self.loss_fn, as_tensors(self.labels[microbatch])
        else:
            loss_fn, labels = None, ()
        return k, ForwardWork(self.modules[chunk], inputs, loss_fn, labels, chunk, microbatch)

    def _finish_forward(self, chunk: int, k: int, outputs: tuple,
                        loss: Optional[torch.Tensor]) -> None:
        route = self.routes[chunk]
        microbatch = route.microbatches[k]
        if self.forward_only:
            self._inputs[chunk][k] = None
        if route.output_to_other_chunk:
            self._inputs[1 - chunk].append(tuple(o.detach() for o in outputs))
        if route.last_stage:
            if loss is not None:
                self.loss_values[microbatch] = loss.detach()
            if self.return_outputs:
                self.output_values[microbatch] = tuple(o.detach() for o in outputs)
            # the loss is the root of the backward; outputs are not needed any more
            self._losses[chunk].append(None if self.forward_only else loss)
            self._outputs[chunk].append(None)
        elif self.forward_only and route.send_to is None:
            self._outputs[chunk].append(None)  # handed to the other chunk, no backward
        else:
            self._outputs[chunk].append(outputs)

    def _backward_work(self, chunk: int) -> tuple[int, BackwardWork]:
        k = self._num_backward[chunk]
        self._num_backward[chunk] += 1
        route = self.routes[chunk]
        if route.last_stage:
            loss = self._losses[chunk][k]
            if loss is None:
                raise ValueError("backward on the last stage without a loss: pass loss_fn to "
                                 "step() (or run it under torch.no_grad() for forward only)")
            outputs, output_grads = (), ()
        else:
            loss = None
            outputs, output_grads = self._outputs[chunk][k], self._output_grads[chunk][k]
        return k, BackwardWork(self.modules[chunk], loss, outputs, output_grads, chunk,
                               route.microbatches[k])

    def _finish_backward(self, chunk: int, k: int) -> None:
        route = self.routes[chunk]
        inputs = self._inputs[chunk][k]
        for buffers in (self._inputs, self._outputs, self._output_grads, self._losses):
            if k < len(buffers[chunk]):
                buffers[chunk][k] = None
        if route.first_stage:
            return
        # an input the stage did not use gets a zero gradient: the peer expects a message
        grads = tuple(t.grad if t.grad is not None else torch.zeros_like(t) for t in inputs)
        if route.input_from_other_chunk:
            self._output_grads[1 - chunk].append(grads)
        else:
            self._input_grads[chunk].append(grads)

    def _forward(self, chunk: int) -> None:
        k, work = self._forward_work(chunk)
        with self._span(ScheduledOp(FORWARD, chunk, work.microbatch)):
            outputs, loss = run_forward(work)
        self._finish_forward(chunk, k, outputs, loss)

    def _backward(self, chunk: int, defer_w: bool) -> None:
        k, work = self._backward_work(chunk)
        op = BACKWARD_INPUT if defer_w else BACKWARD_FULL
        deferring = (self.store.deferring(label=(chunk, work.microbatch)) if defer_w
                     else nullcontext())
        with self._span(ScheduledOp(op, chunk, work.microbatch)), deferring:
            run_backward(work)
        self._finish_backward(chunk, k)

    def _forward_backward(self, fwd_chunk: int, bwd_chunk: int) -> None:
        kf, fwd = self._forward_work(fwd_chunk)
        kb, bwd = self._backward_work(bwd_chunk)
        with self._span(ScheduledOp(FORWARD, fwd_chunk, fwd.microbatch, True),
                        ScheduledOp(BACKWARD_FULL, bwd_chunk, bwd.microbatch, True)):
            outputs, loss = forward_backward(fwd, bwd)
        self._finish_forward(fwd_chunk, kf, outputs, loss)
        self._finish_backward(bwd_chunk, kb)


@dataclass
class StepResult:
    """What a schedule's `step()` returns on one rank.

    losses: the per-micro-batch losses computed on this rank (its chunks that hold the last
        stage), ordered by global micro-batch id as listed in `microbatches`; None on ranks
        without a last stage or when no loss_fn was given.
    outputs: with return_outputs=True, the last stage's outputs (detached tuples) in the same
        order, else None."""
    microbatches: tuple[int, ...]
    losses: Optional[torch.Tensor]
    outputs: Optional[list[tuple]]

    @classmethod
    def collect(cls, executor: ChunkExecutor) -> "StepResult":
        microbatches = tuple(sorted(mb for route in executor.routes if route.last_stage
                                    for mb in route.microbatches))
        losses = None
        if microbatches and executor.loss_values:
            losses = torch.stack([executor.loss_values[mb] for mb in microbatches])
        outputs = None
        if executor.return_outputs and microbatches:
            outputs = [executor.output_values[mb] for mb in microbatches]
        return cls(microbatches, losses, outputs)
