"""The piecewise MoE layer (moe/pieces.py) and the overlapped F&B step (pipeline/fb_overlap.py),
on one process (EP=1) and on two gloo processes (EP=2).

  (a) the four pieces run in sequence give the layer's output and, from the same upstream
      gradient, its parameter and input gradients; a stage running its layers piecewise gives
      what the plain layer loop gives
  (b) the overlapped F(A)&B(B) step gives what F(A) then B(B) gives: A's outputs (and loss),
      every parameter gradient, the input gradient of B, and afterwards A's backward
  (c) the pieces run in the designed interleaving, and every exchange of one micro-batch is
      in flight while the other computes

Tolerance: exact everywhere. The pieces call the layer's own modules and methods in the layer's
order, so every value is computed by the same operations on the same data; the detach at a
piece boundary changes no arithmetic. Where gradients meet at a boundary, two terms sum the
same in either order; the one sum of three (the MoE input: shared experts, dispatched rows,
router) gets the router's term last in both graphs, since the router's backward waits for the
gates' gradient. With EP=2 the exchanges move the same rows, asynchronously instead of
blocking. Measured: every comparison bit-identical, EP=1 and EP=2.
"""

from __future__ import annotations

import time
from typing import Optional

import pytest
import torch
import torch.nn as nn

from megatron_dsv3.moe.async_exchange import AsyncExchange
from megatron_dsv3.moe.balance import set_balance_loss_scale
from megatron_dsv3.moe.pieces import MoELayerPieces
from megatron_dsv3.pipeline.fb_overlap import PAIR_BEGIN, PiecewiseLayers, forward_backward
from megatron_dsv3.pipeline.work import (BackwardWork, ForwardWork,
                                            run_backward, run_forward)
from megatron_dsv3.weight_grad import WeightGradStore, attach_weight_grad_store
from helpers.gloo import run_gloo
from helpers.tolerance import assert_equal

SEQ, BATCH, HIDDEN = 8, 2, 32

# Layers 0 (dense), 1, 2 (MoE) backward from layer 2, forward from layer 0, B leading; three
# segments per MoE layer in each program (the module note writes out why each exchange is hidden).
EXPECTED_FB_ORDER = [
    "pair.begin",
    "B2.combine.run", "B2.combine.issue",
    "F0.layer.run", "F1.attn.run", "F1.plan.issue",
    "B2.shared.run",
    "F1.plan.wait", "F1.plan.run", "F1.dispatch.issue",
    "B2.combine.wait", "B2.mlp.run", "B2.dispatch.issue",
    "F1.dispatch.wait", "F1.mlp.run", "F1.combine.issue",
    "B2.dispatch.wait", "B2.attn.run", "B1.combine.run", "B1.combine.issue",
    "F1.combine.wait", "F1.combine.run", "F2.attn.run", "F2.plan.issue",
    "B1.shared.run",
    "F2.plan.wait", "F2.plan.run", "F2.dispatch.issue",
    "B1.combine.wait", "B1.mlp.run", "B1.dispatch.issue",
    "F2.dispatch.wait", "F2.mlp.run", "F2.combine.issue",
    "B1.dispatch.wait", "B1.attn.run", "B0.layer.run",
    "F2.combine.wait", "F2.combine.run",
    "pair.end",
]


def small_config():
    """3 layers (1 dense + 2 MoE), d=32, 8 experts in 4 groups, top-2, 1 shared expert; a
    balance-loss coefficient large enough that its injected gradient matters."""
    from megatron_dsv3.config import tiny

    return tiny().replace(hidden_size=HIDDEN, vocab_size=64, num_layers=3, max_seq_len=16,
                          mla__num_heads=2, mla__q_lora_rank=16, mla__kv_lora_rank=8,
                          mla__qk_nope_head_dim=8, mla__qk_rope_head_dim=4, mla__v_head_dim=8,
                          moe__expert_ffn_size=16, moe__dense_ffn_size=32,
                          moe__seq_aux_loss_coeff=0.1, linear_backend="local")


