"""The DeepSeek-V3 model's weight gradients deferred to W steps (pipeline/weight_grad.py).

A tiny model (fp32, CPU, linear_backend="local") runs two micro-batches three ways on the same
weights: plain (no store attached: Megatron's and F.linear's own code), with a store attached
and deferring (B of micro-batch 0, B of 1, then W of 0, W of 1, as a zero-bubble schedule
runs them) and with a store attached but not deferring (a schedule's BW / F&B step). At TP=1
in this process and at TP=2 in gloo processes (column-parallel dX all-reduce, row-parallel
forward all-reduce, TP-split experts).

Tolerance: exact everywhere except where stated. The deferred path runs the same GEMMs on the
same tensors as the plain one (only later) and accumulates each parameter's micro-batches in
the same order (the store is FIFO), so nothing may differ by a bit. The one exception compares
two kernels: torch._grouped_mm against the per-expert loop (FP32_REORDER; measured identical on
CPU, whose _grouped_mm runs a GEMM per group).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_dsv3.config import tiny
from megatron_dsv3.moe.balance import set_balance_loss_scale
from helpers.gloo import run_gloo
from helpers.tolerance import FP32_REORDER, assert_close, assert_equal

SEQ, BATCH = 16, 2

# Parameters whose gradient is not deferred (computed in B): not GEMM weights of our layers.
# Router: moe/router.py's F.linear (a [E, D] GEMM, kept plain); norms: elementwise; the
# embedding: a scatter-add; output_layer: Megatron's GPTModel builds it, not our backend.
NOT_DEFERRED = ("router.weight", "norm.weight", "layernorm.weight", "word_embeddings.weight",
                "output_layer.weight")


def _config():
    return tiny().replace(num_layers=2, vocab_size=256, max_seq_len=SEQ, linear_backend="local",
                          moe__first_k_dense=1, moe__seq_aux_loss_coeff=1e-2)


def _microbatches(cfg, count: int = 2) -> list[dict]:
    gen = torch.Generator().manual_seed(7)
    return [dict(input_ids=torch.randint(0, cfg.vocab_size, (BATCH, SEQ), generator=gen),
                 labels=torch.randint(0, cfg.vocab_size, (BATCH, SEQ), generator=gen),
                 decoder_input=torch.randn(SEQ, BATCH, cfg.hidden_size, generator=gen))
            for _ in range(count)]


def _loss(model, mb: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss of one micro-batch and its decoder input (a leaf: the stage input's gradient)."""
    from megatron_dsv3.mtp import mtp_loss

    hidden = mb["decoder_input"].clone().requires_grad_()
    out = model(mb["input_ids"], None, None, decoder_input=hidden, labels=mb["labels"])
    return out.lm_loss.mean() + mtp_loss(out.mtp_losses, out.mtp_valid, 0.3), hidden


def _grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _deferrable_names(model) -> set[str]:
    """Parameters owned directly by a module that can defer (has `weight_grad_store`)."""
    return {f"{mod_name}.{p_name}" if mod_name else p_name
            for mod_name, module in model.named_modules() if hasattr(module, "weight_grad_store")
            for p_name, _ in module.named_parameters(recurse=False)}


def _plain_run(model, mbs) -> dict:
    """Backward per micro-batch in order; gradients after the first and after all."""
    model.zero_grad(set_to_none=True)
    result = {"input_grads": [], "grads": []}
    for mb in mbs:
        loss, hidden = _loss(model, mb)
        loss.backward()
        result["input_grads"].append(hidden.grad)
        result["grads"].append(_grads(model))
    return result


