"""The per-rank machinery both bidirectional schedules drive: two local chunks, their buffers,
compute steps (F, B, W, F&B) and the p2p messages between them.

A schedule file (dualpipe.py, dualpipev.py) says *where* each local chunk's activations come
from and go to (`ChunkRoute`) and *in which order* the steps run (its numbered phases); this
file does the steps. Every chunk processes its micro-batches in a fixed order
(`route.microbatches`), so a step needs no micro-batch argument: the k-th forward of a chunk
is its k-th micro-batch, and so is its k-th backward, k-th received input, and so on.

Chunk-level steps, as the schedules call them (communication posted lazily, see comm.py):
  forward_chunk(c)          post recv of c's input; flush; F; post send of c's output
  backward_chunk(c, defer_w)  post recv of c's output grad; flush; B (or BW); post send of
                            c's input grad. defer_w: weight gradients go to the store (a W later)
  forward_backward_chunk(cf, cb)   both receives; flush; the F&B step; both sends
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
import torch.distributed as dist
import torch.nn as nn

from .comm import P2PComm
from .overlap import (BackwardWork, ForwardWork, LossFn, as_tensors, find_overlap_hook,
                      run_backward, run_forward)
from .stages import check_stage_modules
from .trace import BACKWARD_FULL, BACKWARD_INPUT, FORWARD, WEIGHT, ScheduledOp, Tracer
from .weight_grad import WeightGradStore, attach_weight_grad_store


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
        hook = find_overlap_hook(fwd.module, bwd.module)
        with self._span(ScheduledOp(FORWARD, fwd_chunk, fwd.microbatch, True),
                        ScheduledOp(BACKWARD_FULL, bwd_chunk, bwd.microbatch, True)):
            if hook is not None:
                outputs, loss = hook(fwd, bwd)
                outputs = as_tensors(outputs)
            else:
                outputs, loss = run_forward(fwd)
                run_backward(bwd)
        self._finish_forward(fwd_chunk, kf, outputs, loss)
        self._finish_backward(bwd_chunk, kb)


def run_steps_3_to_8(x: "ChunkExecutor", near: int, far: int, *, k: int, n: int, m: int,
                     at_turn: bool) -> None:
    """Steps 3-8 of DualPipe's figure, the same for both schedules once their warm-up (steps 1
    and 2) is done: DualPipe with k = the rank's index within its half, n = ranks per half and
    m = micro-batches per direction; DualPipeV with k = rank, n = ranks, m = micro-batches
    (a DualPipeV rank runs its two stages like a rank of DualPipe on twice the ranks).
    `at_turn`: the rank where the two directions meet (DualPipe's middle ranks, DualPipeV's
    last rank)."""
    # Step 3: nB1W1F1 -- first far backwards, zero-bubble style: B, then its W, then F
    step_3 = n - k - 1
    for _ in range(step_3):
        x.backward_chunk(far, defer_w=True)
        x.recv_forward(far)
        x.weight_chunk()
        x.forward_chunk(far, recv=False)

    # Step 4: nF0B1F1B0 -- steady state: overlapped F&B pairs, both directions
    step_4 = m - 2 * n + k + 1
    for i in range(step_4):
        if i == 0 and at_turn:
            # at the turn the first pair runs unoverlapped, which shortens the bubble
            x.forward_chunk(near, recv=False, send=False)
            x.send_forward(far)
            x.backward_chunk(far, send=False)
            x.send_forward(near)
            x.send_backward(far)
        else:
            x.forward_backward_chunk(near, far, recv_forward=i > 0)
        x.forward_backward_chunk(far, near)

    # Step 5: nB1F1B0 -- the near forwards are done: far backward, then far F & near B
    step_5 = n - k - 1
    for _ in range(step_5):
        x.backward_chunk(far)
        x.forward_backward_chunk(far, near)

    # Step 6: nB1B0 -- cool-down backwards; the second half defers W to fill step 7/8
    step_6 = k + 1
    defer_w = False
    for i in range(step_6):
        if i == step_6 // 2 and k % 2 == 1:
            defer_w = True
        x.backward_chunk(far, defer_w=defer_w)
        if i == step_6 // 2 and k % 2 == 0:
            defer_w = True
        x.backward_chunk(near, defer_w=defer_w)

    # Step 7: nWB0 -- W of earlier backwards between the last near backwards
    step_7 = n - k - 1
    for _ in range(step_7):
        x.weight_chunk()
        x.backward_chunk(near, defer_w=True)

    # Step 8: nW -- the remaining weight gradients
    step_8 = k + 1
    for _ in range(step_8):
        x.weight_chunk()


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


class TwoChunkSchedule:
    """What DualPipe and DualPipeV share: two stage modules per rank, one group, one store.

    Subclasses define `name`, `stages_of_rank`, `_validate_microbatches`, `_routes` and
    `_run_phases` (the numbered phases) and a documented `step()` that calls `_step()`."""

    name = "?"

    def __init__(self, modules: Sequence[nn.Module], *, p2p_specs: Sequence,
                 group=None, device: Optional[torch.device] = None,
                 weight_grad_store: Optional[WeightGradStore] = None) -> None:
        self.group = group if group is not None else dist.group.WORLD
        self.num_ranks = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        self._validate_ranks(self.num_ranks)
        check_stage_modules(modules, self.stages_of_rank(self.rank, self.num_ranks), self.name,
                            self.rank)
        self.modules = tuple(modules)
        if device is None:
            params = [p for m in self.modules for p in m.parameters()]
            device = params[0].device if params else torch.device("cpu")
        self.device = torch.device(device)
        # The schedule owns the store; every deferrable layer of its modules points at it.
        if weight_grad_store is None:
            weight_grad_store = WeightGradStore()
        self.weight_grad_store = weight_grad_store
        for module in self.modules:
            attach_weight_grad_store(module, self.weight_grad_store)
        self.comm = P2PComm(self.group, p2p_specs, self.device)
        self._communicators_ready = False

    @staticmethod
    def stages_of_rank(rank: int, num_ranks: int) -> tuple[int, int]:
        raise NotImplementedError

    @classmethod
    def _validate_ranks(cls, num_ranks: int) -> None:
        raise NotImplementedError

    @classmethod
    def _validate_microbatches(cls, num_ranks: int, num_microbatches: int) -> None:
        raise NotImplementedError

    def _routes(self, num_microbatches: int) -> tuple[ChunkRoute, ChunkRoute]:
        raise NotImplementedError

    def _run_phases(self, x: ChunkExecutor, num_microbatches: int) -> None:
        raise NotImplementedError

    def _step(self, num_microbatches: int, inputs, labels, loss_fn, return_outputs: bool,
              tracer: Optional[Tracer]) -> StepResult:
        self._validate_microbatches(self.num_ranks, num_microbatches)
        forward_only = not torch.is_grad_enabled()
        routes = self._routes(num_microbatches)
        for chunk, route in enumerate(routes):
            where = f"rank {self.rank} holds stage {route.stage} (chunk {chunk})"
            if route.first_stage and (inputs is None or len(inputs) != num_microbatches):
                raise ValueError(f"{self.name}.step: {where}, the first stage, so it needs "
                                 f"inputs: a sequence of num_microbatches={num_microbatches} "
                                 "micro-batches indexed by micro-batch id (unused ones may be "
                                 "None)")
            wants_loss = not forward_only or loss_fn is not None
            if route.last_stage and wants_loss:
                if loss_fn is None or labels is None or len(labels) != num_microbatches:
                    raise ValueError(f"{self.name}.step: {where}, the last stage, so training "
                                     "(or a forward-only step with loss_fn) needs loss_fn and "
                                     "labels: a sequence of "
                                     f"num_microbatches={num_microbatches} label tuples indexed "
                                     "by micro-batch id (unused ones may be None)")
        self.weight_grad_store.clear()
        if not self._communicators_ready:
            # One collective on the whole group before the first p2p: NCCL creates its
            # communicator lazily, and a batched p2p must not be the group's first call
            # unless every rank joins it (torch.distributed.batch_isend_irecv docs).
            dist.barrier(group=self.group)
            self._communicators_ready = True
        if tracer is not None:
            tracer.begin(self.group, self.device, schedule=self.name, rank=self.rank,
                         num_ranks=self.num_ranks, num_microbatches=num_microbatches,
                         forward_only=forward_only)
        x = ChunkExecutor(self.modules, routes, self.comm, self.weight_grad_store, tracer,
                          loss_fn=loss_fn, inputs=inputs, labels=labels,
                          forward_only=forward_only, return_outputs=return_outputs)
        self._run_phases(x, num_microbatches)
        x.finish()
        if tracer is not None:
            tracer.finish()
        return StepResult.collect(x)
