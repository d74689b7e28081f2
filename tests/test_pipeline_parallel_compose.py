"""Pipeline parallelism composed with expert and tensor parallelism (gloo, 4 processes).

WORLD = PP x DP x TP in Megatron's layout (`parallel.init_distributed`, PP outermost, EP carved
out of the DP ranks holding the same stages). Layouts on 4 processes:
  PP=2 x EP=2   pipelines {0, 2}, {1, 3}; stage ranks (DP = EP = 2) {0, 1}, {2, 3}
  PP=2 x TP=2   tensor groups {0, 1}, {2, 3}; pipelines {0, 2}, {1, 3}; DP = 1
The full model (TP=1, EP=1, 4 decoder layers, MTP, sequence balance loss) is built once in the
pytest process; every rank builds its DualPipeV stages from that state dict, holding its TP/EP
shards (`build_rank_stages(..., pg_collection)`), runs one step of M = 4 micro-batches with the
MoE F&B overlap on (its all-to-alls over the stage's EP group, asynchronous while the other
micro-batch computes), reduces the gradients as the training job does
(`train.reduce_gradients`: non-expert over the stage's DP group, expert shards over its
expert-DP group, both / DP), takes the global norm (`train.global_grad_norm`: over TP, EP and
PP) and one bias update over the stage's DP group, then gathers every gradient under the full
model's names (`gather_stage_state` over TP, EP and PP). The single process runs the same
micro-batches whole: DP rank r's share of micro-batch m is rows [r B, (r+1) B) of it.

Tolerances:
  * FP32_REORDER for losses, every gradient and the norm: the same fp32 math on the same rows;
    what differs is summation order -- the DP mean of per-rank means instead of one mean over
    the micro-batch, an expert's weight gradient summed over rows grouped by source rank (EP),
    TP's split GEMM reductions and vocab-parallel log-sum-exp, the embedding's two uses per
    micro-batch accumulated at different times by the pipeline, float64 norm partials summed
    per group;
  * exact for the router biases after the update: integer loads summed over DP, then a sign.
The training job in the PP=2 x EP=2 layout, against DP=2 and resumed: test_train.py (pp2-ep2).
"""

from __future__ import annotations

import pytest
import torch

from helpers.gloo import run_gloo
from helpers.tolerance import FP32_REORDER, assert_close, assert_equal

pytestmark = pytest.mark.multiprocess

MICRO_BATCH, SEQ, VOCAB = 2, 16, 256   # per DP rank
NUM_MICROBATCHES, NUM_LAYERS, PP = 4, 4, 2
MTP_LAMBDA, BIAS_RATE = 0.3, 1e-2
# (TP, EP, B's weight gradients behind its exchanges in F&B steps) with PP=2 on 4 processes
LAYOUTS = [(1, 2, False), (1, 2, True), (2, 1, False)]
WHY = ("fp32, summation order only: DP mean of per-rank means, expert gradients summed by "
       "source rank, TP-split GEMM reductions, the embedding's two uses accumulated apart")


def _config():
    from megatron_dsv3.config import tiny

    return tiny().replace(num_layers=NUM_LAYERS, vocab_size=VOCAB, max_seq_len=SEQ,
                          moe__seq_aux_loss_coeff=1e-2)


def _data(global_batch: int) -> tuple[list, list]:
    generator = torch.Generator().manual_seed(11)
    ids = [torch.randint(0, VOCAB, (global_batch, SEQ), generator=generator)
           for _ in range(NUM_MICROBATCHES)]
    labels = [torch.randint(0, VOCAB, (global_batch, SEQ), generator=generator)
              for _ in range(NUM_MICROBATCHES)]
    return ids, labels


def _set_aux_loss_scale(module) -> None:
    from megatron_dsv3.moe.balance import set_balance_loss_scale

    set_balance_loss_scale(module, 1.0 / NUM_MICROBATCHES)