class Stage(nn.Module):
    """A pipeline stage as pipeline/stages.py would make one: something before the layers
    (a projection standing in for the embedding), the layers, the final norm; piecewise=False
    runs the plain layer loop and has no layer stack (the schedule runs F then B)."""

    def __init__(self, pg, piecewise: bool = True, seed: int = 0, num_layers: int = 3) -> None:
        from megatron.core.transformer.transformer_block import TransformerBlock

        from megatron_dsv3.config import to_megatron_config
        from megatron_dsv3.specs import decoder_block_spec

        super().__init__()
        torch.manual_seed(seed)
        config = to_megatron_config(small_config().replace(num_layers=num_layers),
                                    expert_parallel_size=pg.ep.size())
        self.block = TransformerBlock(config=config, spec=decoder_block_spec(config),
                                      pg_collection=pg)
        self.proj = nn.Linear(HIDDEN, HIDDEN)
        self.piecewise_layers = PiecewiseLayers(self.block.layers) if piecewise else None
        set_balance_loss_scale(self, 1.0)
        self.train()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.proj(x)
        if self.piecewise_layers is not None:
            hidden = self.piecewise_layers(hidden, attention_mask=None)
        else:
            for layer in self.block.layers:
                hidden, _ = layer(hidden_states=hidden, attention_mask=None)
        return self.block.final_layernorm(hidden)


def mse_loss(outputs, labels):
    return ((outputs[0] - labels[0]) ** 2).mean()


def microbatch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Input [s, b, d] (a received activation: a leaf that wants its gradient) and a target."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(SEQ, BATCH, HIDDEN, generator=g).requires_grad_(),
            torch.randn(SEQ, BATCH, HIDDEN, generator=g))


def param_grads(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}


def assert_same(actual: dict, expected: dict, context: str) -> int:
    assert set(actual) == set(expected), f"{context}: {set(actual) ^ set(expected)}"
    for name in expected:
        assert_equal(actual[name], expected[name], f"{context}: {name}")
    return len(expected)


# ----------------------------------------------------------------------------------------------
# Checks shared by the single-process tests and the gloo workers
# ----------------------------------------------------------------------------------------------
def check_layer_pieces(pg, seed: int) -> dict:
    """(a) per MoE layer: pieces in sequence vs `layer(...)`; returns rows sent per EP rank."""
    stage = Stage(pg)
    sent = {}
    for index, layer in enumerate(stage.block.layers):
        if not isinstance(layer, nn.Module) or type(layer.mlp).__name__ != "DeepSeekMoE":
            continue
        x, grad_out = microbatch(seed + index)
        results = {}
        for how in ("layer", "pieces"):
            x_in = x.detach().clone().requires_grad_()
            if how == "layer":
                out, _ = layer(hidden_states=x_in, attention_mask=None)
                out.backward(grad_out)
            else:
                pieces = MoELayerPieces(layer, AsyncExchange(), {"attention_mask": None})
                out = pieces.forward(x_in)
                sent[index] = getattr(pieces.route.state, "send_splits", None)
                x_in.grad = pieces.backward(grad_out)
            assert layer.mlp.last_aux_loss is not None, "the balance loss must be on"
            results[how] = {"out": out.detach(), "x.grad": x_in.grad, **param_grads(layer)}
            layer.zero_grad(set_to_none=True)
        assert_same(results["pieces"], results["layer"], f"layer {index} pieces vs layer")
    return sent


def check_stage_piecewise_vs_plain(pg, seed: int, fp8_dispatch: bool = False) -> None:
    """(a) for a whole stage: piecewise layers (through the stack's autograd node) vs the loop;
    `fp8_dispatch`: both with the dispatch all-to-all in FP8 (the pieces pack and unpack the
    rows around their own exchange)."""
    results = {}
    for piecewise in (True, False):
        stage = Stage(pg, piecewise=piecewise)
        for layer in stage.block.layers:
            if hasattr(layer.mlp, "dispatcher"):  # the MoE layers
                layer.mlp.dispatcher.fp8 = fp8_dispatch
        x, target = microbatch(seed)
        out = stage(x)
        mse_loss((out,), (target,)).backward()
        results[piecewise] = {"out": out.detach(), "x.grad": x.grad, **param_grads(stage)}
    assert_same(results[True], results[False],
                f"piecewise stage vs plain layer loop (fp8 dispatch {fp8_dispatch})")


