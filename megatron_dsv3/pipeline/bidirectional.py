"""What DualPipe and DualPipeV share: two stage modules per rank, and the eight steps.

A schedule class (dualpipe.py, dualpipev.py) owns its rules, and nothing outside it branches on
which schedule it is:
  stages_of_rank(rank, PP)          the two stages a rank holds (chunk 0, chunk 1)
  num_stages(PP)                    how many stages the model is cut into
  validate(PP, num_microbatches)    ValueError naming the setting and the fix
  microbatches_of_chunk(chunk, M)   the micro-batches a chunk runs, in its order
  mirrored, is_mirror(chunk)        whether a chunk is the second copy of a stage (DualPipe)
  paper_bubble(PP, F&B, B, W)       the bubble time the DeepSeek-V3 report gives for it
  _phases(M)                        this rank's place in the eight steps below
  _routes(M)                        where each chunk's activations come from and go to

The eight steps (DeepSeek-V3 report, figure 5; DualPipe's reference implementation). `near` is
the direction whose input enters at this end of the pipeline, `far` the other; `k` the rank's
distance from its end, `n` the ranks per direction, `m` the micro-batches per direction.
DualPipeV runs them like a rank of DualPipe on 2 PP ranks (k = rank, n = PP, m = M, near = the
down leg); DualPipe with k = min(r, PP-1-r), n = PP/2, m = M/2. `at_turn`: the rank where the
two directions meet (DualPipe's two middle ranks, DualPipeV's last rank).
  1 nF0         near forwards, until the far direction arrives           2 (n-k-1)
  2 nF0F1       near and far forwards alternate                          k+1 pairs
  3 nB1W1F1     far backward, its weight gradient, far forward           n-k-1
  4 nF0B1F1B0   steady state: F&B pairs in both directions               m-2n+k+1 pairs of pairs
  5 nB1F1B0     far backward, then far F & near B                        n-k-1
  6 nB1B0       backwards of both; from the middle on W is deferred      k+1 pairs
  7 nWB0        a W, then a near backward (its W deferred)               n-k-1
  8 nW          the remaining W                                          k+1
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from ..weight_grad import WeightGradStore, attach_weight_grad_store
from .comm import P2PComm
from .executor import ChunkExecutor, ChunkRoute, StepResult
from .trace import Tracer


@dataclass(frozen=True)
class Phases:
    """A rank's place in the eight steps (module docstring)."""
    near: int       # local chunk of the direction that enters at this end
    far: int
    k: int          # distance from this rank's end of the pipeline
    n: int          # ranks per direction
    m: int          # micro-batches per direction
    at_turn: bool   # the rank where the two directions meet


