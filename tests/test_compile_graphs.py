"""The modules `compile_model` compiles (scope "modules": our attention, MoE and dense MLP;
scope "layers": Megatron's TransformerLayer around them) trace into one graph each, with no
graph break.

A graph break splits a compiled module into pieces with Python in between: each piece is its
own CUDA graph (more launches and host work per micro-batch) and the elementwise work at the
seams is not fused. Megatron's RowParallelLinear (attention output, MLP down-projections)
handed its GEMM tp_group=None, and Megatron's warning about it broke every attention and MLP
module in two (megatron_compat.OwnGemmHook now passes the layer's own group). Traced with
dynamo's `explain` (no code generation) on the CPU, in bf16 with the grouped-GEMM experts the
GPU runs (torch._grouped_mm traces in bf16 only; only the forward is traced here).

With scope "layers" a layer's norms, residual adds and bias-dropout-add are inside its one graph
(Megatron's TransformerLayer code traces without a break: its inference, offloading, recompute
and nvtx branches are Python decisions on config values, its make_viewless_tensor a no-op on
the residual sum). The last test compiles the whole model so, in fp32 under AOT autograd, and
compares it with the eager model, forward and backward, counting the graphs each step runs.
"""

from __future__ import annotations

import pytest
import torch

from megatron_dsv3 import model as model_mod


@pytest.fixture(scope="module")
def tiny_bf16(dist_single):
    from megatron_dsv3.config import preset, to_megatron_config
    from megatron_dsv3.moe.balance import set_balance_loss_scale

    cfg = preset("tiny").replace(moe__experts_impl="grouped_mm")
    torch.manual_seed(0)
    megatron_cfg = to_megatron_config(cfg, use_cpu_initialization=True)
    built = model_mod.build_model(cfg, pg_collection=dist_single,
                                  megatron_config=megatron_cfg).to(torch.bfloat16)
    set_balance_loss_scale(built, 1.0)
    return cfg, built


def _module_of(model, kind):
    from megatron.core.transformer.transformer_layer import TransformerLayer

    from megatron_dsv3.attention.mla import MultiLatentAttention
    from megatron_dsv3.moe.layer import DeepSeekMoE, DenseMLP

    if kind.endswith("-layer"):  # compile_model(scope="layers"): Megatron's TransformerLayer
        mlp = DenseMLP if kind == "dense-layer" else DeepSeekMoE
        return next(m for m in model.modules()
                    if isinstance(m, TransformerLayer) and isinstance(m.mlp, mlp))
    kinds = {"attention": MultiLatentAttention, "moe": DeepSeekMoE, "dense": DenseMLP}
    return next(m for m in model.modules() if isinstance(m, kinds[kind]))


# "moe" and "dense" alone are inside "moe-layer" and "dense-layer" (extended); the dense layer
# is one graph in test_compiled_layers_equal_eager_each_one_graph too (extended here)
@pytest.mark.parametrize("kind", ["attention", pytest.param("moe", marks=pytest.mark.extended),
                                  "moe-sums-in-gemm", "moe-merged",
                                  pytest.param("dense", marks=pytest.mark.extended),
                                  pytest.param("dense-layer", marks=pytest.mark.extended),
                                  "moe-layer"])
def test_each_compiled_module_is_one_graph(tiny_bf16, kind, monkeypatch):
    from megatron_dsv3.moe import experts

    monkeypatch.setattr(experts, "resolve_experts_impl", lambda impl, device: "grouped_mm")
    monkeypatch.setenv("TORCHDYNAMO_DISABLE", "0")  # the suite turns dynamo off
    cfg, model = tiny_bf16
    module = _module_of(model, kind.removesuffix("-sums-in-gemm").removesuffix("-merged"))
    if kind == "moe-sums-in-gemm":  # the experts' weight gradients into fp32 sums (a custom op)
        for weight in (module.experts.fc1, module.experts.fc2):
            monkeypatch.setattr(weight, "main_grad", torch.zeros(weight.shape), raising=False)
        monkeypatch.setattr(module.experts, "grads_into_main_grad", True)
    if kind == "moe-merged":  # --expert-wgrad step: the operands copied into segment buffers
        from megatron_dsv3.moe.expert_wgrad import ExpertGradMerger

        for name in ("weight_grad_merger", "fc1_segments", "fc2_segments"):
            monkeypatch.setattr(module.experts, name, None)  # back to None after the test
        ExpertGradMerger(2, 32 * cfg.moe.top_k).attach(module)
    x = torch.randn(32, 1, cfg.hidden_size, dtype=torch.bfloat16, requires_grad=True)
    args = (x, None) if kind == "attention" else (x,)
    kwargs = {"attention_mask": None} if kind.endswith("-layer") else {}
    torch._dynamo.reset()
    explained = torch._dynamo.explain(module.forward)(*args, **kwargs)
    reasons = [f"{b.reason.splitlines()[0]} at "
               + " <- ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno}"
                             for f in reversed(b.user_stack)) for b in explained.break_reasons]
    assert explained.graph_break_count == 0 and explained.graph_count == 1, reasons


