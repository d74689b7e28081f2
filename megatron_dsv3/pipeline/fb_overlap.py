"""The F&B overlap: the forward of one micro-batch (A) and the backward of another (B) as one
step, their MoE layers' pieces interleaved so that each all-to-all of one hides behind a
compute piece of the other (DeepSeek-V3 report, section 3.2.1).

  forward_backward(fwd, bwd)   the schedules' F&B step: interleaved when both stage modules
                               run their layers through a `PiecewiseLayers`, else F then B
  PiecewiseLayers(layers)      a stage's decoder layers, run as pieces (moe/pieces.py); call it
                               where the stage loops over its layers
  forward_program / backward_program   one micro-batch through a stack of layers, as a
                               generator that yields after each exchange it issues
  run_interleaved / run_sequential     drive two programs alternately, or one to its end

Interleaving (`run_interleaved`). Each micro-batch's work is a generator that runs its compute
up to the next exchange, issues the exchange asynchronously and yields; the waits happen at the
start of the compute piece that needs the result. Per MoE layer each program has three segments:
  forward  fA [combine.wait+run of the layer before] attn, counts issued | fP plan.wait,
           plan.run, dispatch issued | fM dispatch.wait, mlp, combine issued
  backward bC [dispatch.wait, attn of the layer above] combine.run, d y_ND issued |
           bS shared | bM combine.wait, mlp (routed), d x_MD issued
Alternating them, B first (B's first exchange flies while A computes), pairs bC-fA, bS-fP,
bM-fM. An exchange issued at the end of one segment is waited for at the start of that
program's next segment, so the other program's segment in between hides it:
  exchange        issued after   waited for before   hidden behind the other's
  A counts        fA             fP                  bS  (shared experts' backward)
  A dispatch      fP             fM                  bM  (routed experts' backward)
  A combine       fM             fA (next layer)     bC  (attn backward, combine.run)
  B d y_ND        bC             bM                  fA, fP (attn forward, plan)
  B d x_MD        bM             bC (next layer)     fM  (routed + shared experts)
Every exchange has a compute piece of the other micro-batch between its issue and its wait,
and never only fP: the plan is a few index kernels, too little to hide rows behind. That is why
B's extra segment boundary (B has two exchanges per layer, A three) sits after the shared
experts' backward, not after B's attention: there, B's d x_MD would be issued right before fP
and hidden by A's plan alone. The first exchange of a step (B's d y_ND of its last layer) hides
behind A's first attention, the last (A's combine of its last layer) behind B's attention
backward of its first layer. EP=1 runs the same segments (each exchange completes at once):
one trace and one interleaving for every EP size, at the cost of a few generator switches.

Weight gradients inside F&B (`PiecewiseLayers.defer_weight_grads`, on by default): where B
holds more MoE layers than A (a DualPipeV rank pairing 1 MoE layer with 2), B's last segments
run after A's have run out, and their exchanges would wait in the open. With the schedule's
WeightGradStore attached to the layers, each such segment computes input gradients only, issues
its exchange, and then runs its own weight gradients behind it ('B.wgrad.run' in the trace).
The F&B step still returns with every weight gradient computed (the schedule's F&B has no
separate W), and the store's queue of W steps is left as it was (`WeightGradStore.run_last`).

Stage-module contract. A stage that wants the overlap sets `self.piecewise_layers =
PiecewiseLayers(self.layers)` and runs its layers through it in forward, once per forward:
        hidden = self.piecewise_layers(hidden, attention_mask=None)   # [s, b, d] -> [s, b, d]
Everything before and after (embedding, final norm, output head, loss) runs whole. With grad
enabled the call runs the pieces in sequence and returns the output through one autograd node
(`_StackBoundary`) whose backward runs the pieces' backward in sequence and then
`torch.autograd.backward(stack input, its gradient)`, so the stage's plain forward and backward
give the layer-by-layer results. `forward_backward`: B's backward from its loss/outputs runs
whole until it reaches B's boundary, which only hands over its gradient (`capturing`); A's
forward then runs, and its `piecewise_layers` call interleaves A's layer pieces with B's
(`paired_with`); finally B's stack input gets its gradient (B's embedding etc.). The result
is what `run_forward(fwd)` then `run_backward(bwd)` give: the same outputs, loss and gradients
(the CPU tests compare both against a single-process run). No pipeline p2p happens inside: the
schedule posts it around the step.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Generator, Iterator, Optional, Sequence

import torch

from ..moe.async_exchange import AsyncExchange
from ..moe.pieces import DenseLayerRun, MoELayerPieces, check_piecewise_layer, is_moe_layer
from ..weight_grad import WeightGradStore
from .work import BackwardWork, ForwardWork, run_backward, run_forward

Program = Generator[None, None, Optional[torch.Tensor]]  # yields after each exchange it issues

# Trace markers around an F&B interleaving (B's and A's pieces alternating): what is between
# them is the steady state of the schedules (profiling/comm_timing counts its exchanges apart).
PAIR_BEGIN, PAIR_END = "pair.begin", "pair.end"


# ----------------------------------------------------------------------------------------------
# A micro-batch through a stack of layers, as generators, and their interleaving
# ----------------------------------------------------------------------------------------------
def _log(trace: Optional[list], event: str) -> None:
    if trace is not None:
        trace.append(event)


def forward_program(runs: Sequence, hidden: torch.Tensor, trace: Optional[list] = None
                    ) -> Program:
    """Forward of one micro-batch through `runs` (layer order); returns the last output.
    Trace events: 'F{i}.{piece}.{run|issue|wait}' with i the layer's position in the stack;
    'F{i}.plan.issue' marks the end of attn.run, which issued the count exchange. Three
    segments (yields) per MoE layer, after each exchange issued: counts, dispatch, combine."""
    for i, run in enumerate(runs):
        if isinstance(run, DenseLayerRun):
            _log(trace, f"F{i}.layer.run")
            hidden = run.forward(hidden)
            continue
        _log(trace, f"F{i}.attn.run")
        run.attention(hidden)          # ends with the count exchange issued
        _log(trace, f"F{i}.plan.issue")
        yield
        _log(trace, f"F{i}.plan.wait")
        run.wait_plan()
        _log(trace, f"F{i}.plan.run")
        run.plan()
        _log(trace, f"F{i}.dispatch.issue")
        run.start_dispatch()
        yield
        _log(trace, f"F{i}.dispatch.wait")
        run.finish_dispatch()
        _log(trace, f"F{i}.mlp.run")
        run.mlp()
        _log(trace, f"F{i}.combine.issue")
        run.start_combine()
        yield
        _log(trace, f"F{i}.combine.wait")
        _log(trace, f"F{i}.combine.run")
        hidden = run.combine()
    return hidden


def backward_program(runs: Sequence, grad: torch.Tensor, trace: Optional[list] = None
                     ) -> Program:
    """Backward of one micro-batch through `runs` (after their forward), last layer first;
    returns the gradient of the first layer's input. Trace events 'B{i}.{piece}.{action}'.
    Three segments per MoE layer, as the forward has: after the combine exchange is issued,
    after the shared experts' backward (nothing issued: it pairs with the forward's tiny plan
    segment), after the dispatch exchange is issued (module note)."""
    for i in reversed(range(len(runs))):
        run = runs[i]
        if isinstance(run, DenseLayerRun):
            _log(trace, f"B{i}.layer.run")
            grad = run.backward(grad)
            continue
        _log(trace, f"B{i}.combine.run")
        run.combine_backward(grad)
        _log(trace, f"B{i}.combine.issue")
        run.start_combine_backward()
        yield
        _log(trace, f"B{i}.shared.run")
        run.shared_backward()
        yield
        _log(trace, f"B{i}.combine.wait")
        run.finish_combine_backward()
        _log(trace, f"B{i}.mlp.run")
        run.mlp_backward()
        _log(trace, f"B{i}.dispatch.issue")
        run.start_dispatch_backward()
        yield
        _log(trace, f"B{i}.dispatch.wait")
        _log(trace, f"B{i}.attn.run")
        grad = run.attention_backward()
    return grad


def run_sequential(program: Program) -> Optional[torch.Tensor]:
    """Run one program to its end (each exchange waited right after it is issued)."""
    while True:
        try:
            next(program)
        except StopIteration as stop:
            return stop.value


def run_interleaved(first: Program, second: Program,
                    first_weight_grads: Optional[WeightGradStore] = None,
                    trace: Optional[list] = None
                    ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Alternate the two programs, each running until it has issued its next exchange, so that
    one's exchange is in flight while the other computes; return both results.

    first_weight_grads: the store `first`'s layers (a backward) defer their weight gradients
    to. Once `second` has run out of segments (it held fewer MoE layers), each further segment
    of `first` computes input gradients only, issues its exchange, and runs its weight
    gradients right after ('B.wgrad.run' in `trace`), with the exchange in flight: otherwise
    nothing would stand between that exchange and its wait. While both programs run, nothing
    changes (the pairing above hides every exchange already)."""
    programs, results, live = (first, second), [None, None], [True, True]
    while any(live):
        for k in (0, 1):
            if not live[k]:
                continue
            store = first_weight_grads if k == 0 and not live[1] else None
            try:
                if store is None:
                    next(programs[k])
                else:
                    with store.deferring(label=_FB_WEIGHT_GRADS):
                        next(programs[k])
            except StopIteration as stop:
                results[k], live[k] = stop.value, False
            if store is not None:
                _log(trace, "B.wgrad.run")
                store.run_last()
    return results[0], results[1]