def _check_b_then_w(model, mbs, plain: dict) -> dict:
    """B0, B1 deferring, then W0, W1: checks after every step against the plain run."""
    from megatron_dsv3.weight_grad import WeightGradStore, attach_weight_grad_store

    deferrable = _deferrable_names(model)
    store = WeightGradStore()
    attached = attach_weight_grad_store(model, store)
    model.zero_grad(set_to_none=True)
    for m, mb in enumerate(mbs):  # B steps
        loss, hidden = _loss(model, mb)
        with store.deferring(label=("B", m)):
            loss.backward()
        # the input gradient is complete after B; the deferred weight gradients are absent
        assert_equal(hidden.grad, plain["input_grads"][m], f"input grad after B{m}")
        grads = _grads(model)
        assert not deferrable & grads.keys(), f"after B{m}: {sorted(deferrable & grads.keys())}"
        for name, grad in grads.items():  # computed in B: the plain value of micro-batches 0..m
            assert_equal(grad, plain["grads"][m][name], f"{name} after B{m}")
    assert len(store) == len(mbs)
    for m in range(len(mbs)):  # W steps, oldest first
        assert store.run_next() == ("B", m)
        for name in deferrable:  # micro-batches 0..m, accumulated in the plain order
            assert_equal(model.get_parameter(name).grad, plain["grads"][m][name],
                         f"{name} after W{m}")
    final = _grads(model)
    assert final.keys() == plain["grads"][-1].keys()
    for name, grad in final.items():
        assert_equal(grad, plain["grads"][-1][name], f"{name} after all W")

    # store attached, not deferring (a BW step): the weight gradients come in the backward
    not_deferring = _plain_run(model, mbs)
    assert len(store) == 0
    for name, grad in not_deferring["grads"][-1].items():
        assert_equal(grad, plain["grads"][-1][name], f"{name} with a store, not deferring")
    attach_weight_grad_store(model, None)
    return {"attached": attached, "deferrable": deferrable, "all": set(final)}


def _b_then_w_on_tp(pg) -> dict:
    from megatron_dsv3.model import build_model

    cfg = _config()
    torch.manual_seed(0)
    model = build_model(cfg, pg_collection=pg)
    set_balance_loss_scale(model, 1.0)  # each micro-batch's loss is backpropagated unscaled
    mbs = _microbatches(cfg)
    plain = _plain_run(model, mbs)
    return _check_b_then_w(model, mbs, plain)


def _gloo_worker(rank: int, world: int) -> dict:
    from megatron_dsv3.parallel import init_distributed, shutdown_distributed

    pg = init_distributed(tensor_parallel_size=world, backend="gloo", timeout_s=120)
    try:
        return _b_then_w_on_tp(pg)
    finally:
        shutdown_distributed()


def _check_what_defers(result: dict) -> None:
    not_deferred = result["all"] - result["deferrable"]
    assert result["attached"] > 0 and result["deferrable"] <= result["all"]
    for name in not_deferred:
        assert name.endswith(NOT_DEFERRED), f"{name} is not deferred; expected only {NOT_DEFERRED}"
    for name in result["deferrable"]:  # every GEMM weight of our layers, experts included
        assert name.endswith((".weight", "experts.fc1", "experts.fc2")), name
    assert any(name.endswith("experts.fc1") for name in result["deferrable"])


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------
def test_tp1_b_then_w_gives_every_gradient_bit_identical_in_fifo_order(dist_single):
    _check_what_defers(_b_then_w_on_tp(dist_single))


@pytest.mark.multiprocess
def test_tp2_b_then_w_gives_every_gradient_bit_identical_in_fifo_order():
    for result in run_gloo(_gloo_worker, 2, timeout_s=300):
        _check_what_defers(result)


def test_without_a_store_the_model_computes_what_plain_f_linear_autograd_computes(dist_single):
    """No store attached: the local linears run Megatron's own autograd function (or F.linear),
    bit for bit what autograd of F.linear gives: the reference is the same model with every
    column/row linear's forward replaced by F.linear on its weight."""
    from megatron_dsv3.layers import DeferrableColumnParallelLinear, DeferrableRowParallelLinear
    from megatron_dsv3.model import build_model

    cfg = _config()
    torch.manual_seed(0)
    model = build_model(cfg, pg_collection=dist_single)
    set_balance_loss_scale(model, 1.0)  # each micro-batch's loss is backpropagated unscaled
    mbs = _microbatches(cfg)
    plain = _plain_run(model, mbs)
    patched = 0
    for module in model.modules():
        if isinstance(module, (DeferrableColumnParallelLinear, DeferrableRowParallelLinear)):
            assert module.weight_grad_store is None and module.bias is None
            module.forward = lambda x, *args, _m=module, **kwargs: (F.linear(x, _m.weight), None)
            patched += 1
    assert patched > 0
    reference = _plain_run(model, mbs)
    for m in range(len(mbs)):
        assert_equal(plain["input_grads"][m], reference["input_grads"][m], f"input grad {m}")
        for name, grad in reference["grads"][m].items():
            assert_equal(plain["grads"][m][name], grad, f"{name} after micro-batch {m}")


