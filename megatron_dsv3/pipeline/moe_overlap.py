"""DualPipe's computation-communication overlap for our MoE layers: a TransformerLayer run as
five pieces, and the F&B hook that interleaves the pieces of two micro-batches.

Shape legend (moe/dispatcher.py): s, b, d the layer's [seq, batch, hidden]; T = s*b tokens;
N = T*K routed rows of this rank's tokens; M rows this rank's experts receive.

Pieces of one MoE layer (`MoELayerPieces`; the layer's own submodules and methods, in the order
`TransformerLayer.forward` and `DeepSeekMoE.forward` run them, so the math is theirs):
  attn      compute  h [s,b,d] -> input_layernorm, MLA, residual (`_forward_attention`),
                     pre_mlp_layernorm, `DeepSeekMoE.route_start`: router, gates, sort by
                     expert; ends by issuing, with EP, the count exchange (E int64 counts)
                     out: mid [s,b,d] (the residual), x_TD (shared experts' input), x_ND (rows
                     to send), gates_TK
  plan      comm     the count exchange's wait (`wait_plan`); then compute
                     (`DeepSeekMoE.route_finish`): the split sizes on the host (the one host
                     sync, for the counts only) and the regrouping index
  dispatch  comm     x_ND -> x_MD: all-to-all of the rows over the EP group (EP=1: nothing)
  mlp       compute  x_MD -> y_MD: to expert order, routed experts, back to source order;
                     x_TD -> shared_TD (shared experts)
  combine   comm     y_MD -> y_ND: the reverse all-to-all; then compute: un-permute,
                     gate-weighted sum, TP reduce, + shared_TD, residual (`combine_output`,
                     `_forward_post_mlp`) -> the layer's output h' [s,b,d]
Dense layers (first_k_dense) run whole, as one compute piece.

Each compute piece starts from leaves (`detach().requires_grad_()` of what it receives; the
detach shares storage, nothing is copied) and keeps its outputs with their autograd graph:
what it saves for backward is what the unsplit layer saves for the same ops:
  attn      the norms', MLA's and the router's activations
  plan      nothing with a graph: the route (permutation indices, split sizes, counts) that
            the later pieces read
  mlp       the routed experts' and shared experts' activations (x_MD, the SwiGLU inputs)
  combine   y_ND, the gates and the residual for the weighted sum and the residual add
  dispatch, combine's exchange: only the split sizes (in the route)
A compute piece's backward is one `torch.autograd.backward(outputs, received gradients)` (mlp's:
two, below), after which its leaves hold the gradients to send on. The exchanges have no graph:
their backward is the reverse exchange of the gradient rows (what `_AllToAllRows.backward`
does), run explicitly so that it can be asynchronous too; the count exchange and the plan have
none (integers).
Backward order per layer: combine (its compute part, then the exchange of d y_ND), the shared
experts (`shared_backward`: their gradient comes from combine's compute, so they run while
d y_ND is in flight; their graph shares nothing with the routed experts', so splitting mlp's
backward in two changes no value), the routed experts (`mlp_backward`), dispatch (the exchange
of d x_MD), attn. Every piece frees what it held as soon as its backward has run.

Overlap (`run_interleaved`): each micro-batch's work is a generator that runs its compute up to
the next exchange, issues the exchange asynchronously and yields; the waits happen at the start
of the compute piece that needs the result. Per MoE layer each program has three segments:
  forward  fA [combine.wait+run of the layer before] attn, counts issued | fP plan.wait,
           plan.run, dispatch issued | fM dispatch.wait, mlp, combine issued
  backward bC [dispatch.wait, attn of the layer above] combine.run, d y_ND issued |
           bS shared | bM combine.wait, mlp (routed), d x_MD issued
Alternating them, B first (B's first exchange flies while A computes), pairs bC-fA, bS-fP,
bM-fM. An exchange issued at the end of one segment is waited for at the start of that
program's next segment, so the other program's segment in between hides it:
  B.combine(issue) | A.attn, A.counts(issue) | B.shared | A.plan(wait, run),
  A.dispatch(issue) | B.combine(wait), B.mlp, B.dispatch(issue) | A.dispatch(wait), A.mlp,
  A.combine(issue) | B.dispatch(wait), B.attn, B.combine of the next layer (issue) |
  A.combine(wait, run), A.attn of the next layer, A.counts(issue) | B.shared ...
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

Streams and events (`AsyncExchange`, the only device-specific code): on GPU the all-to-alls are
issued on a side CUDA stream (`comm.CommStream`) that first waits for the compute stream (the
rows are ready), with `async_op=True`; finishing waits for the work on the side stream, then
makes the compute stream wait for the side stream. Buffers are allocated on the compute
stream, and the sent rows are kept alive until the wait, so no `record_stream` is needed. On
CPU (gloo) the same calls run: gloo executes the async all-to-all on its own threads while
the host computes the other micro-batch. The count exchange (`AsyncExchange.counts`,
`AsyncCounts`) also runs on the side stream and copies its counts to pinned host memory there;
the plan's host wait is for that copy's event alone, so the device keeps computing what B's
segment queued meanwhile (a `.tolist()` on the compute stream would have waited for all of it,
and the device would have idled while the host issued the next kernels). By default the counts
travel on the EP group's communicator, in issue order behind any row exchange issued before
them (B's d y_ND), which the B segment in between (bS) covers; `AsyncExchange(count_groups=)`
sends them over a duplicate of the EP group on their own stream instead.

Stage-module contract (`PiecewiseLayers`, `MoEOverlapStage`, `overlapped_forward_backward`):
a stage runs its decoder layers through `self.piecewise_layers(hidden, **layer_kwargs)`.
With grad enabled that call runs the pieces in sequence and returns the output through one
autograd node (`_StackBoundary`) whose backward runs the pieces' backward in sequence and then
`torch.autograd.backward(stack input, its gradient)`, so the stage's plain forward and backward
(`run_forward`, `run_backward`) give the layer-by-layer results. The F&B hook: B's backward
from its loss/outputs runs whole until it reaches B's boundary, which only hands over its
gradient (capture); A's forward then runs, and its `piecewise_layers` call interleaves A's
layer pieces with B's; finally B's stack input gets its gradient (B's embedding etc.).

Weight gradients inside F&B (`PiecewiseLayers.defer_weight_grads`, on by default): where B
holds more MoE layers than A (a DualPipeV rank pairing 1 MoE layer with 2), B's last segments
run after A's have run out, and their exchanges would wait in the open. With the schedule's
WeightGradStore attached to the layers (DualPipe / DualPipeV attach theirs), each such segment
computes input gradients only, issues its exchange, and then runs its own weight gradients
behind it (`run_interleaved(first_weight_grads=)`, 'B.wgrad.run' in the trace). The F&B step
still returns with every weight gradient computed, as the contract asks, and the store's queue
of W steps is left as it was (`WeightGradStore.run_last`).

Not done: recompute, fp32 residuals, chunked MLPs, packed sequences (refused with an
error).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Generator, Mapping, Optional, Sequence

import torch
import torch.distributed as dist

from ..moe.layer import DeepSeekMoE, MoERoute, MoERouteStart
from .comm import CommStream
from .overlap import BackwardWork, ForwardWork, run_backward, run_forward
from .weight_grad import WeightGradStore

Program = Generator[None, None, Optional[torch.Tensor]]  # yields after each exchange it issues


# ----------------------------------------------------------------------------------------------
# Asynchronous all-to-all (the one device-specific place)
# ----------------------------------------------------------------------------------------------
@dataclass
class _Pending:
    output: torch.Tensor
    work: Any = None                      # torch.distributed Work, None when nothing was sent
    sent: Optional[torch.Tensor] = None   # kept alive until the wait
    stream: Optional[CommStream] = None


@dataclass(eq=False)
class _PendingCounts:
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

    def start(self, send_PL: torch.Tensor, group) -> _PendingCounts:
        if self.groups:
            group = self.groups.get(tuple(dist.get_process_group_ranks(group)), group)
        P, L = send_PL.shape
        send = send_PL.contiguous()
        recv_PL = torch.empty_like(send)
        if send.device.type != "cuda":
            work = dist.all_to_all_single(recv_PL, send, group=group, async_op=True)
            return _PendingCounts(recv_PL, (send,), work=work)
        host_2PL = torch.empty((2, P, L), dtype=send.dtype, pin_memory=True)
        stream = self._stream_of(send.device)
        stream.wait_compute()
        with stream:
            dist.all_to_all_single(recv_PL, send, group=group, async_op=True).wait()
            staged_2PL = torch.stack([send, recv_PL])
            host_2PL.copy_(staged_2PL, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        return _PendingCounts(recv_PL, (send, staged_2PL), host_2PL, event)

    @staticmethod
    def finish(pending: _PendingCounts) -> tuple[torch.Tensor, torch.Tensor]:
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
              input_splits: Optional[list[int]]) -> _Pending:
        if group is None:  # no expert parallelism: the rows stay here
            return _Pending(rows)
        rows = rows.contiguous()
        output = rows.new_empty((sum(output_splits),) + tuple(rows.shape[1:]))
        stream = self._stream(rows.device)
        stream.wait_compute()
        with stream:
            work = dist.all_to_all_single(output, rows, output_splits, input_splits, group=group,
                                          async_op=True)
        return _Pending(output, work, rows, stream)

    @staticmethod
    def finish(pending: _Pending) -> torch.Tensor:
        if pending.work is not None:
            with pending.stream:
                pending.work.wait()
            pending.stream.compute_waits()
        return pending.output


def _exchange_rows(exchange: AsyncExchange, rows: torch.Tensor, moe: DeepSeekMoE,
                   route: MoERoute, toward_experts: bool) -> _Pending:
    group = moe.dispatcher.ep_group
    splits = (moe.dispatcher.row_splits(route.state, toward_experts) if group is not None
              else (None, None))
    return exchange.start(rows, group, *splits)


# ----------------------------------------------------------------------------------------------
# One layer, one micro-batch
# ----------------------------------------------------------------------------------------------
def _leaf(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Where a piece starts: the received tensor, cut from the previous piece's graph."""
    if t is None:
        return None
    return t.detach().requires_grad_(t.requires_grad)