class CountingStore(WeightGradStore):
    """Counts the deferred weight-gradient closures run by `run_last` (the F&B step's)."""

    def __init__(self) -> None:
        super().__init__()
        self.run_last_closures = 0

    def run_last(self):
        self.run_last_closures += len(self._groups[-1][1])
        return super().run_last()


def check_fb_step(pg, seed: int, last_stage: bool, store: Optional[CountingStore] = None
                  ) -> list[str]:
    """(b) the F&B step vs F(A) then B(B) on two identical stages, then A's backward on both;
    returns its piece trace. `store`: attached to both stages as a schedule attaches
    its own (F then B compute weight gradients inline, the F&B step defers B's)."""
    stages = {how: Stage(pg) for how in ("separate", "overlapped")}
    if store is not None:
        for stage in stages.values():
            assert attach_weight_grad_store(stage, store) > 0
        stages["overlapped"].piecewise_layers.defer_weight_grads = True
    trace: list[str] = []
    stages["overlapped"].piecewise_layers.trace = trace
    results = {}
    for how, stage in stages.items():
        (x_b, target_b), (x_a, target_a) = microbatch(seed), microbatch(seed + 1)
        loss_fn = mse_loss if last_stage else None
        out_b = stage(x_b)
        loss_b = mse_loss((out_b,), (target_b,)) if last_stage else None
        grad_b = torch.randn(out_b.shape, generator=torch.Generator().manual_seed(seed + 2))
        fwd = ForwardWork(stage, (x_a,), loss_fn, (target_a,) if last_stage else (), 0, 1)
        bwd = BackwardWork(stage, loss_b, () if last_stage else (out_b,),
                           () if last_stage else (grad_b,), 0, 0)
        trace.clear()
        if how == "separate":
            outputs, loss_a = run_forward(fwd)
            run_backward(bwd)
        else:
            outputs, loss_a = forward_backward(fwd, bwd)
            assert PAIR_BEGIN in trace, "the F&B step must interleave through the layer stack"
            fb_trace = list(trace)
        step = {"out A": outputs[0].detach(), "x B .grad": x_b.grad, **param_grads(stage)}
        if last_stage:
            step["loss A"] = loss_a.detach()
        # afterwards, B of A: A's graph must be intact
        if last_stage:
            loss_a.backward()
        else:
            outputs[0].backward(torch.ones_like(outputs[0]))
        after = {"x A .grad": x_a.grad, **param_grads(stage)}
        results[how] = (step, after)
    kind = "last stage" if last_stage else "middle stage"
    assert_same(results["overlapped"][0], results["separate"][0], f"{kind}: F(A)&B(B)")
    assert_same(results["overlapped"][1], results["separate"][1], f"{kind}: then B(A)")
    return fb_trace


def assert_exchanges_hidden(trace: list[str]) -> None:
    """Every exchange issued by one micro-batch (counts, rows) is waited for only after the other
    one ran a compute piece, and one that is not its plan piece (a few index kernels: too small
    to hide a row exchange behind)."""
    for k, event in enumerate(trace):
        if not event.endswith(".issue"):
            continue
        wait = trace.index(event[:-len("issue")] + "wait", k)
        between = trace[k + 1:wait]
        assert any(e[0] != event[0] and e.endswith(".run") and not e.endswith(".plan.run")
                   for e in between), (
            f"{event} is waited for at {trace[wait]} with no compute of the other micro-batch "
            f"in between: {between}")


# ----------------------------------------------------------------------------------------------
# One process (EP=1)
# ----------------------------------------------------------------------------------------------
def test_moe_layer_pieces_in_sequence_equal_the_layer_output_and_gradients(dist_single):
    check_layer_pieces(dist_single, seed=10)


def test_stage_with_piecewise_layers_equals_the_plain_layer_loop(dist_single):
    check_stage_piecewise_vs_plain(dist_single, seed=20)


@pytest.mark.parametrize("last_stage", [False, True], ids=["middle_stage", "last_stage"])
def test_overlapped_fb_equals_forward_then_backward(dist_single, last_stage):
    check_fb_step(dist_single, seed=30, last_stage=last_stage)


