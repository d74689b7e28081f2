"""Expert parallelism (gloo processes) against a single process with the same weights.

Model parity: the full model is built once (TP=1, EP=1, in the pytest process) and run on a
global batch of 4 sequences; each layout below runs the same weights (every rank loads its
TP/EP slice, `parallel.shard_state_dict`) with each data-parallel rank on its share of the
batch, reduces the gradients as the training job does (`train.reduce_gradients`) and
re-assembles every parameter's gradient (`gather_state_dict` over TP and EP). Layouts:
  2 processes  EP=2            (DP=2, expert-DP=1)
  4 processes  TP=2 x EP=2     (DP=2, expert-DP=1: the experts' FFN width split over TP too)
  4 processes  EP=2            (DP=4, expert-DP=2: expert gradients summed over 2 replicas,
                                divided by DP=4 -- the normalisation that differs from DP's)
  4 processes  EP=4            (DP=4, 2 experts per rank)

Tolerances:
  * FP32_REORDER for the loss, every gradient and the gradient norm: the same fp32 math on the
    same rows; what differs is summation order (the DP mean of per-rank means instead of one
    mean, an expert's weight gradient summed over its rows grouped by source rank, TP's split
    GEMM reductions) -- errors of a few ulps.
  * exact for the router biases after the bias update (integer loads summed over DP, then a
    sign), and for the all-to-all dispatcher against LocalDispatcher with elementwise "experts"
    (every output row is computed by the same operations in the same order; only where it is
    computed changes).
  * FP32_REORDER for the dispatcher with real SwiGLU experts: an expert's GEMM sees its rows
    from all EP ranks in one batch, so BLAS may block the reduction differently.
Measured on 2 x86 cores: losses and gradient norms identical, gradients within 1e-6, expert
weight gradients of the dispatcher check within 1.1e-7.
"""

import os
from pathlib import Path

import pytest
import torch

from helpers.gloo import run_gloo
from helpers.tolerance import FP32_REORDER, assert_close, assert_equal

pytestmark = pytest.mark.multiprocess

BATCH, SEQ = 4, 24  # the global batch; each DP rank takes BATCH / DP whole sequences
LAYOUTS_2 = [(1, 2)]                    # (TP, EP) on 2 processes
LAYOUTS_4 = [(2, 2), (1, 2), (1, 4)]    # on 4 processes


def _config():
    from megatron_dsv3.config import tiny

    # 8 experts in 4 groups, top-2 of 2 groups; seq_aux_loss on; MTP on (its MoE layer too).
    return tiny().replace(num_layers=2, moe__first_k_dense=1, moe__seq_aux_loss_coeff=1e-2)


def _loss(model, input_ids, labels):
    from megatron_dsv3.mtp import mtp_loss

    out = model(input_ids, None, None, labels=labels)
    return out.lm_loss.mean() + mtp_loss(out.mtp_losses, out.mtp_valid, 0.3)


def _biases(model) -> dict:
    return {name: router.expert_bias.clone() for name, router in _routers(model)}


def _routers(model):
    from megatron_dsv3.moe.balance import routers

    return routers(model)


BIAS_RATE = 1e-2