# ----------------------------------------------------------------------------------------------
# The routed experts' grouped GEMMs
# ----------------------------------------------------------------------------------------------
def _expert_rows():
    """E=4 experts, one empty; I=16, O=32, N=16 rows: _grouped_mm's CPU kernel wants every
    stride a multiple of 16 bytes (fp32: dimensions multiple of 4)."""
    gen = torch.Generator().manual_seed(3)
    tokens_per_expert = torch.tensor([4, 0, 8, 4])
    x = torch.randn(16, 16, generator=gen)
    w = torch.randn(4, 32, 16, generator=gen)
    grad_y = torch.randn(16, 32, generator=gen)
    return x, w, tokens_per_expert, grad_y


def _autograd_reference(impl, x, w, tokens_per_expert, grad_y):
    """Plain autograd of what RoutedExperts runs without a store, for one projection."""
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    if impl == "grouped_mm":
        offsets = tokens_per_expert.cumsum(0).to(torch.int32)
        y = torch._grouped_mm(x, w.transpose(-2, -1), offs=offsets)
    else:
        bounds = tokens_per_expert.cumsum(0).tolist()
        y = torch.cat([F.linear(x[b - n:b], w[e]) for e, (n, b) in
                       enumerate(zip(tokens_per_expert.tolist(), bounds))])
    y.backward(grad_y)
    return y.detach(), x.grad, w.grad


def _deferred(impl, x, w, tokens_per_expert, grad_y):
    from megatron_dsv3.moe.experts import expert_groups, experts_linear
    from megatron_dsv3.weight_grad import WeightGradStore

    store = WeightGradStore()
    x, w = x.clone().requires_grad_(), torch.nn.Parameter(w.clone())
    y = experts_linear(x, w, impl, expert_groups(tokens_per_expert, impl), store)
    with store.deferring():
        y.backward(grad_y)
    assert x.grad is not None and w.grad is None, "B: input gradient only"
    store.run_next()
    return y.detach(), x.grad, w.grad


@pytest.mark.parametrize("impl", ["loop", "grouped_mm"])
def test_experts_linear_b_then_w_equals_autograd_of_the_plain_experts(impl):
    args = _expert_rows()
    for got, want, name in zip(_deferred(impl, *args), _autograd_reference(impl, *args),
                               ("y", "dX", "dW")):
        assert_equal(got, want, f"{impl} {name}")


def test_experts_grouped_mm_weight_grads_match_the_loop_reference():
    args = _expert_rows()
    why = "torch._grouped_mm against one GEMM per expert (measured identical on CPU)"
    for got, want, name in zip(_deferred("grouped_mm", *args), _deferred("loop", *args),
                               ("y", "dX", "dW")):
        assert_close(got, want, FP32_REORDER, why, name)
    dw = _deferred("loop", *args)[2]
    assert_equal(dw[1], torch.zeros_like(dw[1]), "dW of the expert that got no rows")