def test_overlapped_fb_with_deferral_on_changes_nothing_when_a_and_b_pair_layer_for_layer(
        dist_single):
    """defer_weight_grads with a schedule's store attached: A and B hold the same layers, so B
    never runs alone and nothing is deferred (same trace, bit-identical gradients)."""
    store = CountingStore()
    trace = check_fb_step(dist_single, seed=45, last_stage=False, store=store)
    assert trace == EXPECTED_FB_ORDER, "\n".join(trace)
    assert store.run_last_closures == 0 and len(store) == 0


def check_fb_step_b_outlasts_a(pg, seed: int, defer: bool) -> tuple[list[str], CountingStore]:
    """F&B with A on a stage of 2 layers (dense, MoE) and B on one of 3 (dense, MoE, MoE): B's
    last segments run after A's are done. Against F(A) then B(B) on copies of both stages
    (same seeds), with a schedule's store attached everywhere; returns the F&B step's trace."""
    store, trace, results = CountingStore(), [], {}
    for how in ("separate", "overlapped"):
        a_stage, b_stage = Stage(pg, seed=seed, num_layers=2), Stage(pg, seed=seed + 1)
        for stage in (a_stage, b_stage):
            assert attach_weight_grad_store(stage, store) > 0
            stage.piecewise_layers.defer_weight_grads = defer
            stage.piecewise_layers.trace = trace if how == "overlapped" else None
        (x_b, _), (x_a, _) = microbatch(seed + 2), microbatch(seed + 3)
        out_b = b_stage(x_b)
        grad_b = torch.randn(out_b.shape, generator=torch.Generator().manual_seed(seed + 4))
        fwd = ForwardWork(a_stage, (x_a,), None, (), 0, 1)
        bwd = BackwardWork(b_stage, None, (out_b,), (grad_b,), 0, 0)
        trace.clear()
        if how == "separate":
            outputs, _ = run_forward(fwd)
            run_backward(bwd)
        else:
            outputs, _ = forward_backward(fwd, bwd)
        results[how] = {"out A": outputs[0].detach(), "x B .grad": x_b.grad,
                        **{f"A {n}": g for n, g in param_grads(a_stage).items()},
                        **{f"B {n}": g for n, g in param_grads(b_stage).items()}}
    assert_same(results["overlapped"], results["separate"], f"B outlasts A, {defer=}")
    return list(trace), store


def test_overlapped_fb_where_b_outlasts_a_runs_b_weight_grads_behind_its_exchanges(dist_single):
    """B (2 MoE layers) against A (1): after A's last segment, each of B's segments issues its
    exchange and then runs its own weight gradients ('B.wgrad.run'); gradients bit-identical
    to F then B, the same pieces in the same order as without deferral, the store left empty."""
    plain, _ = check_fb_step_b_outlasts_a(dist_single, seed=60, defer=False)
    trace, store = check_fb_step_b_outlasts_a(dist_single, seed=60, defer=True)
    assert [e for e in trace if e != "B.wgrad.run"] == plain
    assert "B.wgrad.run" not in plain
    assert store.run_last_closures > 0 and len(store) == 0
    last_a = max(k for k, e in enumerate(trace) if e.startswith("F"))
    w_runs = [k for k, e in enumerate(trace) if e == "B.wgrad.run"]
    assert w_runs and min(w_runs) > last_a, "\n".join(trace)  # only once A has run out
    for k in w_runs:  # right after B issued an exchange, or at B's end
        assert trace[k - 1].startswith("B") and trace[k - 1].endswith(
            (".issue", ".shared.run", "B0.layer.run")), trace[k - 1]


def test_overlapped_fb_interleaves_the_pieces_as_designed(dist_single):
    trace = check_fb_step(dist_single, seed=40, last_stage=False)
    assert trace == EXPECTED_FB_ORDER, "\n".join(trace)
    assert_exchanges_hidden(trace)


def test_stage_whose_piecewise_layers_is_not_a_layer_stack_is_refused(dist_single):
    stage = Stage(dist_single)
    stage.piecewise_layers = list(stage.block.layers)
    x, _ = microbatch(0)
    fwd = ForwardWork(stage, (x,), None, (), 0, 0)
    bwd = BackwardWork(stage, None, (), (), 0, 1)
    with pytest.raises(TypeError, match="not a PiecewiseLayers"):
        forward_backward(fwd, bwd)


