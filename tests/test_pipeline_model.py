"""DeepSeek-V3 on DualPipe / DualPipeV (gloo processes) against a single process.

The tiny preset shrunk (vocab 256, sequences of 16, micro-batches of 2) with 4 decoder layers
(PP=2: DualPipeV cuts 4 stages, DualPipe 2) or 8 (PP=4 DualPipeV: 8 stages), MTP on, the
sequence balance loss on. The full model is built once in the pytest process; every rank
builds its stages from that state dict (`build_rank_stages`), runs one step through the native
schedule API (`step(inputs, labels, loss_fn=last_stage.loss_fn(M, lambda))`) or through the Megatron adapter
(`forward_backward_func(forward_step_func=forward_step, ...)`), with the stages' MoE F&B
overlap (fb_overlap.PiecewiseLayers: the schedules' F&B steps interleave two micro-batches'
MoE pieces) or with the plain layer loop, and the parent compares with the single-process run
of the same micro-batches (loss / M per micro-batch, backward in order).

Tolerances:
  * exact for every loss and every gradient except the embedding's, with DualPipeV: each stage
    runs the same fp32 ops on the same data as the whole model, and each parameter accumulates
    its micro-batches in the same order (a chunk runs its backwards in micro-batch order);
  * exact for DualPipe against the single process summed per direction (micro-batches 0..M/2-1
    and M/2..M-1 apart, then added): each copy sums its direction, `reduce_mirrored_grads` adds
    the two; FP32_REORDER against the plain in-order sum (another association of that sum);
  * FP32_REORDER for the embedding: it is used twice per micro-batch (input lookup in stage 0,
    MTP lookup in the last stage); one backward sums both before accumulating, the pipeline
    accumulates them at different times, interleaved with other micro-batches;
  * exact for the routers' token counts (integers) and the executed order;
  * the same bounds with and without the F&B overlap: the pieces run the layers' own ops.
Measured on 2 cores: the embedding within 1.2e-7, DualPipe against the in-order sum within 2e-7.
"""

from __future__ import annotations

from functools import partial
from typing import Optional

import pytest
import torch

from helpers.gloo import run_gloo
from helpers.tolerance import FP32_REORDER, assert_close, assert_equal

pytestmark = pytest.mark.multiprocess

MICRO_BATCH, SEQ, VOCAB = 2, 16, 256
MTP_LAMBDA = 0.3
EMBEDDING = "embedding.word_embeddings.weight"
WHY_EMBEDDING = ("the embedding's two uses per micro-batch (stage 0, MTP on the last stage) "
                 "are accumulated separately and interleaved with other micro-batches")


def _config(num_layers: int):
    from megatron_dsv3.config import tiny

    return tiny().replace(num_layers=num_layers, vocab_size=VOCAB, max_seq_len=SEQ,
                          moe__seq_aux_loss_coeff=1e-2)


def _data(num_microbatches: int) -> tuple[list, list]:
    generator = torch.Generator().manual_seed(11)
    ids = [torch.randint(0, VOCAB, (MICRO_BATCH, SEQ), generator=generator)
           for _ in range(num_microbatches)]
    labels = [torch.randint(0, VOCAB, (MICRO_BATCH, SEQ), generator=generator)
              for _ in range(num_microbatches)]
    return ids, labels


def _set_aux_loss_scale(module, num_microbatches: int) -> None:
    from megatron_dsv3.moe.balance import set_balance_loss_scale

    set_balance_loss_scale(module, 1.0 / num_microbatches)


# ----------------------------------------------------------------------------------------------
# The single-process reference (pytest process)
# ----------------------------------------------------------------------------------------------
def _full_model(pg, num_layers: int):
    from megatron_dsv3.model import build_model

    torch.manual_seed(1234)
    return build_model(_config(num_layers), pg_collection=pg)