class BidirectionalSchedule:
    """The schedule over `group` (group rank r = pipeline rank r).

    Args:
        modules: this rank's two stage modules (`stages_of_rank`); a module may declare
            `stage_index` to have the placement checked.
        p2p_specs: shapes/dtypes of the tensors one stage passes to the next (and of their
            gradients), e.g. [TensorSpec((seq, micro_batch, hidden), torch.bfloat16)].
        group: the pipeline process group (default: the world).
        device: where receive buffers live (default: the modules' parameters' device).
        weight_grad_store: the store the modules' deferrable layers use; the schedule attaches
            it to every layer with a `weight_grad_store` attribute (a new store by default).
    """

    name = "?"              # for messages and traces, e.g. "DualPipeV"
    mirrored = False        # whether every stage is held twice (DualPipe)

    def __init__(self, modules: Sequence[nn.Module], *, p2p_specs: Sequence,
                 group=None, device: Optional[torch.device] = None,
                 weight_grad_store: Optional[WeightGradStore] = None) -> None:
        self.group = group if group is not None else dist.group.WORLD
        self.num_ranks = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        self.validate(self.num_ranks)
        self._check_stage_modules(modules)
        self.modules = tuple(modules)
        if device is None:
            params = [p for m in self.modules for p in m.parameters()]
            device = params[0].device if params else torch.device("cpu")
        self.device = torch.device(device)
        # The schedule owns the store; every deferrable layer of its modules points at it.
        self.weight_grad_store = weight_grad_store or WeightGradStore()
        for module in self.modules:
            attach_weight_grad_store(module, self.weight_grad_store)
        self.comm = P2PComm(self.group, p2p_specs, self.device)
        self._communicators_ready = False

    # ---- the rules each schedule defines -------------------------------------------------

    @staticmethod
    def stages_of_rank(rank: int, num_ranks: int) -> tuple[int, int]:
        raise NotImplementedError

    @staticmethod
    def num_stages(num_ranks: int) -> int:
        raise NotImplementedError

    @classmethod
    def validate(cls, num_ranks: int, num_microbatches: Optional[int] = None) -> None:
        raise NotImplementedError

    @staticmethod
    def microbatches_of_chunk(chunk: int, num_microbatches: int) -> range:
        raise NotImplementedError

    @classmethod
    def is_mirror(cls, chunk: int) -> bool:
        """Whether local chunk `chunk` is the second copy of a stage held elsewhere too."""
        return cls.mirrored and chunk == 1

    @staticmethod
    def paper_bubble(num_ranks: int, f_and_b: float, b: float, w: float) -> float:
        raise NotImplementedError

    def _phases(self, num_microbatches: int) -> Phases:
        raise NotImplementedError

    def _routes(self, num_microbatches: int) -> tuple[ChunkRoute, ChunkRoute]:
        raise NotImplementedError

    def reduce_mirrored_grads(self) -> None:
        """Add the other copy's gradients to each mirrored stage's (DualPipe); a schedule that
        holds every stage once has nothing to add."""

    # ---- one step ------------------------------------------------------------------------

    def step(self, num_microbatches: int, *, inputs: Optional[Sequence[Any]] = None,
             labels: Optional[Sequence[Any]] = None,
             loss_fn: Optional[Callable[[tuple, tuple], torch.Tensor]] = None,
             return_outputs: bool = False, tracer: Optional[Tracer] = None) -> StepResult:
        """Run the forward and backward of `num_microbatches` micro-batches (forward only under
        `torch.no_grad()`); gradients accumulate into the modules' parameters (a mirrored
        schedule's copies each get their own direction's share: then `reduce_mirrored_grads`).

        Args:
            inputs: on a rank holding stage 0: inputs[m] is micro-batch m's input (a tensor or
                a tuple, passed as `module(*inputs[m])`), indexed by micro-batch id; the rank
                reads those of its stage-0 chunk (`microbatches_of_chunk`).
            labels, loss_fn: on a rank holding the last stage: `loss_fn(outputs, labels[m])`
                with outputs the last stage's outputs as a tuple; it must return a scalar.
                Gradients are those of the sum over micro-batches: scale inside loss_fn.
            return_outputs: also return the last stage's outputs.
            tracer: record this rank's ops (trace.py).
        Returns: StepResult with the losses this rank computed (its last-stage chunk's
            micro-batches, in micro-batch order).
        """
        self.validate(self.num_ranks, num_microbatches)
        forward_only = not torch.is_grad_enabled()
        routes = self._routes(num_microbatches)
        self._check_step_data(routes, num_microbatches, inputs, labels, loss_fn, forward_only)
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
        self._run_phases(x, self._phases(num_microbatches))
        x.finish()
        if tracer is not None:
            tracer.finish()
        return StepResult.collect(x)

    @staticmethod
    def _run_phases(x: ChunkExecutor, p: Phases) -> None:
        """The eight steps (module docstring), communication posted lazily (comm.py)."""
        near, far, k, n, m = p.near, p.far, p.k, p.n, p.m

        # Step 1: nF0 -- warm-up: forwards of the near direction until the far one arrives
        step_1 = (n - k - 1) * 2
        for _ in range(step_1):
            x.forward_chunk(near)

        # Step 2: nF0F1 -- alternate near and far forwards (the receive of each next near
        # input is posted one step early; at the turn the near output is passed on at once and
        # the last far output waits for step 4)
        step_2 = k + 1
        x.recv_forward(near)
        for i in range(step_2):
            x.forward_chunk(near, recv=False, send=p.at_turn)
            x.recv_forward(near)
            x.forward_chunk(far, send=not p.at_turn or i < step_2 - 1)
            if not p.at_turn:
                x.send_forward(near)

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
            if i == 0 and p.at_turn:
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

        # Step 6: nB1B0 -- cool-down backwards; from the middle on W is deferred to fill 7, 8
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

    # ---- checks --------------------------------------------------------------------------

    def _check_stage_modules(self, modules: Sequence[nn.Module]) -> None:
        expected = self.stages_of_rank(self.rank, self.num_ranks)
        where = f"{self.name}: rank {self.rank}"
        if len(modules) != 2 or not all(isinstance(m, nn.Module) for m in modules):
            raise ValueError(f"{where} takes two stage modules (stages {expected}), got "
                             f"{len(modules)} objects: {[type(m).__name__ for m in modules]}")
        if modules[0] is modules[1]:
            raise ValueError(f"{where} passed the same module object for stages {expected}; "
                             "each stage needs its own module"
                             + (" (the mirrored copy is a second module with the same "
                                "parameters: see sync_mirrored_parameters)"
                                if self.mirrored else ""))
        for chunk, (module, stage) in enumerate(zip(modules, expected)):
            declared = getattr(module, "stage_index", None)
            if declared is not None and declared != stage:
                raise ValueError(f"{where} chunk {chunk} must hold stage {stage}, but its module "
                                 f"declares stage_index={declared}; on rank r pass the stages "
                                 f"{self.name} places there, here {expected}")

    def _check_step_data(self, routes, num_microbatches: int, inputs, labels, loss_fn,
                         forward_only: bool) -> None:
        for chunk, route in enumerate(routes):
            where = f"{self.name}.step: rank {self.rank} holds stage {route.stage} (chunk {chunk})"
            if route.first_stage and (inputs is None or len(inputs) != num_microbatches):
                raise ValueError(f"{where}, the first stage, so it needs inputs: a sequence of "
                                 f"num_microbatches={num_microbatches} micro-batches indexed by "
                                 "micro-batch id (unused ones may be None)")
            wants_loss = not forward_only or loss_fn is not None
            if route.last_stage and wants_loss and (
                    loss_fn is None or labels is None or len(labels) != num_microbatches):
                raise ValueError(f"{where}, the last stage, so training (or a forward-only "
                                 "step with loss_fn) needs loss_fn and labels: a sequence of "
                                 f"num_microbatches={num_microbatches} label tuples indexed "
                                 "by micro-batch id (unused ones may be None)")