_FB_WEIGHT_GRADS = "F&B weight gradients"  # the label of the groups run_interleaved runs


def _weight_grad_store_of(layers) -> Optional[WeightGradStore]:
    """The store the layers' deferrable GEMMs hold (a schedule attaches one to its stages), or
    None: then their weight gradients run inside their backward."""
    for layer in layers:
        for module in layer.modules():
            store = getattr(module, "weight_grad_store", None)
            if store is not None:
                return store
    return None


# ----------------------------------------------------------------------------------------------
# Stage-module side: the layer stack and the F&B step
# ----------------------------------------------------------------------------------------------
@dataclass(eq=False)
class _StackRun:
    """One micro-batch through a PiecewiseLayers: what its backward needs."""
    owner: "PiecewiseLayers"
    hidden_in: torch.Tensor            # the stack's input, with the graph that produced it
    runs: list
    output: Optional[torch.Tensor] = None

    def backward_program(self, grad: torch.Tensor) -> Program:
        return backward_program(self.runs, grad, self.owner.trace)

    def feed_input_grad(self, grad_in: Optional[torch.Tensor]) -> None:
        """The stack input's gradient into whatever produced it (embedding, received leaf)."""
        if grad_in is not None and self.hidden_in.requires_grad:
            torch.autograd.backward(self.hidden_in, grad_in)
        self.runs, self.hidden_in = [], None