def _grad_or_zeros(leaf: torch.Tensor) -> torch.Tensor:
    return leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)


def _backward(outputs: Sequence[Optional[torch.Tensor]],
              grads: Sequence[Optional[torch.Tensor]]) -> None:
    pairs = [(o, g) for o, g in zip(outputs, grads)
             if o is not None and g is not None and o.requires_grad]
    if pairs:
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])


def check_piecewise_layer(layer) -> None:
    """Refuse TransformerLayer settings whose code path the pieces do not reproduce."""
    config = layer.config
    unsupported = {"recompute_input_layernorm": layer.recompute_input_layernorm,
                   "recompute_pre_mlp_layernorm": layer.recompute_pre_mlp_layernorm,
                   "recompute_mlp": layer.recompute_mlp,
                   "fp32_residual_connection": config.fp32_residual_connection,
                   "mlp_chunks_for_training > 1": config.mlp_chunks_for_training > 1}
    on = [name for name, value in unsupported.items() if value]
    if on:
        raise ValueError(f"layer {layer.layer_number}: {on} is not supported by the piecewise "
                         "MoE layer (pipeline/moe_overlap.py); switch it off for DualPipe "
                         "overlap, or run the stage's layers whole")


class MoELayerPieces:
    """One MoE TransformerLayer (mlp = DeepSeekMoE) run for one micro-batch as pieces.

    Forward: attention(h), wait_plan(), plan(), start_dispatch(), finish_dispatch(), mlp(),
    start_combine(), combine() -> h'. Backward (after the forward): combine_backward(dh'),
    start_combine_backward(), shared_backward(), finish_combine_backward(), mlp_backward(),
    start_dispatch_backward(), attention_backward() -> dh. `forward`/`backward` run them in
    sequence."""

    def __init__(self, layer, exchange: AsyncExchange, layer_kwargs: Optional[dict] = None):
        if not isinstance(layer.mlp, DeepSeekMoE):
            raise TypeError(f"layer {layer.layer_number}: mlp is {type(layer.mlp).__name__}, "
                            "not DeepSeekMoE; run it whole (DenseLayerRun)")
        check_piecewise_layer(layer)
        self.layer, self.moe, self.exchange = layer, layer.mlp, exchange
        self.kwargs = layer_kwargs or {}
        self._pending: Optional[_Pending] = None
        self._route_start: Optional[MoERouteStart] = None

    # ---- forward ----------------------------------------------------------------------

    def attention(self, hidden: torch.Tensor) -> None:
        """Attention, router, gates, sort; ends with the count exchange issued (EP)."""
        self.h_in = _leaf(hidden)
        mid, _ = self.layer._forward_attention(self.h_in, **self.kwargs)
        started = self.moe.route_start(self.layer._forward_pre_mlp_layernorm(mid),
                                       counts=self.exchange.counts)
        self._route_start = started
        self.attn_out = (mid, started.x_TD, started.plan.x_ND, started.gates_TK)
        self.mid = _leaf(mid)
        self.x_TD, self.gates_TK = _leaf(started.x_TD), _leaf(started.gates_TK)

    def wait_plan(self) -> None:
        """The wait for the count exchange (EP; nothing without)."""
        self._route_start.plan.wait()

    def plan(self) -> None:
        """The split sizes and the regrouping index (`DeepSeekMoE.route_finish`)."""
        started, self._route_start = self._route_start, None
        self.route = self.moe.route_finish(started)

    def start_dispatch(self) -> None:
        self._pending = _exchange_rows(self.exchange, self.route.x_ND.detach(), self.moe,
                                       self.route, toward_experts=True)

    def finish_dispatch(self) -> None:
        x_MD = self.exchange.finish(self._take())  # a fresh tensor: the exchange's output
        self.x_MD = x_MD.requires_grad_(self.route.x_ND.requires_grad)

    def mlp(self) -> None:
        y_MD = self.moe.routed_experts(self.x_MD, self.route)
        shared_TD = self.moe.shared_experts_output(self.x_TD)
        self.mlp_out = (y_MD, shared_TD)
        self.shared_TD = _leaf(shared_TD)

    def start_combine(self) -> None:
        self._pending = _exchange_rows(self.exchange, self.mlp_out[0].detach(), self.moe,
                                       self.route, toward_experts=False)

    def combine(self) -> torch.Tensor:
        y_ND = self.exchange.finish(self._take())  # a fresh tensor: the exchange's output
        self.y_ND = y_ND.requires_grad_(self.mlp_out[0].requires_grad)
        out = self.moe.combine_output(self.y_ND, self.gates_TK, self.shared_TD, self.route)
        self.output = self.layer._forward_post_mlp((out, None), self.mid)
        return self.output

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        self.attention(hidden)
        self.wait_plan()
        self.plan()
        self.start_dispatch()
        self.finish_dispatch()
        self.mlp()
        self.start_combine()
        return self.combine()

    # ---- backward ---------------------------------------------------------------------

    def combine_backward(self, grad_output: torch.Tensor) -> None:
        _backward((self.output,), (grad_output,))
        self.output = None

    def start_combine_backward(self) -> None:
        self._pending = _exchange_rows(self.exchange, _grad_or_zeros(self.y_ND), self.moe,
                                       self.route, toward_experts=True)
        self.y_ND = None

    def shared_backward(self) -> None:
        """The shared experts' backward: its gradient came from combine's compute, not over
        the wire, so it runs while d y_ND is in flight. Its graph (x_TD leaf -> shared_TD) and
        the routed experts' (x_MD -> y_MD) share no tensor, so two backward calls give what
        one gives."""
        y_MD, shared_TD = self.mlp_out
        if shared_TD is not None:
            _backward((shared_TD,), (self.shared_TD.grad,))
        self.mlp_out, self.shared_TD = (y_MD, None), None

    def finish_combine_backward(self) -> None:
        self._grad_y_MD = self.exchange.finish(self._take())

    def mlp_backward(self) -> None:
        """The routed experts' backward (after `shared_backward`)."""
        _backward(self.mlp_out[:1], (self._grad_y_MD,))
        self.mlp_out = self._grad_y_MD = None

    def start_dispatch_backward(self) -> None:
        self._pending = _exchange_rows(self.exchange, _grad_or_zeros(self.x_MD), self.moe,
                                       self.route, toward_experts=False)
        self.x_MD = None

    def attention_backward(self) -> Optional[torch.Tensor]:
        grad_x_ND = self.exchange.finish(self._take())
        _backward(self.attn_out, (self.mid.grad, self.x_TD.grad, grad_x_ND, self.gates_TK.grad))
        grad_in = self.h_in.grad
        self.attn_out = self.mid = self.x_TD = self.gates_TK = self.route = self.h_in = None
        return grad_in

    def backward(self, grad_output: torch.Tensor) -> Optional[torch.Tensor]:
        self.combine_backward(grad_output)
        self.start_combine_backward()
        self.shared_backward()
        self.finish_combine_backward()
        self.mlp_backward()
        self.start_dispatch_backward()
        return self.attention_backward()

    def _take(self) -> _Pending:
        pending, self._pending = self._pending, None
        assert pending is not None, "a piece finished an exchange that was never started"
        return pending