def _reference(pg, num_layers: int, num_microbatches: int, groups: list[range]) -> dict:
    """Whole model, micro-batches in order; the gradient of each group of micro-batches summed
    apart, then the groups added (one group: the plain sum)."""
    from megatron_dsv3.moe.balance import routers
    from megatron_dsv3.mtp import weighted_lm_loss

    model = _full_model(pg, num_layers)
    _set_aux_loss_scale(model, num_microbatches)
    ids, labels = _data(num_microbatches)
    losses, parts, grads = {}, {}, {}
    for microbatches in groups:
        model.zero_grad(set_to_none=True)
        for m in microbatches:
            out = model(ids[m], None, None, labels=labels[m])
            loss, lm, mtp, mtp_ce = weighted_lm_loss(out, MTP_LAMBDA)
            scaled = loss / num_microbatches
            scaled.backward()
            losses[m], parts[m] = scaled.detach(), (lm.detach(), mtp.detach(), mtp_ce)
        for name, param in model.named_parameters():
            grads[name] = param.grad.clone() if name not in grads else grads[name] + param.grad
    loads = {name: router.tokens_per_expert.clone() for name, router in routers(model)}
    return {"losses": losses, "parts": parts, "grads": grads, "loads": loads}


# ----------------------------------------------------------------------------------------------
# Pipeline workers (module level: run_gloo pickles them)
# ----------------------------------------------------------------------------------------------
def _native_step(stages, plan, rank: int, world: int, case: tuple, tracer) -> tuple:
    """`step(inputs, labels, loss_fn)` on the stage modules: (schedule, losses, parts)."""
    import torch.distributed as dist

    from megatron_dsv3.pipeline import TensorSpec

    schedule, _, num_microbatches, layers, _ = case
    cfg = _config(_layers(layers)[0])
    ids, labels = _data(num_microbatches)
    last = [s for s in stages if s.is_last]
    pipe = plan.schedule_class(stages, group=dist.group.WORLD, p2p_specs=[
        TensorSpec((SEQ, MICRO_BATCH, cfg.hidden_size), cfg.torch_dtype)])
    loss_fn = last[0].loss_fn(num_microbatches, MTP_LAMBDA) if last else None
    result = pipe.step(num_microbatches, inputs=ids, labels=list(zip(ids, labels)),
                       loss_fn=loss_fn, tracer=tracer)
    assert tracer.executed_order() == _order(schedule, rank, world, num_microbatches), \
        f"{case} rank {rank}: executed order differs"
    pipe.reduce_mirrored_grads()
    if result.losses is None:
        return pipe, {}, {}
    return (pipe, dict(zip(result.microbatches, result.losses)),
            {m: r[1:] for m, r in zip(result.microbatches, loss_fn.records)})


def _adapter_step(stages, plan, rank: int, world: int, case: tuple, tracer) -> tuple:
    """Megatron's `forward_backward_func(forward_step_func=forward_step, ...)`, then the same
    forward only: (schedule, {}, parts from the loss dicts)."""
    import torch.distributed as dist

    from helpers.stages import local_state
    from megatron_dsv3.pipeline.megatron_adapter import (forward_step,
                                                         get_dualpipe_forward_backward_func)

    schedule, _, num_microbatches, _, _ = case
    ids, labels = _data(num_microbatches)
    forward_backward = get_dualpipe_forward_backward_func(schedule, group=dist.group.WORLD,
                                                          tracer=tracer)

    def iterators():
        return [iter([(ids[m], labels[m])
                      for m in plan.microbatches_of_chunk(c, num_microbatches)])
                for c in range(2)]

    kwargs = dict(forward_step_func=partial(forward_step, mtp_lambda=MTP_LAMBDA),
                  model=list(stages),
                  num_microbatches=num_microbatches, seq_length=SEQ,
                  micro_batch_size=MICRO_BATCH)
    finalized = []
    stages[0].config.finalize_model_grads_func = (
        lambda chunks, num_tokens, pg_collection=None: finalized.append(chunks))
    dicts = forward_backward(data_iterator=iterators(), **kwargs)
    stages[0].config.finalize_model_grads_func = None
    assert len(finalized) == 1 and finalized[0] == list(stages), case
    assert tracer.executed_order() == _order(schedule, rank, world, num_microbatches), \
        f"{case} rank {rank}: executed order differs"
    microbatches = sorted(m for s in stages if s.is_last
                          for m in plan.microbatches_of_chunk(s.chunk, num_microbatches))
    assert len(dicts) == len(microbatches), f"{case}: {len(dicts)} loss dicts on rank {rank}"
    parts = {m: (d["lm loss"], d["mtp loss"], d["mtp ce"]) for m, d in zip(microbatches, dicts)}

    # forward only (eval mode, as train.evaluate: routers do not count): the same loss dicts,
    # the gradients untouched
    grads_before = local_state(stages, grads=True, include_mirrors=True)
    for stage in stages:
        stage.eval()
    dicts_fwd = forward_backward(data_iterator=iterators(), forward_only=True, **kwargs)
    for stage in stages:
        stage.train()
    assert tracer.executed_order() == _order(schedule, rank, world, num_microbatches,
                                             forward_only=True), case
    assert len(dicts_fwd) == len(dicts), case
    for d, d_fwd in zip(dicts, dicts_fwd):
        for key in d:
            assert_equal(d_fwd[key], d[key], f"{case} forward-only {key}")
    for name, grad in local_state(stages, grads=True, include_mirrors=True).items():
        assert_equal(grad, grads_before[name], f"{case} forward-only changed {name}")
    return forward_backward.pipe, {}, parts


