"""FP8 in the model (ModelConfig.fp8='deepseek', model.mark_fp8_linears, layers.py's FP8 path),
on the CPU with the FP8 GEMM emulation:

  * the widths FP8 cuts into 128-wide tiles are checked when the config is made: one that is
    no multiple of 128 is refused naming the field and the fix (the tiny preset's
    q_lora_rank=64); ModelConfig.fp8_layers chooses the parts; the TE backend leaves the
    linears to TE's recipe (its test runs only where TE and a GPU are);
  * the precision map: the MLA query and KV up-projections, the dense FFN, the shared and the
    routed experts run in FP8; the KV down-projection, the attention output projection and the
    MTP projection do not; an FP8 layer's output and gradients are exactly fp8_linear's of its
    input and weight, the routed experts' the grouped FP8 GEMM's;
  * expert parallelism on 2 gloo ranks gives the single process's FP8 loss, and with the
    dispatch in FP8 too a loss within FP8 rounding of it;
  * an FP8 layer's weight gradient defers to the pipeline schedules' W step unchanged;
  * a small model trains in FP8 like in fp32 from the same weights and batches (bound stated
    in the test).
"""

from __future__ import annotations

import pytest
import torch

from megatron_dsv3.config import DEFAULT_FP8_LAYERS, ConfigError, tiny
from megatron_dsv3.fp8.linear import fp8_linear

# every FP8 width a multiple of 128: hidden 128, q_lora 128, 2 heads x (48 + 16) = 128 for the
# queries, kv_lora 128, 2 x (48 + 16) for the KV up-projection, dense FFN 256, experts 128
# wide (2 shared: 256)
FP8_SMALL = dict(hidden_size=128, num_layers=2, vocab_size=256, max_seq_len=64,
                 mla__num_heads=2, mla__q_lora_rank=128, mla__kv_lora_rank=128,
                 mla__qk_nope_head_dim=48, mla__qk_rope_head_dim=16, mla__v_head_dim=16,
                 moe__expert_ffn_size=128, moe__num_shared_experts=2, moe__dense_ffn_size=256,
                 moe__first_k_dense=1, linear_backend="local")


def _model(pg, fp8: bool):
    from megatron_dsv3.config import to_megatron_config
    from megatron_dsv3.model import build_model
    from megatron_dsv3.moe.balance import set_balance_loss_scale

    cfg = tiny().replace(**FP8_SMALL, fp8="deepseek" if fp8 else "none")
    torch.manual_seed(0)
    model = build_model(cfg, pg_collection=pg, megatron_config=to_megatron_config(
        cfg, use_cpu_initialization=True))
    set_balance_loss_scale(model, 1.0)
    return model


def test_widths_no_multiple_of_128_are_refused_naming_the_field():
    with pytest.raises(ConfigError, match=r"MLAConfig.q_lora_rank=64 is invalid: with "
                                          r"fp8='deepseek' it is the query down-projection's "
                                          r"output .* use a multiple of 128 \(e.g. 128\)"):
        tiny().replace(fp8="deepseek")
    with pytest.raises(ConfigError, match="MoEConfig.dense_ffn_size=200 is invalid"):
        tiny().replace(**{**FP8_SMALL, "moe__dense_ffn_size": 200}, fp8="deepseek")
    with pytest.raises(ConfigError, match="ModelConfig.fp8='e5m2' is invalid"):
        tiny().replace(fp8="e5m2")


def test_a_weight_shard_of_partial_blocks_is_refused_naming_tensor_parallelism():
    """The config checks the full widths; tensor parallelism splits them further (TP=2 on a
    128-wide projection leaves 64 x 128 shards, no whole 128 x 128 block)."""
    from megatron_dsv3.model import check_fp8_shard

    check_fp8_shard(torch.empty(256, 128), "ColumnParallelLinear")
    with pytest.raises(ConfigError, match="a ColumnParallelLinear holds a 64 x 128 shard .* "
                                          "use a smaller --tensor-parallel-size"):
        check_fp8_shard(torch.empty(64, 128), "ColumnParallelLinear")