def test_layer_setting_the_pieces_do_not_reproduce_is_refused(dist_single):
    stage = Stage(dist_single)
    layers = list(stage.block.layers)
    layers[1].recompute_mlp = True
    with pytest.raises(ValueError, match="recompute_mlp"):
        PiecewiseLayers(layers)


def test_layers_run_whole_without_grad(dist_single):
    stage, plain = Stage(dist_single), Stage(dist_single, piecewise=False)
    x, _ = microbatch(50)
    trace = stage.piecewise_layers.trace = []
    with torch.no_grad():
        assert_equal(stage(x), plain(x), "no-grad forward")
    assert trace == [], f"no pieces without grad: {trace}"


# ----------------------------------------------------------------------------------------------
# Two processes, EP=2 (the rows cross ranks)
# ----------------------------------------------------------------------------------------------
def _ep2_worker(rank: int, world: int) -> dict:
    from megatron_dsv3.parallel import init_distributed

    pg = init_distributed(tensor_parallel_size=1, expert_parallel_size=2)
    seed = 100 + 7 * rank  # each rank its own tokens: uneven, rank-dependent splits
    start = time.perf_counter()
    sent = check_layer_pieces(pg, seed)
    check_stage_piecewise_vs_plain(pg, seed)
    check_stage_piecewise_vs_plain(pg, seed, fp8_dispatch=True)
    check_fb_step(pg, seed, last_stage=True)
    trace = check_fb_step(pg, seed, last_stage=False)
    return {"sent": sent, "trace": trace, "seconds": time.perf_counter() - start}


@pytest.mark.multiprocess
def test_ep2_pieces_and_overlapped_fb_match_on_two_gloo_ranks():
    results = run_gloo(_ep2_worker, 2)
    for rank, result in enumerate(results):
        for layer, send_splits in result["sent"].items():
            assert send_splits is not None and send_splits[1 - rank] > 0, (
                f"rank {rank} layer {layer}: no rows crossed to the other rank ({send_splits}); "
                "the EP check would prove nothing")
        assert result["trace"] == EXPECTED_FB_ORDER, "\n".join(result["trace"])
        assert_exchanges_hidden(result["trace"])


def _async_plan_worker(rank: int, world: int) -> dict:
    """Two plans started with AsyncExchange's count exchange and finished in the opposite order
    (each micro-batch's counts in flight while the other's are issued and finished), against
    the synchronous `plan` of the same routing."""
    import torch.distributed as dist

    from megatron_dsv3.moe.dispatcher import AllToAllDispatcher
    from megatron_dsv3.moe.router import Routing, count_tokens_per_expert
    from megatron_dsv3.parallel import duplicate_group

    dist.init_process_group("gloo")  # from run_gloo's environment
    dispatcher = AllToAllDispatcher(dist.group.WORLD)
    E, K, D = 8, 3, 5

    def routed(seed: int) -> tuple[torch.Tensor, Routing]:
        g = torch.Generator().manual_seed(seed)
        T = 11 + 5 * rank + seed % 3  # uneven token counts and splits on every rank
        topk_TK = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
        routing = Routing(topk_TK, torch.rand(T, K, generator=g), torch.zeros(T, E),
                          count_tokens_per_expert(topk_TK, E))
        return torch.randn(T, D, generator=g), routing

    def flat(plan) -> dict:
        x_ND, tokens_per_local_expert, state = plan
        return {"x_ND": x_ND, "tokens per local expert": tokens_per_local_expert,
                "splits": torch.tensor([state.send_splits, state.recv_splits]),
                "order_M": state.order_M, "inverse_M": state.inverse_M,
                "order_N": state.local.order_N}

    inputs = [routed(300 + 10 * rank + m) for m in range(2)]
    expected = [flat(dispatcher.plan(*args)) for args in inputs]
    # the counts over the EP group itself, then over a duplicate of it (count_groups)
    duplicate = duplicate_group(dist.group.WORLD)
    used_groups = []
    all_to_all = dist.all_to_all_single

    def recording(*args, group=None, **kwargs):
        used_groups.append(group)
        return all_to_all(*args, group=group, **kwargs)

    dist.all_to_all_single = recording
    try:
        for how, exchange in (("same group", AsyncExchange()), ("duplicate group", AsyncExchange(
                count_groups={tuple(range(dist.get_world_size())): duplicate}))):
            used_groups.clear()
            started = [dispatcher.plan_start(*args, counts=exchange.counts) for args in inputs]
            actual = [flat(dispatcher.plan_finish(plan)) for plan in reversed(started)][::-1]
            for m in range(2):
                assert_same(actual[m], expected[m],
                            f"rank {rank} micro-batch {m}, {how}: async vs sync plan")
            wanted = duplicate if how == "duplicate group" else dist.group.WORLD
            assert used_groups == [wanted, wanted], f"{how}: counts went over {used_groups}"
    finally:
        dist.all_to_all_single = all_to_all
    return {"recv_splits": [e["splits"][1].tolist() for e in expected]}