def _order(schedule: str, *args, **kwargs):
    from helpers.schedule_oracle import expected_order
    from megatron_dsv3.pipeline import schedule_class

    return expected_order(schedule_class(schedule), *args, **kwargs)


def _run_case(rank: int, world: int, case: tuple, full_state: dict) -> dict:
    import torch.distributed as dist

    from helpers.stages import build_rank_stages, gather_stage_state, local_state
    from megatron_dsv3.moe.balance import routers
    from megatron_dsv3.pipeline import Tracer
    from megatron_dsv3.pipeline.stages import StagePlan, reduce_mirrored_router_loads

    schedule, api, num_microbatches, layers, overlap = case
    num_layers, stage_layers = _layers(layers)
    plan = StagePlan(schedule, world, num_layers, stage_layers)
    stages = build_rank_stages(_config(num_layers), plan, rank, full_state, overlap_moe=overlap)
    pieces: list = []  # the MoE pieces' events of both stages, in the order they ran
    for stage in stages:
        _set_aux_loss_scale(stage, num_microbatches)
        if overlap:
            stage.piecewise_layers.trace = pieces
    run_step = _native_step if api == "native" else _adapter_step
    pipe, losses, parts = run_step(stages, plan, rank, world, case, Tracer())
    reduce_mirrored_router_loads(pipe, stages)  # DualPipe's two copies; else nothing
    gathered = gather_stage_state(stages, dist.group.WORLD, grads=True)
    return {
        "losses": losses, "parts": parts,
        "grads": local_state(stages, grads=True),
        "gathered": gathered if rank == 0 else None,
        "mirror_grads": {stage.full_name(n): p.grad.clone() for stage in stages
                         if stage.is_mirror for n, p in stage.named_parameters()},
        "loads": {stage.full_name(name): router.tokens_per_expert.clone()
                  for stage in stages if not stage.is_mirror
                  for name, router in routers(stage)},
        "interleaved": _interleaved(pieces),
    }


def _layers(layers) -> tuple[int, Optional[tuple]]:
    """A case's decoder layers: a count (equal stages) or the layers of each stage."""
    return (sum(layers), tuple(layers)) if isinstance(layers, tuple) else (layers, None)


def _interleaved(events: list[str]) -> bool:
    """Whether some forward dispatch was in flight while backward pieces ran (the F&B step
    interleaved two micro-batches): a B event between an "F<i>.dispatch.issue" and its wait."""
    for i, event in enumerate(events):
        if event.startswith("F") and event.endswith(".dispatch.issue"):
            wait = event.replace(".issue", ".wait")
            j = events.index(wait, i)
            if any(e.startswith("B") for e in events[i + 1:j]):
                return True
    return False


def _pipeline_worker(rank: int, world: int, cases: list, full_states: dict) -> list:
    from megatron_dsv3.parallel import init_distributed, shutdown_distributed

    # a short timeout turns a schedule that deadlocks into an error instead of a hung test
    init_distributed(1, backend="gloo", timeout_s=60)
    try:
        return [_run_case(rank, world, case, full_states[_layers(case[3])[0]])
                for case in cases]
    finally:
        shutdown_distributed()


def _merge(results: list, key: str) -> dict:
    merged: dict = {}
    for result in results:
        merged.update(result[key])
    return merged