def test_the_precision_maps_linears_run_fp8_linear(dist_single):
    model = _model(dist_single, fp8=True)
    in_fp8 = sorted(name for name, m in model.named_modules() if getattr(m, "fp8", False))
    layer0, layer1 = "decoder.layers.0.", "decoder.layers.1."
    assert in_fp8 == sorted(
        [f"{layer}self_attention.{p}" for layer in (layer0, layer1, "mtp.layers.0.transformer_"
                                                    "layer.")
         for p in ("linear_q_down", "linear_q_up", "linear_kv_up")]
        + [f"{layer0}mlp.linear_fc{i}" for i in (1, 2)]
        + [f"{layer}mlp.shared_experts.linear_fc{i}" for layer in (
            layer1, "mtp.layers.0.transformer_layer.") for i in (1, 2)]
        + [f"{layer}mlp.experts" for layer in (layer1, "mtp.layers.0.transformer_layer.")])
    layer = model.decoder.layers[0].mlp.linear_fc1  # Megatron's ColumnParallelLinear
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    x = torch.randn(8, 2, 128, generator=g, requires_grad=True)
    dy = torch.randn(8, 2, layer.weight.shape[0], generator=g)
    y, _ = layer(x)
    y.backward(dy)
    x_ref = x.detach().clone().requires_grad_()
    w_ref = layer.weight.detach().clone().requires_grad_()
    fp8_linear(x_ref, w_ref).backward(dy)
    assert torch.equal(y.detach(), fp8_linear(x_ref.detach(), w_ref.detach()))
    assert torch.equal(x.grad, x_ref.grad) and torch.equal(layer.weight.grad, w_ref.grad)


def test_marking_puts_the_dispatch_all_to_all_of_expert_parallel_layers_in_fp8(dist_single):
    """EP > 1 layers' AllToAllDispatcher sends in FP8 after mark_fp8_linears (the two-rank test
    of the exchange itself is in test_expert_parallel.py); the local dispatcher sends nothing."""
    from megatron_dsv3.model import mark_fp8_linears
    from megatron_dsv3.moe.dispatcher import AllToAllDispatcher, LocalDispatcher

    model = _model(dist_single, fp8=False)
    moe = model.decoder.layers[1].mlp
    assert isinstance(moe.dispatcher, LocalDispatcher)
    moe.dispatcher = AllToAllDispatcher(None)  # as an EP group of 2 would make it
    assert not moe.dispatcher.fp8
    mark_fp8_linears(model)
    assert moe.dispatcher.fp8
    assert isinstance(model.mtp.layers[0].transformer_layer.mlp.dispatcher, LocalDispatcher)


def test_the_precision_maps_parts_are_chosen_by_fp8_layers_and_a_part_left_out_needs_no_width(
        dist_single):
    """proxy's dense FFN is 10944 wide: refused in FP8 naming the field and fp8_layers; left
    out of fp8_layers (--fp8-layers) it stays BF16 and the rest of the map is FP8."""
    from megatron_dsv3.config import preset
    from megatron_dsv3.model import mark_fp8_linears
    from megatron_dsv3.train.args import parse_args

    with pytest.raises(ConfigError, match=r"MoEConfig.dense_ffn_size=10944 is invalid.*leave "
                                          r"'dense_ffn' out of ModelConfig.fp8_layers"):
        preset("proxy").replace(fp8="deepseek")
    cfg = preset("proxy").replace(fp8="deepseek",
                                  fp8_layers=("attention", "shared_experts", "dispatch"))
    assert "dense_ffn" not in {part for *_, part in cfg.fp8_linear_widths()}
    with pytest.raises(ConfigError, match=r"ModelConfig.fp8_layers=.*\['experts'\] are no "
                                          r"parts of the precision map"):
        tiny().replace(fp8_layers=("attention", "experts"))
    _, parsed = parse_args(["--preset", "proxy", "--fp8", "deepseek", "--fp8-layers",
                            "attention, shared_experts,dispatch"])
    assert parsed.fp8_layers == ("attention", "shared_experts", "dispatch")
    # marking follows the parts: attention only
    model = _model(dist_single, fp8=False)
    assert mark_fp8_linears(model, parts=("attention",)) == 9  # 3 MLA layers x 3 projections
    marked = {name for name, m in model.named_modules() if getattr(m, "fp8", False)}
    assert marked and all(".self_attention." in name for name in marked)
    # the experts' weight gradient in FP8 only where asked
    from megatron_dsv3.moe.experts import RoutedExperts

    experts = [m for m in model.modules() if isinstance(m, RoutedExperts)]
    mark_fp8_linears(model, parts=("routed_experts",))
    assert experts and all(m.fp8 and not m.fp8_wgrad for m in experts)
    mark_fp8_linears(model, parts=("routed_experts", "routed_experts_wgrad"))
    assert all(m.fp8 and m.fp8_wgrad for m in experts)