# ----------------------------------------------------------------------------------------------
# Workers (module level: run_gloo pickles them)
# ----------------------------------------------------------------------------------------------
def _layout_step(pg, full_state, input_ids, labels) -> dict:
    """One forward/backward of this rank's share, gradients reduced as in train.py."""
    import torch.distributed as dist

    from megatron_dsv3.model import build_model
    from megatron_dsv3.moe.balance import set_balance_loss_scale, update_expert_biases
    from megatron_dsv3.parallel import gather_state_dict, load_full_state_dict
    from megatron_dsv3.gradients import global_grad_norm, reduce_gradients

    model = build_model(_config(), pg_collection=pg)
    load_full_state_dict(model, full_state, pg.tp, pg.ep)
    set_balance_loss_scale(model, 1.0)  # one micro-batch
    dp, dp_rank = pg.dp.size(), pg.dp.rank()
    share = slice(dp_rank * BATCH // dp, (dp_rank + 1) * BATCH // dp)
    model.train()
    loss = _loss(model, input_ids[share], labels[share])
    loss.backward()
    params = [p for p in model.parameters() if p.grad is not None]
    reduce_gradients(params, pg)
    norm = global_grad_norm(params, pg)
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss, group=pg.dp)
    mean_loss /= dp
    update_expert_biases(model, group=pg.dp, tokens_seen=0, rate=BIAS_RATE)
    experts = model.decoder.layers[1].mlp.experts
    return {"loss": mean_loss, "grad_norm": norm,
            "grads": gather_state_dict(model, pg.tp, grads=True, ep_group=pg.ep),
            "biases": _biases(model),
            "groups": {"dp": dp, "ep": pg.ep.size(), "expt_dp": pg.expt_dp.size(),
                       "local_experts": experts.fc1.shape[0],
                       "expert_offset": experts.expert_offset}}


def _run_layouts(rank, world, full_state, input_ids, labels, layouts, extra):
    from megatron.core import parallel_state

    from megatron_dsv3.parallel import init_distributed

    results = {}
    for tp, ep in layouts:
        pg = init_distributed(tensor_parallel_size=tp, expert_parallel_size=ep)
        results[(tp, ep)] = _layout_step(pg, full_state, input_ids, labels)
        parallel_state.destroy_model_parallel()
    for name in extra:
        results[name] = globals()[name](rank, world)
    return results


def _dispatcher_against_local(rank, world) -> dict:
    """The all-to-all dispatcher over the whole world against LocalDispatcher with all experts,
    each rank on its own tokens and routing (expert 5 unused, uneven loads)."""
    import torch.distributed as dist

    from megatron_dsv3.moe.dispatcher import AllToAllDispatcher, LocalDispatcher
    from megatron_dsv3.moe.experts import RoutedExperts
    from megatron_dsv3.moe.router import Routing, count_tokens_per_expert

    group = dist.new_group(list(range(world)))
    T, K, E, D, F = 13 + 4 * rank, 3, 8, 6, 10
    L = E // world
    torch.manual_seed(100 + rank)
    usable = torch.tensor([0, 1, 2, 3, 4, 6, 7])
    topk_TK = torch.stack([usable[torch.randperm(len(usable))[:K]] for _ in range(T)])
    gates = torch.rand(T, K)
    routing = Routing(topk_TK, gates, torch.zeros(T, E), count_tokens_per_expert(topk_TK, E))
    x = torch.randn(T, D)
    grad_out = torch.randn(T, D)

    def run(dispatcher, experts_fn, x=x):
        x_TD = x.clone().requires_grad_()
        gates_TK = gates.clone().requires_grad_()
        x_ND, counts, state = dispatcher.dispatch(x_TD, routing)
        out = dispatcher.combine(experts_fn(x_ND, counts), gates_TK, state)
        (out * grad_out).sum().backward()
        return out.detach(), x_TD.grad, gates_TK.grad, counts

    def scale_by_expert(offset):  # expert e multiplies its rows by (e + 1)
        return lambda x_ND, counts: x_ND * (
            torch.repeat_interleave(torch.arange(len(counts)) + offset + 1, counts)
        ).unsqueeze(-1)

    local, ep = LocalDispatcher(), AllToAllDispatcher(group)
    out = {"scaled_local": run(local, scale_by_expert(0)),
           "scaled_ep": run(ep, scale_by_expert(rank * L))}
    # FP8 dispatch: against the local dispatcher on x's FP8 round trip (rows of 6: one partial
    # 1x128 tile each; row 0 scaled up so that rows' scales differ by 2^20)
    from megatron_dsv3.fp8 import quantize_1x128

    x_wide = x.clone()
    x_wide[0] *= 2.0**20
    out["fp8_ep"] = run(AllToAllDispatcher(group, fp8=True), scale_by_expert(rank * L), x_wide)
    out["fp8_local"] = run(local, scale_by_expert(0), quantize_1x128(x_wide).dequantize())
    out["fp8_bf16_local"] = run(local, scale_by_expert(0), x_wide)
    # Real experts: full weights here, this rank's slice of them under EP (same draw everywhere).
    torch.manual_seed(0)
    full = RoutedExperts(E, D, F, tp_group=None, dtype=torch.float32, init_std=0.3, impl="loop")
    shard = RoutedExperts(L, D, F, tp_group=None, dtype=torch.float32, impl="loop",
                          expert_offset=rank * L)
    with torch.no_grad():
        shard.fc1.copy_(full.fc1[rank * L:(rank + 1) * L])
        shard.fc2.copy_(full.fc2[rank * L:(rank + 1) * L])
    out["experts_local"] = run(local, full)
    out["experts_ep"] = run(ep, shard)
    # Expected expert gradients: the sum over ranks of each rank's local-reference gradient.
    expected = [full.fc1.grad.clone(), full.fc2.grad.clone()]
    for grad in expected:
        dist.all_reduce(grad, group=group)
    gathered = []
    for grad in (shard.fc1.grad, shard.fc2.grad):
        parts = [torch.empty_like(grad) for _ in range(world)]
        dist.all_gather(parts, grad, group=group)
        gathered.append(torch.cat(parts))
    out["expert_grads"] = (gathered, expected)
    return out