def _check_case(case: tuple, results: list, pg) -> None:
    schedule, api, num_microbatches, layers, overlap = case
    num_layers = _layers(layers)[0]
    ctx = (f"{schedule} PP={len(results)} M={num_microbatches} {api} overlap={overlap} "
           f"layers={layers}")
    half = num_microbatches // 2
    groups = ([range(num_microbatches)] if schedule == "dualpipev"
              else [range(half), range(half, num_microbatches)])
    ref = _reference(pg, num_layers, num_microbatches, groups)

    # every micro-batch's loss once, bit for bit
    parts = _merge(results, "parts")
    assert sorted(parts) == list(range(num_microbatches)), f"{ctx}: losses of {sorted(parts)}"
    for m, (lm, mtp, mtp_ce) in parts.items():
        for name, value, expected in zip(("lm", "mtp", "mtp ce"), (lm, mtp, mtp_ce),
                                         ref["parts"][m]):
            assert_equal(value, expected, f"{ctx} micro-batch {m} {name}")
    for m, loss in _merge(results, "losses").items():
        assert_equal(loss, ref["losses"][m], f"{ctx} micro-batch {m} scaled loss")

    # every parameter's gradient, under the full model's names
    grads = _merge(results, "grads")
    assert set(grads) == set(ref["grads"]), f"{ctx}: {set(grads) ^ set(ref['grads'])}"
    gathered = results[0]["gathered"]  # gather_stage_state: every stage's, on every rank
    assert gathered.keys() == grads.keys(), ctx
    for name, grad in gathered.items():
        assert_equal(grad, grads[name], f"{ctx} gathered {name}")
    for name, grad in grads.items():
        if name == EMBEDDING:
            assert_close(grad, ref["grads"][name], FP32_REORDER, WHY_EMBEDDING, f"{ctx} {name}")
        else:
            assert_equal(grad, ref["grads"][name], f"{ctx} {name}")
    if schedule == "dualpipe":
        plain = _reference(pg, num_layers, num_microbatches, [range(num_microbatches)])
        for name, grad in grads.items():
            assert_close(grad, plain["grads"][name], FP32_REORDER,
                         "two directions summed apart, then added", f"{ctx} {name} (in order)")
        # the mirror copies hold the same gradient bit for bit
        mirrors = _merge(results, "mirror_grads")
        assert set(mirrors) == set(grads), ctx
        for name, grad in mirrors.items():
            assert_equal(grad, grads[name], f"{ctx} mirror copy of {name}")

    if overlap:  # the MoE F&B steps ran interleaved on some rank
        assert any(r["interleaved"] for r in results), ctx
    loads = _merge(results, "loads")
    assert set(loads) == set(ref["loads"]), ctx
    for name, count in loads.items():
        assert_equal(count, ref["loads"][name], f"{ctx} router loads {name}")


# (schedule, API, micro-batches, decoder layers or layers per stage, MoE F&B overlap)
CASES = {2: [("dualpipev", "native", 4, 4, True), ("dualpipev", "adapter", 5, 4, False),
             ("dualpipe", "native", 4, 4, False), ("dualpipe", "adapter", 6, 4, True),
             ("dualpipev", "native", 4, (1, 2, 1, 1), True)],
         4: [("dualpipev", "native", 8, 8, False), ("dualpipev", "adapter", 9, 8, True),
             ("dualpipe", "native", 8, 4, True)]}


# PP=4 (middle ranks) repeats PP=2's cases at more ranks; test_dualpipe's default run covers the
# schedules' PP=4 order
@pytest.mark.parametrize("pp", [2, pytest.param(4, marks=pytest.mark.extended)])
def test_pipelined_step_matches_single_process_loss_gradients_and_order(pp, dist_single):
    full_states = {}
    for num_layers in {_layers(case[3])[0] for case in CASES[pp]}:
        model = _full_model(dist_single, num_layers)
        full_states[num_layers] = {k: v for k, v in model.state_dict().items()
                                   if isinstance(v, torch.Tensor)}
    results = run_gloo(_pipeline_worker, pp, CASES[pp], full_states)
    for i, case in enumerate(CASES[pp]):
        _check_case(case, [r[i] for r in results], dist_single)