def test_the_local_backend_runs_our_fp8_not_megatrons_te_recipe():
    """Megatron's own FP8 (fp8 / fp8_recipe on its config) drives TE's recipes; on the local
    backend it stays off and our linears carry FP8 (the TE backend's test below)."""
    from megatron_dsv3.config import to_megatron_config

    megatron_config = to_megatron_config(tiny().replace(**FP8_SMALL, fp8="deepseek"),
                                         use_cpu_initialization=True)
    assert megatron_config.fp8 is None and megatron_config.dsv3.fp8 == "deepseek"


def _te_on_a_gpu() -> bool:
    from megatron_dsv3.megatron_compat import transformer_engine_available

    return transformer_engine_available() and torch.cuda.is_available()


@pytest.mark.skipif(not _te_on_a_gpu(), reason="Transformer Engine and a GPU are needed for "
                    "TE's blockwise FP8 recipe (neither is on the CI machine)")
def test_the_te_backend_trains_with_tes_blockwise_recipe(dist_single):
    """fp8='deepseek' on the TE backend: Megatron's config asks for TE's Float8BlockScaling
    (fp8='e4m3', fp8_recipe='blockwise'), our linears are left to TE, and a few steps train
    like the same model in bf16 (within 2% of its loss)."""
    from megatron_dsv3.config import to_megatron_config
    from megatron_dsv3.model import build_model
    from megatron_dsv3.moe.balance import set_balance_loss_scale
    from megatron_dsv3.mtp import weighted_lm_loss

    losses = {}
    for fp8 in ("deepseek", "none"):
        cfg = tiny().replace(**{**FP8_SMALL, "linear_backend": "te"}, fp8=fp8,
                             params_dtype="bfloat16")
        megatron_config = to_megatron_config(cfg, use_cpu_initialization=False)
        assert (megatron_config.fp8, megatron_config.fp8_recipe) == (
            ("e4m3", "blockwise") if fp8 == "deepseek" else (None, megatron_config.fp8_recipe))
        torch.manual_seed(0)
        model = build_model(cfg, pg_collection=dist_single, megatron_config=megatron_config)
        assert not any(getattr(m, "fp8", False) for m in model.modules())
        set_balance_loss_scale(model, 1.0)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(1)
        for _ in range(4):
            ids = torch.randint(0, cfg.vocab_size, (2, 65), generator=g).cuda()
            loss = weighted_lm_loss(model(ids[:, :-1], None, None, labels=ids[:, 1:]), 0.3)[0]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        losses[fp8] = loss.item()
    assert abs(losses["deepseek"] - losses["none"]) <= 0.02 * losses["none"], losses