# ----------------------------------------------------------------------------------------------
# The single-process reference (pytest process)
# ----------------------------------------------------------------------------------------------
def _full_model(pg):
    from megatron_dsv3.model import build_model

    torch.manual_seed(1234)
    return build_model(_config(), pg_collection=pg)


def _reference(pg, dp: int) -> dict:
    """The whole model on micro-batches of DP * B sequences, in order; one bias update."""
    from megatron_dsv3.moe.balance import routers, update_expert_biases
    from megatron_dsv3.mtp import weighted_lm_loss

    model = _full_model(pg)
    _set_aux_loss_scale(model)
    ids, labels = _data(dp * MICRO_BATCH)
    losses = []
    for m in range(NUM_MICROBATCHES):
        out = model(ids[m], None, None, labels=labels[m])
        loss = weighted_lm_loss(out, MTP_LAMBDA)[0] / NUM_MICROBATCHES
        loss.backward()
        losses.append(loss.detach())
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    norm = torch.stack([g.double().pow(2).sum() for g in grads.values()]).sum().sqrt()
    update_expert_biases(model, tokens_seen=0, rate=BIAS_RATE)
    return {"losses": torch.stack(losses), "grads": grads, "norm": norm,
            "biases": {name: r.expert_bias.clone() for name, r in routers(model)}}


# ----------------------------------------------------------------------------------------------
# Pipelined workers (module level: run_gloo pickles them)
# ----------------------------------------------------------------------------------------------
def _pipelined_step(pg, full_state: dict, defer_weight_grads: bool = False) -> dict:
    import torch.distributed as dist

    from megatron_dsv3.moe.balance import routers, update_expert_biases
    from megatron_dsv3.pipeline import DualPipeV, TensorSpec
    from helpers.stages import build_rank_stages, gather_stage_state
    from megatron_dsv3.pipeline.stages import StagePlan
    from megatron_dsv3.gradients import global_grad_norm, reduce_gradients

    cfg = _config()
    plan = StagePlan("dualpipev", pg.pp.size(), NUM_LAYERS)
    # the F&B overlap on in both layouts (its default is on only with EP > 1)
    stages = build_rank_stages(cfg, plan, pg.pp.rank(), full_state, pg_collection=pg,
                               overlap_moe=True)
    pieces: list = []
    for stage in stages:
        _set_aux_loss_scale(stage)
        stage.piecewise_layers.trace = pieces
        stage.piecewise_layers.defer_weight_grads = defer_weight_grads
    dp, dp_rank = pg.dp.size(), pg.dp.rank()
    ids, labels = _data(dp * MICRO_BATCH)
    share = slice(dp_rank * MICRO_BATCH, (dp_rank + 1) * MICRO_BATCH)
    ids, labels = [x[share] for x in ids], [y[share] for y in labels]
    last = [s for s in stages if s.is_last]
    pipe = DualPipeV(stages, group=pg.pp, p2p_specs=[
        TensorSpec((SEQ, MICRO_BATCH, cfg.hidden_size), cfg.torch_dtype)])
    result = pipe.step(NUM_MICROBATCHES, inputs=ids, labels=list(zip(ids, labels)),
                       loss_fn=last[0].loss_fn(NUM_MICROBATCHES, MTP_LAMBDA) if last else None)
    losses = None
    if result.losses is not None:  # pipeline rank 0 holds the last stage: the DP mean
        assert list(result.microbatches) == list(range(NUM_MICROBATCHES))
        losses = torch.stack(list(result.losses)).detach()
        dist.all_reduce(losses, group=pg.dp)
        losses /= dp

    params = [p for stage in stages for p in stage.parameters() if p.grad is not None]
    reduce_gradients(params, pg)
    norm = global_grad_norm(params, pg)
    grads = gather_stage_state(stages, pg.pp, grads=True, tp_group=pg.tp, ep_group=pg.ep)
    update_expert_biases(torch.nn.ModuleList(stages), group=pg.dp, tokens_seen=0,
                         rate=BIAS_RATE)
    biases: list = [None] * pg.pp.size()
    dist.all_gather_object(biases, {stage.full_name(name): r.expert_bias.clone()
                                    for stage in stages for name, r in routers(stage)},
                           group=pg.pp)
    first = dist.get_rank() == 0
    return {"losses": losses, "norm": norm, "grads": grads if first else None,
            "biases": {k: v for part in biases for k, v in part.items()},
            "interleaved": _interleaved(pieces),
            "weight_grads_in_fb": "B.wgrad.run" in pieces,
            "sizes": {"dp": dp, "ep": pg.ep.size(), "tp": pg.tp.size(),
                      "expt_dp": pg.expt_dp.size(), "pp_ranks": dist.get_process_group_ranks(
                          pg.pp)}}