def _destination_ranks(rank, world) -> dict:
    """Route 64 tokens, dispatch (source rank, token, expert) triples over EP = world, and
    record where each arrived; with and without group-limited routing."""
    import torch.distributed as dist

    from megatron_dsv3.config import MoEConfig
    from megatron_dsv3.moe.dispatcher import AllToAllDispatcher
    from megatron_dsv3.moe.router import Router

    group = dist.new_group(list(range(world)))
    T, E, K, hidden = 64, 8, 3, 16
    out = {}
    for num_groups, topk_groups in ((4, 2), (1, 1)):
        cfg = MoEConfig(num_experts=E, top_k=K, expert_ffn_size=8, num_shared_experts=0,
                        first_k_dense=0, dense_ffn_size=0, num_groups=num_groups,
                        topk_groups=topk_groups)
        torch.manual_seed(7)
        router = Router(hidden, cfg, dtype=torch.float32, init_std=1.0)
        torch.manual_seed(50 + rank)
        routing = router(torch.randn(T, hidden))
        # Payload row of assignment (t, k): (source rank, token, its expert), exact in fp32.
        payload_TD = torch.stack([torch.full((T,), float(rank)), torch.arange(T).float()], 1)
        x_MD, counts_L, _ = AllToAllDispatcher(group).dispatch(payload_TD, routing)
        L = E // world
        expert_M = torch.repeat_interleave(torch.arange(L) + rank * L, counts_L)
        received = torch.cat([x_MD.long(), expert_M.unsqueeze(1)], dim=1)  # [M, 3]
        everything = [None] * world
        dist.all_gather_object(everything, (rank, received, routing.topk_TK))
        out[num_groups] = everything
    return out