def test_an_fp8_layers_weight_gradient_defers_to_the_w_step(dist_single):
    """The DualPipe schedules' B step defers weight gradients: an FP8 layer's arrives only at W,
    equal bit for bit to the one computed in backward."""
    from megatron_dsv3.weight_grad import WeightGradStore, attach_weight_grad_store

    layer = _model(dist_single, fp8=True).decoder.layers[0].mlp.linear_fc1
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    x = torch.randn(8, 2, 128, generator=g)
    dy = torch.randn(8, 2, layer.weight.shape[0], generator=g)
    layer(x)[0].backward(dy)
    direct, layer.weight.grad = layer.weight.grad.clone(), None
    store = WeightGradStore()
    attach_weight_grad_store(layer, store)
    with store.deferring(label=("B", 0, 0)):
        layer(x)[0].backward(dy)
    assert layer.weight.grad is None
    store.run_next()
    assert torch.equal(layer.weight.grad, direct)


def test_a_small_model_trains_in_fp8_like_in_fp32(dist_single):
    """16 AdamW steps on two fixed batches (a memorising run: the loss falls from 7.2 to ~3):
    FP8 emulation against fp32 from the same weights. Measured: at most 1.5% apart at any of
    these steps (a 30-step run: 2% until step 20, up to 6% once the loss is below 1); bound
    3%."""
    from megatron_dsv3.mtp import weighted_lm_loss

    data = torch.randint(0, 256, (2, 4, 65), generator=torch.Generator().manual_seed(1))
    curves = []
    for fp8 in (False, True):
        model = _model(dist_single, fp8)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        losses = []
        for step in range(16):
            ids = data[step % 2]
            loss = weighted_lm_loss(model(ids[:, :-1], None, None, labels=ids[:, 1:]), 0.3)[0]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        curves.append(losses)
    fp32, fp8 = curves
    assert fp32[-1] < 0.5 * fp32[0] and fp8[-1] < 0.5 * fp8[0], curves
    apart = max(abs(a - b) / a for a, b in zip(fp32, fp8))
    assert apart < 0.03, (apart, curves)
    assert apart > 0, "the FP8 run must differ: its GEMMs round to E4M3"


def _experts_operands(counts):
    """Fresh operands of one expert projection over uneven groups of `counts` rows: (seed, its
    generator, the groups' int32 ends, x [N, 128], w [4, 256, 128], dy [N, 256])."""
    seed = int(torch.randint(0, 2**31 - 1, ()))
    g = torch.Generator().manual_seed(seed)
    ends = torch.tensor(counts).cumsum(0).to(torch.int32)
    x = torch.randn(sum(counts), 128, generator=g)
    w = torch.randn(4, 256, 128, generator=g) * 0.05
    dy = torch.randn(sum(counts), 256, generator=g)
    return seed, g, ends, x, w, dy


def _experts_linear_grads(x, w, dy, counts, **fp8_flags):
    """(y, dX, dW) of experts_linear (the loop implementation) on copies of x and w."""
    from megatron_dsv3.moe.experts import experts_linear

    x_in, w_in = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = experts_linear(x_in, w_in, "loop", counts, **fp8_flags)
    y.backward(dy)
    return y.detach(), x_in.grad, w_in.grad


def test_routed_experts_in_fp8_run_the_grouped_fp8_gemm_forward_and_back_and_bf16_weight_grads():
    """experts_linear(fp8=True), as RoutedExperts runs it once marked: y and dX are the grouped
    FP8 GEMM of the 1x128-quantized rows (dY for dX) and each expert's 128x128 blocks (W^T's for
    dX), bit for bit the emulation on this machine; dW is the BF16 path's, unchanged. Uneven
    groups with an empty expert and a boundary inside a 128-row tile."""
    from megatron_dsv3.fp8 import quantize_1x128
    from megatron_dsv3.fp8.grouped_gemm import (fp8_grouped_gemm_emulated,
                                                quantize_128x128_grouped,
                                                transposed_blocks_grouped)

    counts = [70, 0, 100, 30]
    seed, g, ends, x, w, dy = _experts_operands(counts)
    grads = {fp8: _experts_linear_grads(x, w, dy, counts, fp8=fp8) for fp8 in (True, False)}
    w_q = quantize_128x128_grouped(w)
    y_fp8 = fp8_grouped_gemm_emulated(quantize_1x128(x), w_q, ends)
    assert torch.equal(grads[True][0], y_fp8), seed
    assert torch.equal(grads[True][1], fp8_grouped_gemm_emulated(
        quantize_1x128(dy), transposed_blocks_grouped(w_q), ends)), seed
    assert torch.equal(grads[True][2], grads[False][2]), f"weight gradient (seed {seed})"
    assert not torch.equal(grads[True][0], grads[False][0]), "FP8 must have rounded something"