class DenseLayerRun:
    """A layer without MoE (first_k_dense), one micro-batch, as one compute piece."""

    def __init__(self, layer, layer_kwargs: Optional[dict] = None):
        self.layer, self.kwargs = layer, layer_kwargs or {}

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        self.h_in = _leaf(hidden)
        self.output, _ = self.layer(hidden_states=self.h_in, **self.kwargs)
        return self.output

    def backward(self, grad_output: torch.Tensor) -> Optional[torch.Tensor]:
        _backward((self.output,), (grad_output,))
        grad_in, self.output, self.h_in = self.h_in.grad, None, None
        return grad_in


# ----------------------------------------------------------------------------------------------
# A micro-batch through a stack of layers, as generators, and their interleaving
# ----------------------------------------------------------------------------------------------
# Trace markers around an F&B interleaving (B's and A's pieces alternating): what is between
# them is the steady state of the schedules (comm_timing counts its exchanges apart).
PAIR_BEGIN, PAIR_END = "pair.begin", "pair.end"


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
# Stage-module side: the layer stack and the F&B hook
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
        captured = stack_run.owner._captured
        if captured is not None:
            captured.append((stack_run, grad))
        else:
            stack_run.feed_input_grad(run_sequential(stack_run.backward_program(grad)))
        return None, None