class _StackBoundary(torch.autograd.Function):
    """The stack's output as one autograd node (module note). The stack's input is not an
    autograd input here (it is fed in `feed_input_grad`), so that a captured backward leaves
    the graph before the stack untouched; `anchor` (an empty leaf) only puts the node in the
    graph."""

    @staticmethod
    def forward(ctx, anchor: torch.Tensor, stack_run: _StackRun) -> torch.Tensor:
        ctx.stack_run = stack_run
        return stack_run.output.detach()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        stack_run, ctx.stack_run = ctx.stack_run, None
        stack_run.owner._reached_in_backward(stack_run, grad)
        return None, None


@dataclass(eq=False)
class PairedBackward:
    """B's layer-stack backward, captured to be interleaved with A's forward."""
    stack_run: _StackRun
    grad: torch.Tensor
    input_grad: Optional[torch.Tensor] = None
    done: bool = False

    def finish(self) -> None:
        """B's layers (if no forward interleaved them), then B's part before its layers."""
        if not self.done:
            self.input_grad = run_sequential(self.stack_run.backward_program(self.grad))
            self.done = True
        self.stack_run.feed_input_grad(self.input_grad)


@dataclass(eq=False)
class PiecewiseLayers:
    """A stage's decoder layers run as pieces; call it where the stage loops over its layers:
        hidden = self.piecewise_layers(hidden, attention_mask=mask)   # [s, b, d] -> [s, b, d]
    The layers stay registered in the stage module (this object only refers to them).
    Without grad (inference, forward-only steps) the layers run whole.

    trace: a list to which the pieces append their events (tests, timelines).
    exchange: what runs the pieces' all-to-alls (profiling.comm_timing.TimedExchange stamps
        them).
    defer_weight_grads: in an F&B step whose B outlasts A, B's remaining segments defer their
        weight gradients to the store a schedule attached to the layers and run them behind
        B's exchanges (module note); no effect without an attached store or where A and B pair
        layer for layer."""
    layers: Sequence[torch.nn.Module]
    trace: Optional[list] = None
    exchange: AsyncExchange = field(default_factory=AsyncExchange, repr=False)
    defer_weight_grads: bool = True
    _captured: Optional[list] = field(default=None, repr=False)
    _paired: Optional[PairedBackward] = field(default=None, repr=False)

    def __post_init__(self) -> None:
        for layer in self.layers:
            if is_moe_layer(layer):
                check_piecewise_layer(layer)

    def __call__(self, hidden: torch.Tensor, **layer_kwargs) -> torch.Tensor:
        for name in ("inference_context", "packed_seq_params"):
            if layer_kwargs.get(name) is not None:
                raise ValueError(f"PiecewiseLayers: {name} is not supported; call the layers "
                                 "directly for inference or packed sequences")
        if not torch.is_grad_enabled():
            for layer in self.layers:
                hidden, _ = layer(hidden_states=hidden, **layer_kwargs)
            return hidden
        runs = [MoELayerPieces(layer, self.exchange, layer_kwargs) if is_moe_layer(layer)
                else DenseLayerRun(layer, layer_kwargs) for layer in self.layers]
        stack_run = _StackRun(self, hidden, runs)
        forward = forward_program(runs, hidden, self.trace)  # each piece cuts its own input
        paired, self._paired = self._paired, None
        if paired is None:
            stack_run.output = run_sequential(forward)
        else:  # backward of B first: its combine exchange flies while A's attention computes
            _log(self.trace, PAIR_BEGIN)
            store = (_weight_grad_store_of(paired.stack_run.owner.layers)
                     if self.defer_weight_grads else None)
            paired.input_grad, stack_run.output = run_interleaved(
                paired.stack_run.backward_program(paired.grad), forward, store, self.trace)
            _log(self.trace, PAIR_END)
            paired.done = True
        anchor = torch.empty(0, device=hidden.device, requires_grad=True)
        return _StackBoundary.apply(anchor, stack_run)

    @contextmanager
    def capturing(self) -> Iterator[list]:
        """Inside, a backward that reaches this stack's output stops there: the list receives
        (stack run, output gradient) instead of the layers' backward running."""
        self._captured = captured = []
        try:
            yield captured
        finally:
            self._captured = None

    @contextmanager
    def paired_with(self, paired: Optional[PairedBackward]) -> Iterator[None]:
        """Inside, the next call of this stack interleaves its forward with `paired`."""
        self._paired = paired
        try:
            yield
        finally:
            self._paired = None

    def _reached_in_backward(self, stack_run: _StackRun, grad: torch.Tensor) -> None:
        if self._captured is not None:
            self._captured.append((stack_run, grad))
        else:
            stack_run.feed_input_grad(run_sequential(stack_run.backward_program(grad)))