def test_routed_experts_weight_gradient_in_fp8_is_the_grouped_fp8_wgrad_of_segment_tiles():
    """experts_linear(fp8=True, fp8_wgrad=True) ("routed_experts_wgrad"): y and dX as with the
    BF16 weight gradient, bit for bit; dW bit for bit the emulated grouped FP8 weight gradient
    of x and dY in 128-token tiles of each expert's rows, and within E4M3's rounding of the
    BF16 path's dW (a few percent relative: 3 mantissa bits in each operand); into an fp32 sum
    it adds the same. Refused with the step merger's BF16 buffers. Uneven groups, an empty
    expert."""
    from megatron_dsv3.fp8.grouped_gemm import (fp8_grouped_wgrad_emulated,
                                                quantize_128x1_segments)
    from megatron_dsv3.moe.expert_wgrad import Segments
    from megatron_dsv3.moe.experts import experts_linear

    counts = [70, 0, 200, 30]
    seed, g, ends, x, w, dy = _experts_operands(counts)
    grads = {fp8_wgrad: _experts_linear_grads(x, w, dy, counts, fp8=True, fp8_wgrad=fp8_wgrad)
             for fp8_wgrad in (True, False)}
    assert torch.equal(grads[True][0], grads[False][0]), seed
    assert torch.equal(grads[True][1], grads[False][1]), seed
    want = fp8_grouped_wgrad_emulated(quantize_128x1_segments(dy, ends),
                                      quantize_128x1_segments(x, ends), ends)
    assert torch.equal(grads[True][2], want), f"FP8 weight gradient (seed {seed})"
    error = (grads[True][2] - grads[False][2]).norm() / grads[False][2].norm()
    assert 2**-10 < error < 2**-4, (seed, error.item(), "E4M3 rounding of both operands")
    start = torch.randn(w.shape, generator=g)
    total = start.clone()
    experts_linear(x.clone().requires_grad_(), w.clone().requires_grad_(), "loop", counts,
                   fp32_grad=total, fp8=True, fp8_wgrad=True).backward(dy)
    assert torch.allclose(total - start, want, rtol=0, atol=1e-5), seed
    segments = Segments(w, 1, 400, torch.zeros((), dtype=torch.int64), torch.float32)
    with pytest.raises(ValueError, match="routed_experts_wgrad.*--expert-wgrad step.*in-gemm"):
        experts_linear(x.clone().requires_grad_(), w.clone().requires_grad_(), "loop", counts,
                       segments=segments, fp8=True, fp8_wgrad=True)


def test_the_experts_fp8_weight_gradient_needs_their_fp8_gemms():
    with pytest.raises(ConfigError, match=r"'routed_experts_wgrad' without 'routed_experts'"):
        tiny().replace(fp8_layers=("attention", "routed_experts_wgrad"))
    assert "routed_experts_wgrad" not in tiny().fp8_layers  # opt-in