@dataclass(eq=False)
class _PairedBackward:
    """B's layer-stack backward, waiting for A's forward to interleave with it."""
    stack_run: _StackRun
    grad: torch.Tensor
    input_grad: Optional[torch.Tensor] = None
    done: bool = False


@dataclass(eq=False)
class PiecewiseLayers:
    """A stage's decoder layers run as pieces; call it where the stage loops over its layers:
        hidden = self.piecewise_layers(hidden, attention_mask=mask)   # [s, b, d] -> [s, b, d]
    The layers stay registered in the stage module (this object only refers to them).
    Without grad (inference, forward-only steps) the layers run whole. `trace`: a list to
    which the pieces append their events (tests, timelines). `exchange`: what runs the pieces'
    all-to-alls (comm_timing.TimedExchange stamps them). `defer_weight_grads`: in an F&B step
    whose B outlasts A, B's remaining segments defer their weight gradients to the store a
    schedule attached to them and run them behind B's exchange (`run_interleaved`; PP=2 x EP=2
    on 4 H200s: DualPipeV's hidden all-to-all 80.5-80.9% -> 88.0-89.1%, step 2% shorter); no
    effect without an attached store or where A and B pair layer for layer."""
    layers: Sequence[torch.nn.Module]
    trace: Optional[list] = None
    exchange: AsyncExchange = field(default_factory=AsyncExchange, repr=False)
    defer_weight_grads: bool = True
    _captured: Optional[list] = field(default=None, repr=False)
    _paired: Optional[_PairedBackward] = field(default=None, repr=False)

    def __post_init__(self) -> None:
        for layer in self.layers:
            if isinstance(getattr(layer, "mlp", None), DeepSeekMoE):
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
        runs = [MoELayerPieces(layer, self.exchange, layer_kwargs)
                if isinstance(getattr(layer, "mlp", None), DeepSeekMoE)
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


def _piecewise_layers_of(module) -> PiecewiseLayers:
    stack = getattr(module, "piecewise_layers", None)
    if not isinstance(stack, PiecewiseLayers):
        raise TypeError(f"{type(module).__name__} has no `piecewise_layers`: a stage using "
                        "MoEOverlapStage sets self.piecewise_layers = PiecewiseLayers(layers) "
                        "and runs its layers through it in forward")
    return stack


def overlapped_forward_backward(fwd: ForwardWork, bwd: BackwardWork
                                ) -> tuple[tuple, Optional[torch.Tensor]]:
    """The F&B hook (pipeline/overlap.py contract): forward of fwd's micro-batch A and
    backward of bwd's micro-batch B, their MoE layers' pieces interleaved; same results as
    `run_forward(fwd)` then `run_backward(bwd)`."""
    fwd_stack, bwd_stack = _piecewise_layers_of(fwd.module), _piecewise_layers_of(bwd.module)
    # Step 1: B's backward after its layers (loss, head, final norm), whole; B's layer stack
    # keeps its output gradient instead of running.
    bwd_stack._captured = captured = []
    try:
        run_backward(bwd)
    finally:
        bwd_stack._captured = None
    if len(captured) > 1:
        raise RuntimeError(f"{type(bwd.module).__name__}: B's backward reached {len(captured)} "
                           "piecewise layer stacks; a stage may run its layers through one "
                           "PiecewiseLayers call per forward")
    paired = _PairedBackward(*captured[0]) if captured else None
    # Step 2: A's forward; its layer stack interleaves A's pieces with B's.
    fwd_stack._paired = paired
    try:
        outputs, loss = run_forward(fwd)
    finally:
        fwd_stack._paired = None
    # Step 3: B's layers (if A's forward had no stack to pair with), then B before its layers.
    if paired is not None:
        if not paired.done:
            paired.input_grad = run_sequential(paired.stack_run.backward_program(paired.grad))
        paired.stack_run.feed_input_grad(paired.input_grad)
    return outputs, loss


class MoEOverlapStage:
    """Mixin giving a pipeline stage module the F&B hook. Adoption (pipeline/model_stages.py):

        class DecoderStage(MoEOverlapStage, torch.nn.Module):
            def __init__(...):
                ...
                self.layers = torch.nn.ModuleList(...)        # TransformerLayers from our specs
                self.piecewise_layers = PiecewiseLayers(self.layers)
            def forward(self, hidden):                         # or input ids on stage 0
                hidden = <embedding on stage 0>
                hidden = self.piecewise_layers(hidden, attention_mask=None)
                return <final norm on the last stage>(hidden)

    Everything before and after the layer call runs whole; the loss (`loss_fn`) too. Both chunks
    of a rank must be of the same class (the schedule's rule) and each forward must make at most
    one `piecewise_layers` call."""

    def overlapped_forward_backward(self, fwd: ForwardWork, bwd: BackwardWork):
        return overlapped_forward_backward(fwd, bwd)


__all__ = ["PAIR_BEGIN", "PAIR_END", "AsyncExchange", "DenseLayerRun", "MoELayerPieces",
           "MoEOverlapStage", "PiecewiseLayers", "backward_program", "check_piecewise_layer", "forward_program",
           "overlapped_forward_backward", "run_interleaved", "run_sequential"]