def _interleaved(events: list[str]) -> bool:
    """Whether some forward dispatch was in flight while backward pieces ran (the F&B step
    interleaved two micro-batches): a B event between an "F<i>.dispatch.issue" and its wait."""
    for i, event in enumerate(events):
        if event.startswith("F") and event.endswith(".dispatch.issue"):
            j = events.index(event.replace(".issue", ".wait"), i)
            if any(e.startswith("B") for e in events[i + 1:j]):
                return True
    return False


def _compose_worker(rank: int, world: int, layouts: list, full_state: dict) -> dict:
    from megatron.core import parallel_state

    from megatron_dsv3.parallel import init_distributed, shutdown_distributed

    results = {}
    try:
        for tp, ep, defer in layouts:
            # a short timeout turns a deadlock into an error instead of a hung test
            pg = init_distributed(tp, ep, pipeline_parallel_size=PP, backend="gloo",
                                  timeout_s=120)
            results[(tp, ep, defer)] = _pipelined_step(pg, full_state, defer)
            parallel_state.destroy_model_parallel()
    finally:
        shutdown_distributed()
    return results


def test_pp2_with_ep2_or_tp2_matches_single_process_losses_gradients_and_biases(dist_single):
    full = _full_model(dist_single)
    full_state = {k: v for k, v in full.state_dict().items() if isinstance(v, torch.Tensor)}
    results = run_gloo(_compose_worker, 4, LAYOUTS, full_state)
    for tp, ep, defer in LAYOUTS:
        ctx = f"PP=2 x TP={tp} x EP={ep}" + (", B's weight grads behind its exchanges" if defer
                                              else "")
        per_rank = [r[(tp, ep, defer)] for r in results]
        dp = 4 // (PP * tp)
        assert per_rank[1]["sizes"] == {"dp": dp, "ep": ep, "tp": tp, "expt_dp": dp // ep,
                                        "pp_ranks": [1, 3]}, ctx
        ref = _reference(dist_single, dp)
        # pipeline rank 0 (global ranks 0 and 1) computes every micro-batch's loss
        for rank, result in enumerate(per_rank):
            if rank < 2:
                assert_close(result["losses"], ref["losses"], FP32_REORDER, WHY,
                             f"{ctx} rank {rank} losses")
            else:
                assert result["losses"] is None, ctx
            assert_close(result["norm"], ref["norm"].float(), FP32_REORDER, WHY,
                         f"{ctx} rank {rank} grad norm")
        grads = per_rank[0]["grads"]
        assert set(grads) == set(ref["grads"]), f"{ctx}: {set(grads) ^ set(ref['grads'])}"
        for name, grad in grads.items():
            assert_close(grad, ref["grads"][name], FP32_REORDER, WHY, f"{ctx} {name}")
        for rank, result in enumerate(per_rank):
            assert set(result["biases"]) == set(ref["biases"]), ctx
            for name, bias in result["biases"].items():
                assert_equal(bias, ref["biases"][name], f"{ctx} rank {rank} {name}")
        # the F&B hook interleaved two micro-batches' MoE pieces (with EP: their all-to-alls)
        assert any(r["interleaved"] for r in per_rank), ctx
        assert any(r["weight_grads_in_fb"] for r in per_rank) == defer, ctx

