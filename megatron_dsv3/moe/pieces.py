"""A MoE TransformerLayer run as pieces, so that the pieces of two micro-batches can interleave
(the F&B overlap, pipeline/fb_overlap.py) and each all-to-all hides behind the other's compute.

Shape legend (moe/dispatcher.py): s, b, d the layer's [seq, batch, hidden]; T = s*b tokens;
N = T*K routed rows of this rank's tokens; M rows this rank's experts receive.

Pieces of one MoE layer (`MoELayerPieces`; the layer's own submodules and methods, in the order
`TransformerLayer.forward` and `DeepSeekMoE.forward` run them, so the math is theirs; the
TransformerLayer parts through megatron_compat):
  attn      compute  h [s,b,d] -> input_layernorm, MLA, residual (`layer_attention`),
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
                     `layer_post_mlp`) -> the layer's output h' [s,b,d]
Dense layers (first_k_dense) run whole, as one compute piece (`DenseLayerRun`).

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
their backward is the reverse exchange of the gradient rows (what the dispatcher's
`_AllToAllRows.backward` does), run explicitly so that it can be asynchronous too; the count
exchange and the plan have none (integers).
Backward order per layer: combine (its compute part, then the exchange of d y_ND), the shared
experts (`shared_backward`: their gradient comes from combine's compute, so they run while
d y_ND is in flight; their graph shares nothing with the routed experts', so splitting mlp's
backward in two changes no value), the routed experts (`mlp_backward`), dispatch (the exchange
of d x_MD), attn. Every piece frees what it held as soon as its backward has run.

The exchanges run through an `AsyncExchange` (moe/async_exchange.py): started by one method
(`start_dispatch`, ...) and finished by the next, so that a caller may run other work between.

Not done: recompute, fp32 residuals, chunked MLPs, packed sequences (refused with an error).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..megatron_compat import layer_attention, layer_post_mlp, layer_pre_mlp_norm
from .async_exchange import AsyncExchange, PendingRows
from .layer import DeepSeekMoE, MoERoute, MoERouteStart


def is_moe_layer(layer) -> bool:
    """Whether a TransformerLayer's MLP is our DeepSeekMoE (else it runs whole)."""
    return isinstance(getattr(layer, "mlp", None), DeepSeekMoE)


def _exchange_rows(exchange: AsyncExchange, rows: torch.Tensor, moe: DeepSeekMoE,
                   route: MoERoute, toward_experts: bool):
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
                         "MoE layer (moe/pieces.py); switch it off for DualPipe "
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
        self._pending: Optional[PendingRows] = None
        self._route_start: Optional[MoERouteStart] = None

    # ---- forward ----------------------------------------------------------------------

    def attention(self, hidden: torch.Tensor) -> None:
        """Attention, router, gates, sort; ends with the count exchange issued (EP)."""
        self.h_in = _leaf(hidden)
        mid = layer_attention(self.layer, self.h_in, **self.kwargs)
        started = self.moe.route_start(layer_pre_mlp_norm(self.layer, mid),
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
        rows = self.moe.dispatcher.to_wire(self.route.x_ND.detach())  # FP8-packed or as is
        self._pending = _exchange_rows(self.exchange, rows, self.moe, self.route,
                                       toward_experts=True)

    def finish_dispatch(self) -> None:
        # a fresh tensor: the exchange's output (dequantized from FP8 with the dispatcher's fp8)
        x_MD = self.moe.dispatcher.from_wire(self.exchange.finish(self._take()), self.route.x_ND)
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
        self.output = layer_post_mlp(self.layer, out, self.mid)
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

    def _take(self) -> PendingRows:
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


__all__ = ["DenseLayerRun", "MoELayerPieces", "check_piecewise_layer", "is_moe_layer"]