@pytest.mark.multiprocess
def test_plan_with_async_count_exchange_equals_the_synchronous_plan_on_two_gloo_ranks():
    results = run_gloo(_async_plan_worker, 2)
    for rank, result in enumerate(results):
        for recv_splits in result["recv_splits"]:
            assert recv_splits[1 - rank] > 0, f"rank {rank}: nothing crossed ({recv_splits})"


# ----------------------------------------------------------------------------------------------
# The F&B overlap inside a real schedule: DualPipeV, PP=2 on two gloo ranks (4 stages)
# ----------------------------------------------------------------------------------------------
class CountingStage(Stage):
    """The stage with its layer stack; the stack's trace counts the F&B interleavings."""

    def __init__(self, pg, seed: int) -> None:
        super().__init__(pg, seed=seed)
        self.piecewise_layers.trace = []

    @property
    def fb_calls(self) -> int:
        return self.piecewise_layers.trace.count(PAIR_BEGIN)


class PlainStage(Stage):
    """The same stage, plain layer loop and no layer stack: the schedule runs F then B."""

    def __init__(self, pg, seed: int) -> None:
        super().__init__(pg, piecewise=False, seed=seed)


def _dualpipev_worker(rank: int, world: int, num_microbatches: int) -> dict:
    from megatron_dsv3.parallel import init_distributed
    from megatron_dsv3.pipeline import DualPipeV, TensorSpec

    pg = init_distributed(tensor_parallel_size=1)
    data = [microbatch(200 + m) for m in range(num_microbatches)]
    inputs, labels = [x.detach() for x, _ in data], [t for _, t in data]
    results = {}
    for name, cls in (("overlap", CountingStage), ("plain", PlainStage)):
        stages = DualPipeV.stages_of_rank(rank, world)
        modules = tuple(cls(pg, seed=stage) for stage in stages)
        for module, stage in zip(modules, stages):
            module.stage_index = stage
        pipe = DualPipeV(modules, p2p_specs=[TensorSpec((SEQ, BATCH, HIDDEN))])
        step = pipe.step(num_microbatches, inputs=inputs, labels=labels, loss_fn=mse_loss)
        results[name] = {"losses": step.losses,
                         "grads": {f"stage {s}: {n}": g for module, s in zip(modules, stages)
                                   for n, g in param_grads(module).items()},
                         "fb_calls": sum(getattr(m, "fb_calls", 0) for m in modules)}
    checked = assert_same(results["overlap"]["grads"], results["plain"]["grads"],
                          f"rank {rank}: DualPipeV with the F&B overlap vs without")
    if results["plain"]["losses"] is not None:
        assert_equal(results["overlap"]["losses"], results["plain"]["losses"], "losses")
    return {"fb_calls": results["overlap"]["fb_calls"], "grads_checked": checked}


@pytest.mark.multiprocess
def test_dualpipev_step_with_the_fb_overlap_equals_the_step_without_it():
    results = run_gloo(_dualpipev_worker, 2, 6)
    for rank, result in enumerate(results):
        assert result["fb_calls"] > 0, f"rank {rank}: the schedule never interleaved an F&B step"
        assert result["grads_checked"] > 0