# ----------------------------------------------------------------------------------------------
# Fixtures: the single-process reference and the gloo runs
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference(dist_single):
    from megatron_dsv3.model import build_model
    from megatron_dsv3.moe.balance import set_balance_loss_scale, update_expert_biases
    from megatron_dsv3.gradients import global_grad_norm

    torch.manual_seed(0)
    model = build_model(_config(), pg_collection=dist_single)
    set_balance_loss_scale(model, 1.0)  # one micro-batch
    state = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    for name in state:
        if name.endswith("expert_bias"):  # biases that actually move the selection
            state[name] = torch.randn_like(state[name]) * 0.05
    model.load_state_dict(state, strict=False)
    torch.manual_seed(1)
    cfg = _config()
    input_ids = torch.randint(0, cfg.vocab_size, (BATCH, SEQ))
    labels = torch.randint(0, cfg.vocab_size, (BATCH, SEQ))
    model.train()
    loss = _loss(model, input_ids, labels)
    loss.backward()
    params = [p for p in model.parameters() if p.grad is not None]
    update_expert_biases(model, group=None, tokens_seen=0, rate=BIAS_RATE)
    return {"state": state, "input_ids": input_ids, "labels": labels,
            "loss": loss.detach(), "grad_norm": global_grad_norm(params, dist_single),
            "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
            "biases": _biases(model)}


@pytest.fixture(scope="module")
def runs(reference):
    args = (reference["state"], reference["input_ids"], reference["labels"])
    two = run_gloo(_run_layouts, 2, *args, LAYOUTS_2, ["_dispatcher_against_local"])
    four = run_gloo(_run_layouts, 4, *args, LAYOUTS_4, ["_destination_ranks"])
    return {2: two, 4: four}


def _layout_results(runs):
    for world, layouts in ((2, LAYOUTS_2), (4, LAYOUTS_4)):
        for layout in layouts:
            for rank, result in enumerate(runs[world]):
                yield f"TP={layout[0]} EP={layout[1]} rank {rank}", result[layout]


# ----------------------------------------------------------------------------------------------
# Model parity
# ----------------------------------------------------------------------------------------------
def test_layouts_build_the_groups_and_expert_shards_they_claim(runs):
    expected = {(1, 2, 2): (2, 2, 1), (2, 2, 4): (2, 2, 1), (1, 2, 4): (4, 2, 2),
                (1, 4, 4): (4, 4, 1)}   # (TP, EP, world) -> (DP, EP, expert-DP)
    for world, layouts in ((2, LAYOUTS_2), (4, LAYOUTS_4)):
        for tp, ep in layouts:
            for rank, result in enumerate(runs[world]):
                groups = result[(tp, ep)]["groups"]
                assert (groups["dp"], groups["ep"], groups["expt_dp"]) == expected[
                    (tp, ep, world)], f"{tp=}, {ep=}, {world=}, {rank=}: {groups}"
                assert groups["local_experts"] == 8 // ep
                # Megatron's order tp-cp-ep-dp-pp: the EP rank is (rank // TP) % EP.
                assert groups["expert_offset"] == (rank // tp) % ep * (8 // ep), (
                    f"{tp=}, {ep=}, {rank=}: {groups}")


def test_ep_loss_and_grad_norm_match_the_single_process_run(reference, runs):
    why = "fp32; DP mean of per-rank means, rows of an expert grouped by source rank"
    for label, result in _layout_results(runs):
        assert_close(result["loss"], reference["loss"], FP32_REORDER, why, f"loss {label}")
        assert_close(result["grad_norm"], reference["grad_norm"], FP32_REORDER,
                     why + "; expert shards' squares summed over TP and EP",
                     f"grad norm {label}")


def test_ep_gradients_of_every_parameter_match_the_single_process_run(reference, runs):
    why = ("fp32; non-expert grads averaged over DP, expert grads summed over expert-DP and "
           "divided by DP; summation order differs")
    expected = reference["grads"]
    for label, result in _layout_results(runs):
        assert set(result["grads"]) == set(expected), label
        for name, grad in expected.items():
            assert_close(result["grads"][name], grad, FP32_REORDER, why, f"{name} {label}")


def test_bias_update_sums_loads_over_dp_and_matches_the_single_process_run(reference, runs):
    for label, result in _layout_results(runs):
        assert set(result["biases"]) == set(reference["biases"]) and result["biases"]
        for name, bias in reference["biases"].items():
            assert_equal(result["biases"][name], bias, f"{name} {label}")