def _fp8_ep2_worker(rank, world, full_state, input_ids, labels):
    """FP8_SMALL in FP8 at EP=2 (DP=2), each rank its half of the batch: the mean loss and the
    gradient norm, without and with the dispatch in FP8."""
    import torch.distributed as dist

    from megatron_dsv3.config import to_megatron_config
    from megatron_dsv3.gradients import global_grad_norm, reduce_gradients
    from megatron_dsv3.model import build_model
    from megatron_dsv3.moe.balance import set_balance_loss_scale
    from megatron_dsv3.mtp import weighted_lm_loss
    from megatron_dsv3.parallel import init_distributed, load_full_state_dict

    pg = init_distributed(tensor_parallel_size=1, expert_parallel_size=2)
    out = {}
    for layers in (FP8_NO_DISPATCH, FP8_ALL):
        cfg = tiny().replace(**FP8_SMALL, fp8="deepseek", fp8_layers=layers)
        model = build_model(cfg, pg_collection=pg, megatron_config=to_megatron_config(
            cfg, expert_parallel_size=2, use_cpu_initialization=True))
        load_full_state_dict(model, full_state, pg.tp, pg.ep)
        set_balance_loss_scale(model, 1.0)
        share = slice(rank * len(input_ids) // world, (rank + 1) * len(input_ids) // world)
        loss = weighted_lm_loss(model(input_ids[share], None, None, labels=labels[share]),
                                0.3)[0]
        loss.backward()
        params = [p for p in model.parameters() if p.grad is not None]
        reduce_gradients(params, pg)
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        out[layers] = {"loss": mean / world, "grad_norm": global_grad_norm(params, pg),
                       "fp8_dispatch": model.decoder.layers[1].mlp.dispatcher.fp8}
    return out


FP8_ALL = DEFAULT_FP8_LAYERS
FP8_NO_DISPATCH = tuple(part for part in DEFAULT_FP8_LAYERS if part != "dispatch")


@pytest.mark.multiprocess
def test_expert_parallel_fp8_gives_the_single_process_fp8_loss(dist_single):
    """EP=2 x DP=2 on 2 gloo ranks against one process, same weights and batch, in FP8. The
    forward quantizes per token (1x128) and per weight block, so the split changes no FP8
    value: the loss is the single process's up to fp32 order. The gradients' 128x1 tiles run
    along the tokens of each rank's share: the norm agrees to FP8 rounding (2%). With the
    dispatch in FP8 as well the routed experts receive FP8 round trips of their rows and
    quantize them again in the same 1x128 tiles: the same E4M3 values (a tile's amax comes back
    as 448 x scale), scales within an ulp, so the loss stays that of FP8 experts fed BF16 rows
    (found so, exactly, here; the dispatch's own rounding is test_expert_parallel's)."""
    from helpers.gloo import run_gloo
    from helpers.tolerance import FP32_REORDER, assert_close
    from megatron_dsv3.gradients import global_grad_norm
    from megatron_dsv3.mtp import weighted_lm_loss

    model = _model(dist_single, fp8=True)
    state = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    ids = torch.randint(0, 256, (4, 33), generator=g)
    input_ids, labels = ids[:, :-1], ids[:, 1:]
    loss = weighted_lm_loss(model(input_ids, None, None, labels=labels), 0.3)[0]
    loss.backward()
    norm = global_grad_norm([p for p in model.parameters() if p.grad is not None], dist_single)
    ranks = run_gloo(_fp8_ep2_worker, 2, state, input_ids, labels)
    for rank, result in enumerate(ranks):
        plain, with_dispatch = result[FP8_NO_DISPATCH], result[FP8_ALL]
        assert not plain["fp8_dispatch"] and with_dispatch["fp8_dispatch"]
        assert_close(plain["loss"], loss.detach(), FP32_REORDER, "the same FP8 values", "loss")
        assert abs(plain["grad_norm"] / norm - 1) < 0.02, (rank, plain["grad_norm"], norm)
        assert_close(with_dispatch["loss"], plain["loss"], FP32_REORDER,
                     "FP8 experts re-quantize the dispatched FP8 rows to the same values", "loss")


def test_fp8_layers_trace_without_a_graph_break_and_compiled_equals_eager(dist_single,
                                                                          monkeypatch):
    """Under torch.compile fp8_linear is traced from custom operators (fp8/ops.py): the FP8
    attention module (three FP8 projections) traces as one graph (dynamo's explain), and a
    compiled fp8_linear with a bias gives the eager results bit for bit, forward and backward
    (aot_eager: the operators' bodies run as in eager; on the CPU, the emulation)."""
    from megatron_dsv3.attention.mla import MultiLatentAttention

    monkeypatch.setenv("TORCHDYNAMO_DISABLE", "0")  # the suite turns dynamo off
    model = _model(dist_single, fp8=True)
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    x = torch.randn(16, 1, 128, generator=g, requires_grad=True)
    module = next(m for m in model.modules() if isinstance(m, MultiLatentAttention))
    assert module.linear_q_up.fp8, "the projections are the FP8 ones"
    torch._dynamo.reset()
    explained = torch._dynamo.explain(module.forward)(x, None)
    reasons = [b.reason.splitlines()[0] for b in explained.break_reasons]
    assert explained.graph_break_count == 0 and explained.graph_count == 1, reasons

    w = torch.randn(256, 128, generator=g, requires_grad=True)
    b = torch.randn(256, generator=g, requires_grad=True)
    dy = torch.randn(16, 1, 256, generator=g)
    results = []
    for run in (lambda *a: fp8_linear(*a),
                torch.compile(lambda *a: fp8_linear(*a), backend="aot_eager", fullgraph=True)):
        x.grad = w.grad = b.grad = None
        y = run(x, w, b)
        y.backward(dy)
        results.append((y.detach(), x.grad, w.grad, b.grad))
    torch._dynamo.reset()
    for name, eager, compiled in zip(("y", "dx", "dW", "db"), *results):
        assert torch.equal(eager, compiled), name


def test_fp8_routed_experts_trace_without_a_graph_break_and_compiled_equals_eager(
        dist_single, monkeypatch):
    """The routed experts' FP8 path (grouped weight blocks, grouped FP8 GEMM, segment tiles, the
    FP8 weight gradient into an fp32 sum or returned) is fp8/ops.py's custom operators: the FP8
    MoE module traces as one graph (before, it left torch.compile: each MoE layer split into
    CUDA graphs with eager FP8 kernels between them), and compiled experts_linear gives the
    eager results bit for bit, forward and backward, both weight-gradient modes (aot_eager: the
    operators' bodies run as in eager; the emulation on the CPU). The operators' fake
    implementations agree with their bodies (torch.library.opcheck's fake-tensor test)."""
    from megatron_dsv3.fp8 import ops
    from megatron_dsv3.moe import experts
    from megatron_dsv3.moe.experts import experts_linear
    from megatron_dsv3.moe.layer import DeepSeekMoE

    # the GPU's grouped experts (the CPU's loop reads the counts on the host)
    monkeypatch.setattr(experts, "resolve_experts_impl", lambda impl, device: "grouped_mm")
    monkeypatch.setenv("TORCHDYNAMO_DISABLE", "0")  # the suite turns dynamo off
    model = _model(dist_single, fp8=True)
    # in bf16, as the GPU runs it (the BF16 weight gradient's grouped GEMM traces only there)
    module = next(m for m in model.modules() if isinstance(m, DeepSeekMoE)).to(torch.bfloat16)
    assert module.experts.fp8
    torch._dynamo.reset()
    explained = torch._dynamo.explain(module.forward)(torch.randn(16, 1, 128,
                                                                  dtype=torch.bfloat16))
    reasons = [b.reason.splitlines()[0] for b in explained.break_reasons]
    assert explained.graph_break_count == 0 and explained.graph_count == 1, reasons

    counts = [70, 0, 200, 30]
    seed, g, ends, x, w, dy = _experts_operands(counts)
    for into_sum in (False, True):
        results = []
        for compiled in (False, True):
            x_in, w_in = x.clone().requires_grad_(), w.clone().requires_grad_()
            total = torch.zeros(w.shape) if into_sum else None

            def run(x_in, w_in):
                return experts_linear(x_in, w_in, "grouped_mm", ends, fp32_grad=total,
                                      fp8=True, fp8_wgrad=True)

            y = (torch.compile(run, backend="aot_eager", fullgraph=True) if compiled
                 else run)(x_in, w_in)
            y.backward(dy)
            results.append((y.detach(), x_in.grad, total if into_sum else w_in.grad))
        torch._dynamo.reset()
        for name, eager, traced in zip(("y", "dx", "dW"), *results):
            assert torch.equal(eager, traced), (name, into_sum, seed)

    x_q = ops.quantize(x, "1x128")
    w_q = ops.grouped_weight(w)
    segments = ops.quantize_segments(x, ends), ops.quantize_segments(dy, ends)
    for op, args in (
            (ops.fp8_grouped_weight, (w,)),
            (ops.fp8_grouped_gemm_op, (*x_q, *w_q, ends, torch.float32)),
            (ops.fp8_grouped_transposed, w_q),
            (ops.fp8_quantize_segments, (x, ends)),
            (ops.fp8_grouped_wgrad_op, (*segments[1], *segments[0], x.shape[0], ends,
                                        torch.float32)),
            (ops.fp8_grouped_wgrad_add_op, (*segments[1], *segments[0], x.shape[0], ends,
                                            torch.zeros(w.shape)))):
        # the fake implementation's outputs against the body's (torch's schema check cannot
        # compare FP8 tensors on the CPU)
        torch.library.opcheck(op, args, test_utils="test_faketensor")


def test_static_blocks_serve_compiled_layers_inside_a_step_and_are_refreshed_each_step(
        dist_single, monkeypatch):
    """The FP8 layers' static weight blocks (fp8/weight_cache.keep_static_blocks): inside a
    training step's weights_fixed() the compiled layers (aot_eager) read them and quantize no
    weight, and give the loss and gradients of the eager model quantizing per call bit for
    bit; after the weights change, the next step's blocks are the new weights' (results equal
    a fresh per-call run again); outside a step none is handed out."""
    from megatron_dsv3.fp8 import ops
    from megatron_dsv3.fp8.weight_cache import static_blocks, weights_fixed
    from megatron_dsv3.model import compile_model
    from megatron_dsv3.moe import experts
    from megatron_dsv3.moe.experts import RoutedExperts
    from megatron_dsv3.mtp import weighted_lm_loss

    monkeypatch.setattr(experts, "resolve_experts_impl", lambda impl, device: "grouped_mm")
    monkeypatch.setenv("TORCHDYNAMO_DISABLE", "0")  # the suite turns dynamo off
    model = _model(dist_single, fp8=True).to(torch.bfloat16)
    moe = next(m for m in model.modules() if isinstance(m, RoutedExperts))
    weight_quantizations = []
    for table, key in ((ops._QUANTIZERS, "128x128"), (vars(ops), "quantize_128x128_grouped_fused")):
        original = table[key]
        monkeypatch.setitem(table, key, lambda w, _q=original: (weight_quantizations.append(
            tuple(w.shape)), _q(w))[1])
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    ids = torch.randint(0, 256, (2, 33), generator=g)

    def loss_and_grads(forward):
        model.zero_grad(set_to_none=True)
        loss = weighted_lm_loss(forward(ids[:, :-1], None, None, labels=ids[:, 1:]), 0.3)[0]
        loss.backward()
        return [loss.detach()] + [p.grad.clone() for p in model.parameters() if p.grad is not None]

    torch._dynamo.reset()
    compile_model(model, "modules", backend="aot_eager")
    try:
        for step in range(2):
            weight_quantizations.clear()
            with torch.compiler.set_stance("force_eager"):  # eager outside a step: W
                expected = loss_and_grads(model.forward)      # quantized per call
            assert weight_quantizations and static_blocks(moe, "fc1_blocks") is None
            with weights_fixed():
                refreshed = len(weight_quantizations)
                blocks = static_blocks(moe, "fc1_blocks")
                assert blocks is not None and blocks[0].dtype == torch.float8_e4m3fn
                got = loss_and_grads(model.forward)  # the compiled modules
                assert len(weight_quantizations) == refreshed, "a weight quantized in the step"
            for i, (e, c) in enumerate(zip(expected, got)):
                assert torch.equal(e, c), (step, i)
            with torch.no_grad():  # an optimizer step: the next step must see new weights
                for p in model.parameters():
                    p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 1e-2)
    finally:
        torch._dynamo.reset()