# ----------------------------------------------------------------------------------------------
# Bad settings (no processes: every check runs before any communication)
# ----------------------------------------------------------------------------------------------
def test_bad_stage_and_schedule_settings_raise_naming_the_setting_and_the_fix():
    from megatron_dsv3.pipeline.megatron_adapter import PipelineConfig
    from megatron_dsv3.pipeline.stages import StagePlan

    with pytest.raises(ValueError, match="num_layers=3 does not split into the 4 stages of "
                                         "dualpipev with PP=2 .* use a multiple of 4"):
        StagePlan("dualpipev", 2, 3)
    with pytest.raises(ValueError, match="even number of pipeline ranks .* or DualPipeV"):
        StagePlan("dualpipe", 3, 6)
    with pytest.raises(ValueError, match="at least 2 pipeline ranks"):
        StagePlan("dualpipev", 1, 4)
    with pytest.raises(ValueError, match="unknown pipeline schedule 'zb'"):
        StagePlan("zb", 2, 4)
    with pytest.raises(ValueError, match=r"stage_layers=\[2, 2, 2\] is invalid: dualpipev with "
                                         r"PP=2 has 4 stages; give 4 positive layer counts "
                                         "summing to num_layers=6"):
        StagePlan("dualpipev", 2, 6, (2, 2, 2))
    with pytest.raises(ValueError, match=r"stage_layers=\[3, 0, 2, 1\] is invalid"):
        StagePlan("dualpipev", 2, 6, (3, 0, 2, 1))
    with pytest.raises(ValueError, match=r"stage_layers=\[2, 2, 2, 1\] is invalid"):
        StagePlan("dualpipev", 2, 6, (2, 2, 2, 1))
    assert StagePlan("dualpipev", 2, 5, (1, 2, 1, 1)).layer_ranges == [
        range(0, 1), range(1, 3), range(3, 4), range(4, 5)]
    plan = StagePlan("DualPipe", 4, 8)
    assert (plan.num_stages, plan.layer_ranges[3], plan.stages_of_rank(1)) == (4, range(6, 8),
                                                                               (1, 2))
    assert list(plan.microbatches_of_chunk(1, 8)) == [4, 5, 6, 7] and plan.is_mirror(1)
    assert StagePlan("dualpipev", 3, 6).stages_of_rank(0) == (0, 5)

    with pytest.raises(ValueError, match="schedule='gpipe' is invalid"):
        PipelineConfig("gpipe", 2)
    with pytest.raises(ValueError, match="pipeline_parallel_size=1 is invalid for "
                                         "schedule='dualpipev': DualPipeV needs at least 2 "
                                         "pipeline ranks"):
        PipelineConfig("dualpipev", 1)
    with pytest.raises(ValueError, match="DualPipe needs an even number of pipeline ranks"):
        PipelineConfig("dualpipe", 3)
    with pytest.raises(ValueError, match="num_microbatches >= 2 \\* pipeline ranks = 8, got "
                                         "num_microbatches=6; raise the global batch"):
        PipelineConfig("dualpipev", 4).check(num_microbatches=6)
    with pytest.raises(ValueError, match="even num_microbatches"):
        PipelineConfig("dualpipe", 2).check(num_microbatches=5)
    with pytest.raises(ValueError, match="num_layers=6 does not split into the 8 stages"):
        PipelineConfig("dualpipev", 4).check(num_layers=6)
    PipelineConfig("dualpipe", 4).check(num_microbatches=8, num_layers=4)
    assert PipelineConfig("1f1b").num_stages == 1 and PipelineConfig("dualpipev", 3).num_stages == 6


def test_adapter_refuses_arguments_it_does_not_support(dist_single):
    from megatron_dsv3.pipeline.megatron_adapter import (PipelineConfig, forward_step,
                                                         get_dualpipe_forward_backward_func,
                                                         get_forward_backward_func)
    from megatron_dsv3.pipeline.stages import StagePlan, stages_from_model

    with pytest.raises(ValueError, match="schedule_name='1f1b' is invalid for the bidirectional"):
        get_dualpipe_forward_backward_func("1f1b")
    model = _full_model(dist_single, 4)
    stages = list(stages_from_model(model, StagePlan("dualpipev", 2, 4), rank=0))
    func = get_dualpipe_forward_backward_func("dualpipev")
    kwargs = dict(forward_step_func=partial(forward_step, mtp_lambda=MTP_LAMBDA),
                  num_microbatches=4, seq_length=SEQ, micro_batch_size=MICRO_BATCH)
    with pytest.raises(ValueError, match="model must be the rank's two stage modules"):
        func(data_iterator=[None, None], model=stages[0], **kwargs)
    with pytest.raises(ValueError, match="data_iterator must be a list of two iterators"):
        func(data_iterator=iter([]), model=stages, **kwargs)
    with pytest.raises(ValueError, match="collect_non_loss_data=True is not supported"):
        func(data_iterator=[None, None], model=stages, collect_non_loss_data=True, **kwargs)
    with pytest.raises(ValueError, match="no pipeline group; pass group="):
        func(data_iterator=[None, None], model=stages, **kwargs)
    # a plan that does not match the model, and a model already cut
    with pytest.raises(ValueError, match="the model has 4 decoder layers but the plan says "
                                         "num_layers=8"):
        stages_from_model(_full_model(dist_single, 4), StagePlan("dualpipev", 2, 8), rank=0)
    with pytest.raises(ValueError, match="the model has 0 decoder layers"):
        stages_from_model(model, StagePlan("dualpipev", 2, 4), rank=1)
    # "1f1b" is Megatron's own function
    from megatron.core.pipeline_parallel.schedules import forward_backward_no_pipelining

    assert get_forward_backward_func(PipelineConfig("1f1b")) is forward_backward_no_pipelining