# ----------------------------------------------------------------------------------------------
# The dispatcher itself
# ----------------------------------------------------------------------------------------------
def test_all_to_all_dispatcher_matches_local_dispatcher_exactly_with_elementwise_experts(runs):
    for rank, result in enumerate(runs[2]):
        res = result["_dispatcher_against_local"]
        (out_l, dx_l, dg_l, _), (out_e, dx_e, dg_e, counts_e) = (res["scaled_local"],
                                                                 res["scaled_ep"])
        assert counts_e.numel() == 4, f"rank {rank}: {counts_e=} must count 8 / EP local experts"
        assert_equal(out_e, out_l, f"combine output rank {rank}")
        assert_equal(dx_e, dx_l, f"input gradient rank {rank}")
        assert_equal(dg_e, dg_l, f"gate gradient rank {rank}")
    # The two ranks' received counts add up to both ranks' assignments of each expert.
    total = sum(r["_dispatcher_against_local"]["scaled_local"][3] for r in runs[2])
    received = torch.cat([r["_dispatcher_against_local"]["scaled_ep"][3] for r in runs[2]])
    assert_equal(received, total, "rows received per expert")
    assert total[5] == 0 and total.sum() == 3 * (13 + 17)


def test_fp8_dispatch_delivers_each_row_with_its_scales_and_gradients_in_full_precision(runs):
    """AllToAllDispatcher(fp8=True): the rows cross the all-to-all as E4M3 with their 1x128
    scales; what the experts receive is exactly the FP8 round trip of the sent rows (the local
    dispatcher on quantize_1x128(x).dequantize() gives the same output and gate gradients),
    and the input gradient comes back unquantized (equal to the BF16 dispatcher's)."""
    for rank, result in enumerate(runs[2]):
        res = result["_dispatcher_against_local"]
        (out_f, dx_f, dg_f, _), (out_l, _, dg_l, _), (out_b, dx_b, _, _) = (
            res["fp8_ep"], res["fp8_local"], res["fp8_bf16_local"])
        assert_equal(out_f, out_l, f"combine output after FP8 dispatch, rank {rank}")
        assert_equal(dg_f, dg_l, f"gate gradient after FP8 dispatch, rank {rank}")
        assert_equal(dx_f, dx_b, f"input gradient (straight through), rank {rank}")
        assert not torch.equal(out_f, out_b), "FP8 must have rounded something"


def test_all_to_all_dispatcher_with_swiglu_experts_matches_local_with_all_experts(runs):
    why = "fp32; an expert's GEMM runs on its rows from both ranks at once"
    for rank, result in enumerate(runs[2]):
        res = result["_dispatcher_against_local"]
        for index, name in enumerate(("output", "input grad", "gate grad")):
            assert_close(res["experts_ep"][index], res["experts_local"][index], FP32_REORDER,
                         why, f"{name} rank {rank}")
        for actual, expected, name in zip(*res["expert_grads"], ("fc1", "fc2")):
            assert_close(actual, expected, FP32_REORDER, why + " (grad summed over sources)",
                         f"{name} grad rank {rank}")