def _experts_by_masks(x_ND, fc1_EFD2, fc2_EDF, tokens_per_expert_E):
    """The routed experts as dense per-expert SwiGLUs over all rows, each kept on its own rows
    by a mask: no data-dependent shape, so it traces on the CPU in fp32 (torch._grouped_mm's
    tracing takes bf16 only, the loop's `.tolist()` is a graph break). The same values as the
    grouped GEMM up to fp32 summation order; eager and compiled both run it here."""
    import torch.nn.functional as F

    from megatron_dsv3.moe.experts import swiglu

    ends = tokens_per_expert_E.cumsum(0)
    rows = torch.arange(x_ND.shape[0], device=x_ND.device)
    y_ND = x_ND.new_zeros(x_ND.shape[0], fc2_EDF.shape[1])
    for e in range(fc1_EFD2.shape[0]):
        mine = ((rows >= ends[e] - tokens_per_expert_E[e]) & (rows < ends[e])).to(x_ND.dtype)
        y_ND = y_ND + mine.unsqueeze(-1) * F.linear(swiglu(F.linear(x_ND, fc1_EFD2[e])),
                                                    fc2_EDF[e])
    return y_ND


def test_compiled_layers_equal_eager_each_one_graph(dist_single, monkeypatch):
    """compile_model(scope="layers") on the whole tiny model (dense layer, MoE layers, the MTP
    layer's TransformerLayer), fp32, AOT autograd (aot_eager: the forward and backward graphs
    inductor would get, run op by op): over two SGD steps the losses and every gradient equal
    the eager model's, and every layer call is one compiled graph, as the model calls it
    (TransformerBlock's and MTPLayer's arguments), with no graph break and nothing compiled
    again at the second step (so with reduce-overhead each layer is one CUDA graph, its norms
    and residual adds included)."""
    from helpers.tolerance import FP32_REORDER, assert_close
    from megatron.core.transformer.transformer_layer import TransformerLayer

    from megatron_dsv3.config import preset, to_megatron_config
    from megatron_dsv3.moe import experts
    from megatron_dsv3.moe.balance import set_balance_loss_scale
    from megatron_dsv3.mtp import mtp_loss

    monkeypatch.setattr(experts, "resolve_experts_impl", lambda impl, device: "grouped_mm")
    monkeypatch.setitem(experts.EXPERT_IMPLS, "grouped_mm", _experts_by_masks)
    monkeypatch.setenv("TORCHDYNAMO_DISABLE", "0")  # the suite turns dynamo off
    cfg = preset("tiny")
    torch.manual_seed(0)
    megatron_cfg = to_megatron_config(cfg, use_cpu_initialization=True)
    eager, compiled = (model_mod.build_model(cfg, pg_collection=dist_single,
                                             megatron_config=megatron_cfg) for _ in range(2))
    compiled.load_state_dict(eager.state_dict())
    graphs, calls = [], []

    def backend(gm, example_inputs):  # aot_eager, counting graphs and their calls
        run = torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)
        graphs.append(gm)

        def call(*args):
            calls.append(len(graphs))
            return run(*args)
        return call

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    assert model_mod.compile_model(compiled, scope="layers", backend=backend) == 4
    layers = [m for m in compiled.modules() if isinstance(m, TransformerLayer)]
    assert len(layers) == 4  # 3 decoder layers + the MTP layer's
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, cfg.vocab_size, (2, 32), generator=g)
    labels = torch.randint(0, cfg.vocab_size, (2, 32), generator=g)
    results = {}
    for name, model in (("eager", eager), ("compiled", compiled)):
        set_balance_loss_scale(model, 1.0)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        results[name] = []
        for step in range(2):
            optimizer.zero_grad(set_to_none=True)
            before = len(calls)
            out = model(input_ids, None, None, labels=labels)
            loss = out.lm_loss.mean() + mtp_loss(out.mtp_losses, out.mtp_valid, 0.3)
            loss.backward()
            results[name].append((loss.detach(), {n: p.grad.clone()
                                                  for n, p in model.named_parameters()}))
            optimizer.step()
            if name == "compiled":
                assert len(calls) - before == len(layers), \
                    f"step {step}: {len(calls) - before} compiled graphs ran, one per layer " \
                    f"expected ({len(layers)}): a layer broke into pieces"
                if step == 0:
                    first_graphs = len(graphs)
                else:
                    assert len(graphs) == first_graphs, "a layer was compiled again"
    breaks = dict(torch._dynamo.utils.counters["graph_break"])
    torch._dynamo.reset()
    assert not breaks, list(breaks)
    # one graph for each way a layer is called: dense, MoE (decoder), MoE (MTP's arguments);
    # the decoder's MoE layers share theirs
    assert first_graphs == 3, first_graphs
    why = "fp32; AOT autograd's joint graph sums some gradients in another order"
    for step, ((loss_c, grads_c), (loss_e, grads_e)) in enumerate(zip(results["compiled"],
                                                                    results["eager"])):
        assert_close(loss_c, loss_e, FP32_REORDER, why, f"step {step} loss")
        assert grads_c.keys() == grads_e.keys()
        for name, grad in grads_e.items():
            assert_close(grads_c[name], grad, FP32_REORDER, why, f"step {step} {name}")