def layer_stack(module: torch.nn.Module) -> Optional[PiecewiseLayers]:
    """The stage module's `piecewise_layers`, or None: it runs its layers whole."""
    stack = getattr(module, "piecewise_layers", None)
    if stack is not None and not isinstance(stack, PiecewiseLayers):
        raise TypeError(f"{type(module).__name__}.piecewise_layers is a "
                        f"{type(stack).__name__}, not a PiecewiseLayers")
    return stack


def forward_backward(fwd: ForwardWork, bwd: BackwardWork
                     ) -> tuple[tuple, Optional[torch.Tensor]]:
    """The F&B step: forward of fwd's micro-batch A and backward of bwd's micro-batch B, with
    their MoE layers' pieces interleaved when both stage modules have a layer stack; returns
    what `run_forward(fwd)` returns and leaves the gradients `run_backward(bwd)` leaves."""
    fwd_stack, bwd_stack = layer_stack(fwd.module), layer_stack(bwd.module)
    if fwd_stack is None or bwd_stack is None:
        outputs, loss = run_forward(fwd)
        run_backward(bwd)
        return outputs, loss
    # Step 1: B's backward after its layers (loss, head, final norm), whole; B's layer stack
    # keeps its output gradient instead of running.
    with bwd_stack.capturing() as captured:
        run_backward(bwd)
    if len(captured) > 1:
        raise RuntimeError(f"{type(bwd.module).__name__}: B's backward reached {len(captured)} "
                           "piecewise layer stacks; a stage may run its layers through one "
                           "PiecewiseLayers call per forward")
    paired = PairedBackward(*captured[0]) if captured else None
    # Step 2: A's forward; its layer stack interleaves A's pieces with B's.
    with fwd_stack.paired_with(paired):
        outputs, loss = run_forward(fwd)
    # Step 3: B's layers (if A's forward had no stack call to pair with), then B before them.
    if paired is not None:
        paired.finish()
    return outputs, loss


__all__ = ["PAIR_BEGIN", "PAIR_END", "PairedBackward", "PiecewiseLayers", "backward_program",
           "forward_backward", "forward_program", "layer_stack", "run_interleaved",
           "run_sequential"]
