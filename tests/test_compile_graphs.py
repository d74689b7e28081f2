"""The modules `compile_model` compiles (scope "modules": our attention, MoE and dense MLP;
scope "layers": Megatron's TransformerLayer around them) trace into one graph each, with no
graph break.

A graph break splits a compiled module into pieces with Python in between: each piece is its
own CUDA graph (more launches and host work per micro-batch) and the elementwise work at the
seams is not fused. Megatron's RowParallelLinear (attention output, MLP down-projections)
handed its GEMM tp_group=None, and Megatron's warning about it broke every attention and MLP
module in two (megatron_compat.OwnGemmHook now passes the layer's own group). Traced with
dynamo's `explain` (no code generation) on the CPU, in bf16 with the grouped-GEMM experts the
GPU runs (their backward has no CPU kernel; only the forward is traced here).
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


# "moe" and "dense" alone are inside "moe-layer" and "dense-layer" (extended)
@pytest.mark.parametrize("kind", ["attention", pytest.param("moe", marks=pytest.mark.extended),
                                  "moe-sums-in-gemm", "moe-merged",
                                  pytest.param("dense", marks=pytest.mark.extended),
                                  "dense-layer", "moe-layer"])
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