def test_group_limited_routing_sends_each_token_to_at_most_topk_groups_ranks(runs):
    """8 experts in 4 groups over EP=4 (one group per rank), top-3 of the best 2 groups: every
    token's 3 rows reach at most 2 ranks; the same router without groups reaches 3."""
    from megatron_dsv3.moe.dispatcher import destination_ranks

    def arrivals(everything):
        ranks_of, experts_of = {}, {}
        for dest, received, _ in everything:
            for source, token, expert in received.tolist():
                ranks_of.setdefault((source, token), set()).add(dest)
                experts_of.setdefault((source, token), []).append(expert)
        return ranks_of, experts_of

    everything = runs[4][0]["_destination_ranks"]
    for num_groups, most in ((4, 2), (1, 3)):
        ranks_of, experts_of = arrivals(everything[num_groups])
        for source, _, topk_TK in everything[num_groups]:
            dest_TK = destination_ranks(topk_TK, 8, 4)
            for token, (experts, dests) in enumerate(zip(topk_TK.tolist(), dest_TK.tolist())):
                key = (source, token)
                # Every assignment arrives once, at the rank holding its expert.
                assert sorted(experts_of[key]) == sorted(experts), f"{num_groups=}, {key=}"
                assert ranks_of[key] == set(dests), f"{num_groups=}, {key=}"
        reached = max(len(dests) for dests in ranks_of.values())
        if num_groups == 4:
            assert reached <= 2, f"a token reached {reached} ranks; topk_groups=2 bounds it"
        else:
            assert reached == most, f"without groups some token should reach 3 ranks: {reached}"


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------
def test_expert_parallel_size_must_divide_the_experts():
    from megatron_dsv3.config import ConfigError, tiny, to_megatron_config
    from megatron_dsv3.moe.dispatcher import experts_per_rank

    with pytest.raises(ConfigError, match=r"expert_parallel_size=3 .*num_experts=8"):
        to_megatron_config(tiny(), expert_parallel_size=3)
    with pytest.raises(ConfigError, match=r"expert_parallel_size=3 .*num_experts=8"):
        experts_per_rank(8, 3)


@pytest.mark.parametrize("world, argv, expected", [
    ("6", ["--expert-parallel-size", "3"], "must divide the preset's moe.num_experts=8"),
    ("4", ["--expert-parallel-size", "8"], "must divide the data-parallel size WORLD_SIZE / TP "
                                           "= 4 / 1 = 4"),
    ("4", ["--expert-parallel-size", "2", "--tensor-parallel-size", "4"],
     "must divide the data-parallel size WORLD_SIZE / TP = 4 / 4 = 1"),
    ("1", ["--expert-parallel-size", "0"], "--expert-parallel-size 0 is invalid"),
])
def test_bad_expert_parallel_size_exits_naming_the_flag(world, argv, expected, capsys,
                                                       monkeypatch):
    from megatron_dsv3.train.args import parse_args

    monkeypatch.setenv("WORLD_SIZE", world)
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    assert expected in capsys.readouterr().err


def test_init_distributed_refuses_ep_not_dividing_dp(monkeypatch):
    from megatron_dsv3.parallel import init_distributed

    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ValueError, match=r"expert_parallel_size=3 is invalid.* = 4"):
        init_distributed(tensor_parallel_size=1, expert_parallel_size=3)


# ----------------------------------------------------------------------------------------------
# The launcher (the training job with --expert-parallel-size: test_train.py, layout pp2-ep2)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("env, expected", [
    ({"NPROC": "2", "TP": "1", "EP": "4"}, "EP=4 must divide the data-parallel size"),
    ({"NPROC": "2", "TP": "2", "PP": "2"}, "TP * PP = 4 must divide NPROC=2"),
    ({"NPROC": "4", "PP": "2", "EP": "4"},
     "EP=4 must divide the data-parallel size NPROC / (TP * PP) = 2"),
    ({"NPROC": "2", "PP": "x"}, "PP=x must be a positive integer"),
])
def test_launcher_refuses_tp_pp_ep_that_do_not_divide_nproc(env, expected, tmp_path):
    """The launcher checks its sizes before it starts anything. PYTHON is a stub answering its
    GPU probe (`python -c 'import torch; ...'`: ~3 s of imports per call) with 0 GPUs."""
    import subprocess

    stub = tmp_path / "python"
    stub.write_text("#!/bin/sh\necho 0\n")
    stub.chmod(0o755)
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(["bash", str(root / "launch" / "torchrun_local.sh"), "--steps", "1"],
                          env={**os.environ, "PYTHON": str(stub), **env}, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and expected in proc.stderr, (env, proc.stderr)