def test_routed_experts_under_bf16_autocast_defer_the_same_gradients():
    """RoutedExperts casts for autocast itself; the deferrable path casts inside its function:
    the same bf16 GEMMs, the fp32 weight gradient cast as autograd casts it."""
    from megatron_dsv3.moe.experts import RoutedExperts
    from megatron_dsv3.weight_grad import WeightGradStore, attach_weight_grad_store

    torch.manual_seed(0)
    experts = RoutedExperts(4, 16, 32, tp_group=None, dtype=torch.float32, impl="loop")
    x_plain = torch.randn(16, 16).requires_grad_()
    x_split = x_plain.detach().clone().requires_grad_()
    tokens_per_expert, grad_y = torch.tensor([4, 0, 8, 4]), torch.randn(16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_plain = experts(x_plain, tokens_per_expert)
    y_plain.backward(grad_y)
    plain = {name: p.grad for name, p in experts.named_parameters()}
    experts.zero_grad(set_to_none=True)
    store = WeightGradStore()
    assert attach_weight_grad_store(experts, store) == 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_split = experts(x_split, tokens_per_expert)
    assert_equal(y_split, y_plain, "bf16 output")
    with store.deferring():
        y_split.backward(grad_y)
    store.run_next()
    assert_equal(x_split.grad, x_plain.grad, "dX")
    for name, p in experts.named_parameters():
        assert p.grad.dtype == torch.float32
        assert_equal(p.grad, plain[name], f"d{name}")


# ----------------------------------------------------------------------------------------------
# The tensor-parallel linears and the store
# ----------------------------------------------------------------------------------------------
def _column(pg, config_changes=None):
    from megatron_dsv3.config import to_megatron_config
    from megatron_dsv3.layers import get_backend, normal_init

    config = to_megatron_config(_config(), **(config_changes or {}))
    return get_backend("local").column(16, 8, config=config, init_method=normal_init(0.02),
                                       tp_group=pg.tp)


def test_column_linear_deferred_gradient_goes_to_main_grad(dist_single):
    from megatron_dsv3.weight_grad import WeightGradStore, attach_weight_grad_store

    layer = _column(dist_single)
    x = torch.randn(SEQ, BATCH, 16)
    layer(x)[0].sum().backward()
    plain = layer.weight.grad
    layer.weight.grad = None
    layer.weight.main_grad = torch.zeros_like(layer.weight)  # as Megatron's DDP sets it
    store = WeightGradStore()
    attach_weight_grad_store(layer, store)
    with store.deferring():
        layer(x)[0].sum().backward()
    store.run_next()
    assert layer.weight.grad is None
    assert_equal(layer.weight.main_grad, plain, "main_grad")


def test_unsupported_megatron_options_with_a_store_fail_with_the_fix(dist_single):
    from megatron_dsv3.weight_grad import WeightGradStore, attach_weight_grad_store

    layer = _column(dist_single)
    layer.gradient_accumulation_fusion = True  # Megatron refuses it at construction on CPU
    x = torch.randn(SEQ, BATCH, 16)
    attach_weight_grad_store(layer, WeightGradStore())
    with pytest.raises(NotImplementedError, match="no-gradient-accumulation-fusion"):
        layer(x)


def test_w_step_runs_under_the_autocast_state_of_its_b_step():
    """B outside autocast (fp32 GEMMs), W inside a bf16 autocast region: W must not turn into
    a bf16 GEMM."""
    from helpers.deferred_linear import DeferredWgradLinear
    from megatron_dsv3.weight_grad import WeightGradStore

    torch.manual_seed(0)
    plain = DeferredWgradLinear(16, 8, bias=False)
    split = DeferredWgradLinear(16, 8, bias=False, store=WeightGradStore())
    split.load_state_dict(plain.state_dict())
    x = torch.randn(4, 16)
    plain(x).sum().backward()
    with split.weight_grad_store.deferring():
        split(x).sum().backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        split.weight_grad_store.run_next()
    assert_equal(split.weight.grad, plain.weight.grad, "dW")


def test_a_parameter_used_twice_in_one_backward_is_summed_before_accumulating():
    """Autograd sums a leaf's gradients of one backward, then adds the sum to .grad; W does the
    same, so a weight shared by two calls accumulates bit-identically over micro-batches."""
    from helpers.deferred_linear import DeferredWgradLinear
    from megatron_dsv3.weight_grad import WeightGradStore

    torch.manual_seed(0)
    plain = DeferredWgradLinear(16, 16, bias=True)
    split = DeferredWgradLinear(16, 16, bias=True, store=WeightGradStore())
    split.load_state_dict(plain.state_dict())
    store = split.weight_grad_store
    for step in range(3):
        x = torch.randn(5, 16) * (10.0 ** step)  # magnitudes where the association shows
        plain(plain(plain(x))).sum().backward()
        with store.deferring(label=step):
            split(split(split(x))).sum().backward()
        store.run_next()
        assert_equal(split.weight.grad, plain.weight.grad, f"dW, step {step}")
        assert_equal(split.bias.grad, plain.bias.grad, f"db, step {step}")


def test_store_refuses_defer_outside_deferring():
    from megatron_dsv3.weight_grad import WeightGradStore

    with pytest.raises(RuntimeError, match="outside deferring"):
        WeightGradStore().defer_grad(torch.nn.Parameter(torch.zeros(1)), lambda: torch.ones(1))



# ----------------------------------------------------------------------------------------------
# Under torch.compile
# ----------------------------------------------------------------------------------------------
# What is compiled: "moe" the MoE decoder layer's DeepSeekMoE (its shared experts' column and
# row linears, the routed experts), compile_model's two scopes on the whole model (extended:
# several seconds of tracing each; the replicated linears are in attention)
@pytest.mark.parametrize("part", ["moe", pytest.param("modules", marks=pytest.mark.extended),
                                  pytest.param("layers", marks=pytest.mark.extended)])
def test_compiled_model_defers_every_weight_gradient_to_w(dist_single, monkeypatch, part):
    """Compiled (compile_model, AOT autograd: aot_eager) with a deferring store attached, B
    leaves every deferrable weight without a gradient, as eager B does, and W brings them,
    equal to the eager model's. Traced, a layer's backward had the store's answer of trace time
    (not deferring) compiled in: B computed 25 of these 26 weight gradients with either scope
    (4 with the MoE module alone) and the schedule's W had nothing left to do. With a store
    attached the deferrable layers now run eager, outside the graph (as the FP8 ones did)."""
    from megatron_dsv3.model import build_model, compile_model
    from megatron_dsv3.moe.layer import DeepSeekMoE
    from megatron_dsv3.weight_grad import WeightGradStore, attach_weight_grad_store

    monkeypatch.setenv("TORCHDYNAMO_DISABLE", "0")  # the suite turns dynamo off
    cfg = _config()
    torch.manual_seed(0)
    eager, compiled = (build_model(cfg, pg_collection=dist_single) for _ in range(2))
    compiled.load_state_dict(eager.state_dict())
    for model in (eager, compiled):
        set_balance_loss_scale(model, 1.0)
    (mb,) = _microbatches(cfg, 1)
    plain = _plain_run(eager, [mb])

    torch._dynamo.reset()
    if part == "moe":
        target = next(m for m in compiled.decoder.modules() if isinstance(m, DeepSeekMoE))
        assert compile_model(target, scope="modules", backend="aot_eager") == 1
    else:
        assert compile_model(compiled, scope=part, backend="aot_eager") > 0
    store = WeightGradStore()
    attach_weight_grad_store(compiled, store)
    deferrable = _deferrable_names(compiled)
    try:
        loss, hidden = _loss(compiled, mb)
        with store.deferring(label="B"):
            loss.backward()
        early = sorted(deferrable & _grads(compiled).keys())
        assert not early, f"{len(early)} of {len(deferrable)} deferrable weights got their " \
                          f"gradient in B: {early}"
        assert store.run_next() == "B"
    finally:
        attach_weight_grad_store(compiled, None)
        torch._dynamo.reset()
    why = "fp32; AOT autograd's joint graph sums some gradients in another order"
    assert_close(hidden.grad, plain["input_grads"][0], FP32_REORDER, why, "input grad")
    grads = _grads(compiled)
    assert grads.keys() == plain["grads"][0].keys()
    for name, grad in plain["grads"][0].items():
        assert_close(grads[name], grad, FP32_REORDER, why, name)