# ----------------------------------------------------------------------------------------------
# The training job's pipeline flags (its pipelined runs: test_train.py, layouts pp2-*)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, world, expected", [
    (["--pipeline-parallel-size", "2"], 2, "--pipeline-parallel-size 2 is invalid: needs a "
                                           "schedule: add --pipeline-schedule dualpipev"),
    (["--pipeline-schedule", "dualpipe"], 2, "--pipeline-schedule dualpipe is invalid: needs "
                                             "--pipeline-parallel-size >= 2"),
    (["--pipeline-parallel-size", "2", "--pipeline-schedule", "dualpipev"], 2,
     "--num-layers 3 is invalid: dualpipev with PP=2 cuts the decoder into 4 stages"),
    (["--pipeline-parallel-size", "2", "--pipeline-schedule", "dualpipev", "--num-layers", "4"],
     2, "--grad-accum 2 is invalid: DualPipeV needs num_microbatches >= 2 * pipeline ranks "
        "= 4, got num_microbatches=2"),
    (["--pipeline-parallel-size", "3", "--pipeline-schedule", "dualpipe", "--num-layers", "6",
      "--grad-accum", "6"], 3, "--pipeline-parallel-size 3 is invalid: DualPipe needs an even "
                               "number of pipeline ranks (>= 2), got 3; use an even pipeline "
                               "size or DualPipeV"),
    (["--pipeline-parallel-size", "2", "--pipeline-schedule", "dualpipe", "--num-layers", "4",
      "--grad-accum", "5", "--eval-batches", "4"], 2, "--grad-accum 5 is invalid: DualPipe "
                                                      "needs an even num_microbatches (half "
                                                      "enter at each end), got 5; use 6"),
    (["--pipeline-parallel-size", "2", "--pipeline-schedule", "dualpipe", "--num-layers", "4",
      "--grad-accum", "4", "--eval-batches", "2"], 2, "--eval-batches 2 is invalid: DualPipe "
                                                      "needs num_microbatches >= 2 * pipeline "
                                                      "ranks = 4"),
    (["--pipeline-parallel-size", "2", "--pipeline-schedule", "gpipe"], 2,
     "--pipeline-schedule gpipe is invalid: unknown pipeline schedule 'gpipe'; use one of "
     "['dualpipe', 'dualpipev']"),
    (["--pipeline-parallel-size", "2", "--pipeline-schedule", "dualpipev", "--num-layers", "4",
      "--grad-accum", "4", "--tensor-parallel-size", "2"], 2,
     "--tensor-parallel-size 2 is invalid: times --pipeline-parallel-size 2 must divide the "
     "number of processes (2): WORLD = PP x DP x TP; launch NPROC = a multiple of TP * PP = 4"),
    (["--pipeline-parallel-size", "2", "--pipeline-schedule", "dualpipev", "--num-layers", "4",
      "--grad-accum", "4", "--expert-parallel-size", "2"], 2,
     "--expert-parallel-size 2 is invalid: must divide the data-parallel size of a pipeline "
     "stage WORLD_SIZE / (TP * PP) = 2 / (1 * 2) = 1"),
    (["--pipeline-parallel-size", "4", "--pipeline-schedule", "dualpipev", "--num-layers", "8",
      "--grad-accum", "8", "--eval-batches", "8"], 2,
     "--pipeline-parallel-size 4 is invalid: must divide the number of processes (2)"),
])
def test_bad_pipeline_arguments_exit_naming_the_flag_and_the_fix(argv, world, expected, capsys,
                                                                 monkeypatch):
    from megatron_dsv3.train.args import parse_args

    monkeypatch.setenv("WORLD_SIZE", str(world))
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    assert expected in capsys.readouterr().err
