#!/usr/bin/env python3
"""Pipeline schedules on one model: DualPipeV / DualPipe (ours) against Megatron-Core's own
1F1B and interleaved 1F1B. Tokens/s of a training step, peak memory per rank, and the
DualPipe(V) trace with its bubble next to the paper's formula.

How to run on N GPUs of one host (the device session: from the repo root, carrying `.whl/`,
the megatron-core wheel; one call is at most 10 minutes):

  bash benchmarks/pipeline_gpu.sh 2      # everything below for 2 GPUs in one call, or by hand:

  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 \
      NVSHMEM_DISABLE_NVLS=1
  # issue 3 on 2 H200s: PP=2, proxy widths, 8 layers (4 DualPipeV stages of 2 layers)
  python3 -m torch.distributed.run --standalone --nproc-per-node 2 \
      benchmarks/pipeline_schedules.py --schedule all --microbatches 4,8,16 \
      --trace-dir $OUT/pp2 --json-out $OUT/pp2.json
  # 4 H200s: PP=4, 16 layers; `all` adds DualPipe (even PP)
  python3 -m torch.distributed.run --standalone --nproc-per-node 4 \
      benchmarks/pipeline_schedules.py --schedule all --microbatches 8,16 \
      --trace-dir $OUT/pp4 --json-out $OUT/pp4.json
  # logic check on CPU (gloo): ours end to end; Megatron's schedules are skipped (they need
  # CUDA) and replaced by a check of their stage models through Megatron's own step functions
  .venv/bin/python -m torch.distributed.run --standalone --nproc-per-node 2 \
      benchmarks/pipeline_schedules.py --preset tiny --layers 4 --device cpu --seq-len 32 \
      --microbatches 4 --steps 1 --warmup 1

What is compared. One model (the preset's widths, `--layers` decoder layers, first dense, no
MTP, parameters in the preset's dtype like bench_proxy), one set of random micro-batches
(`--microbatches` M of `--micro-batch-size` x `--seq-len` tokens), the same initial weights
for every schedule (each build is seeded; a fingerprint checks it). A timed step is forward +
backward of the M micro-batches through the schedule's `forward_backward_func` (Megatron's
interface for all four), plus `torch.optim.AdamW` with `--optimizer` (lr = 0, so that every
step of every schedule starts from the same weights and the optimizer's work is still done).
  1f1b         Megatron's `forward_backward_pipelining_without_interleaving`, one stage per rank
               built by `model.model_provider(pre_process, post_process)` under Megatron's
               pipeline parallel state, weights loaded from the full model
  interleaved  Megatron's `forward_backward_pipelining_with_interleaving`, `--vpp` model
               chunks per rank (`model_provider(..., vp_stage=v)`)
  dualpipev    our DualPipeV (2 stages per rank), through `megatron_adapter`, MoE F&B overlap on
  dualpipe     our DualPipe (2 stages per rank, mirrored copies; even PP only)
Megatron's settings are Megatron-LM's training defaults: `deallocate_pipeline_outputs=True`,
batched p2p for 1F1B, overlapped (unbatched) p2p for interleaved.

Reported per schedule and M: step time (median of `--steps` after `--warmup`), tokens/s =
M x micro-batch x seq / step time, the ratio to 1F1B at the same M, peak memory per rank
(`torch.cuda.max_memory_allocated`, reset before the warm-up), and the mean next-token loss of
the first step against the schedule-free loss (the whole model, same weights, same micro-batches,
forward only, on rank 0). For DualPipe(V) one more step runs with a `Tracer` (CUDA events at the
op boundaries, one synchronization at its end; reported apart from the timed steps): `--trace-dir/<schedule>_m<M>/` gets the
per-rank JSON, `timeline.png` and `summary.json`; the JSON result gets the measured idle time
per rank (the bubble) next to `paper_bubble` computed from the trace's own F, B, W, F&B
(`trace.measured_chunk_times`: the mean over both chunks of all ranks). The model's linears
and routed experts defer their weight gradients to W steps while the schedule's store is
attached (`weight_grad.attach_weight_grad_store`), so B is the input-gradient half of the
backward and W fills the cool-down; the formula for DualPipeV on N ranks is that of DualPipe on
2N: (N-1)(F&B + B - 3W). The measured idle time also holds the p2p waits, which the formula
leaves out.

Expert parallelism (`--expert-parallel-size E`, issue 4): the world is PP x E, E pipelines
(Megatron's layout: pipelines {0, 2} and {1, 3} at PP=2 x EP=2), each on its own micro-batches
(a data-parallel replica; gradients are not reduced), the routed experts of a stage sharded
over the E ranks that hold it, so every MoE layer exchanges rows between the pipelines. Every
schedule (Megatron's too) runs the same model; each pipeline's loss is checked against its own
schedule-free loss; tokens/s is one pipeline's. DualPipe(V) then runs its MoE layers as F&B
pieces (`--moe-overlap auto`; `both` adds the plain layer loop, rows _ovl / _seq), and one more
step stamps every all-to-all of the pieces (`pipeline/comm_timing.py`): per rank the fraction
hidden behind compute, of the exchanges issued inside F&B interleavings (the steady state) and
of the whole step. `--profile` adds a torch.profiler step: compute kernels' summed and busy
time, NCCL's, and the top kernels.

Not covered: TP inside the pipeline and gradient reduction over data parallelism (the training
job composes them, tests/test_pipeline_parallel_compose.py), MTP (Megatron's PP keeps a second
embedding on the last stage for it). On CPU every number is a logic check, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from functools import partial
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.common import (distributed, emit_json, free_memory, peak_gib,  # noqa: E402
                               prepare_rank_device, reset_peak, result_header,
                               seed_megatron_cuda_rng, sync, time_steps, write_json)

OURS = ("dualpipev", "dualpipe")
MEGATRON = ("1f1b", "interleaved")
ALL_SCHEDULES = ("1f1b", "interleaved", "dualpipev", "dualpipe")
RUN_ORDER = ("1f1b", "dualpipev", "interleaved", "dualpipe")
MEGATRON_NEEDS_CUDA = ("Megatron-Core's pipeline schedules need CUDA (schedules.py allocates "
                       "torch.zeros(..., device='cuda'); p2p buffers go on "
                       "torch.cuda.current_device()): run on GPUs for its numbers")
BUBBLE_TOLERANCE = 0.10  # the issue's target: measured bubble within 10% of the paper's


# ----------------------------------------------------------------------------------------------
# Setup: config, data, the full model
# ----------------------------------------------------------------------------------------------
def model_config(args):
    from megatron_dsv3.config import preset

    cfg = preset(args.preset).replace(mtp__num_layers=0, num_layers=args.layers,
                                      max_seq_len=max(args.seq_len, 1))
    if args.dtype:
        cfg = cfg.replace(params_dtype=args.dtype)
    return cfg


def make_batches(cfg, num: int, micro_batch: int, seq: int, device, replica: int = 0
                 ) -> list[tuple]:
    """`num` micro-batches (input ids, labels), each [micro_batch, seq]; the same on every rank
    of one pipeline, different for each data-parallel `replica` (with EP: each EP rank's
    pipeline), and for a smaller M a prefix of the same list."""
    g = torch.Generator().manual_seed(1234 + replica)
    batches = []
    for _ in range(num):
        ids = torch.randint(0, cfg.vocab_size, (micro_batch, seq), generator=g)
        labels = torch.randint(0, cfg.vocab_size, (micro_batch, seq), generator=g)
        batches.append((ids.to(device), labels.to(device)))
    return batches


def seeded_full_model(cfg, pg, device, seed: int):
    """The whole model (every layer; TP = 1; this rank's EP shard of the routed experts), the
    same weights at every call and on every rank of a pipeline: drawn on the device from
    reseeded generators (Megatron's CUDA RNG tracker on GPU, whose expert stream depends on
    the EP rank only)."""
    from megatron_dsv3.config import to_megatron_config
    from megatron_dsv3.model import build_model
    from megatron_dsv3.parallel import whole_model_groups

    torch.manual_seed(seed)
    seed_megatron_cuda_rng(seed, device)
    megatron_cfg = to_megatron_config(cfg, expert_parallel_size=pg.ep.size(),
                                      use_cpu_initialization=device.type != "cuda")
    with whole_model_groups(pg) as groups:
        return build_model(cfg, pg_collection=groups, megatron_config=megatron_cfg).to(device)


@torch.no_grad()
def fingerprint(named_tensors) -> float:
    """One number summarising the weights (sum over tensors of sum |x| * position-weighted),
    enough to tell two draws apart."""
    total = 0.0
    tensors = [(k, v) for k, v in named_tensors if isinstance(v, torch.Tensor)]
    for i, (_, tensor) in enumerate(sorted(tensors, key=lambda kv: kv[0])):
        total += (i + 1) * tensor.detach().double().abs().sum().item()
    return total


def _set_aux_loss_scale(modules, num_microbatches: int) -> None:
    from megatron_dsv3.moe.balance import set_balance_loss_scale

    for module in modules:
        set_balance_loss_scale(module, 1.0 / num_microbatches)


@torch.no_grad()
def reference_lm_losses(model, batches) -> list[torch.Tensor]:
    """Schedule-free next-token loss of each micro-batch: the whole model, forward only."""
    from megatron_dsv3.mtp import weighted_lm_loss

    return [weighted_lm_loss(model(ids, None, None, labels=labels), 0.0)[1]
            for ids, labels in batches]


def mean_loss(per_microbatch: list[torch.Tensor]) -> float:
    """The step's mean loss, summed the same way for every schedule and the reference."""
    return (torch.stack([t.float().cpu() for t in per_microbatch]).sum()
            / len(per_microbatch)).item()


def gather_losses(local: dict[int, torch.Tensor], num_microbatches: int, group=None
                  ) -> list[torch.Tensor]:
    """{micro-batch: lm loss} from every rank of the pipeline `group` -> the list in
    micro-batch order (every rank)."""
    parts: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, {m: t.detach().float().cpu() for m, t in local.items()},
                           group=group)
    merged = {}
    for part in parts:
        merged.update(part)
    if sorted(merged) != list(range(num_microbatches)):
        raise RuntimeError(f"losses came back for micro-batches {sorted(merged)}, expected "
                           f"0..{num_microbatches - 1}")
    return [merged[m] for m in range(num_microbatches)]


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------
def _optimizer(params: list, device, enabled: bool):
    if not enabled:
        return None
    # lr = 0: the optimizer does all its work and leaves the weights bit-identical.
    return torch.optim.AdamW(params, lr=0.0, fused=device.type == "cuda")


def _zero_grads(params) -> None:
    for p in params:
        p.grad = None


def measure(name: str, num_microbatches: int, step: Callable[[], dict], params: list,
            args, device, reference: list[torch.Tensor], group=None) -> dict:
    """First step (loss check, counts as a warm-up), then warm-up and timed steps; `step`
    returns this rank's {micro-batch: lm loss}; `group`: the rank's pipeline. Every process
    of the world takes part (tokens/s: of one pipeline; the world runs EP of them)."""
    optimizer = _optimizer(params, device, args.optimizer)

    def full_step() -> dict:
        _zero_grads(params)
        losses = step()
        if optimizer is not None:
            optimizer.step()
        return losses

    reset_peak(device)
    losses = gather_losses(full_step(), num_microbatches, group)
    times = time_steps(full_step, args.steps, max(args.warmup - 1, 0), device, barrier=True)
    peaks: list = [None] * dist.get_world_size()
    dist.all_gather_object(peaks, round(peak_gib(device), 3))
    step_s = statistics.median(times)
    tokens = num_microbatches * args.micro_batch_size * args.seq_len
    loss, ref = mean_loss(losses), mean_loss(reference)
    every: list = [None] * dist.get_world_size()  # with EP: each pipeline against its own data
    dist.all_gather_object(every, loss == ref)
    return {"schedule": name, "microbatches": num_microbatches, "status": "ok",
            "step_s": round(step_s, 6), "tok_per_s": round(tokens / step_s, 1),
            "step_times": [round(t, 6) for t in times], "peak_gib": peaks,
            "loss": loss, "reference_loss": ref, "loss_abs_diff": abs(loss - ref),
            "loss_equals_reference": loss == ref,
            "loss_equals_reference_every_pipeline": all(every)}


# ----------------------------------------------------------------------------------------------
# Ours: DualPipeV / DualPipe through the Megatron-interface adapter
# ----------------------------------------------------------------------------------------------
def run_ours(schedule: str, cfg, pg, args, device, batches, reference_of, fingerprint_ref,
             overlap: Optional[bool] = None, count_group: str = "same",
             defer_wgrad: bool = False) -> list[dict]:
    """DualPipeV / DualPipe over the pipeline group `pg.pp`; `overlap`: the stages' MoE F&B
    pieces (None: their default, on exactly when EP > 1); count_group 'separate': the pieces'
    count exchanges over a duplicate of the EP group (`AsyncExchange(count_groups=)`);
    defer_wgrad: B's weight gradients run after each of its F&B segments
    (`PiecewiseLayers.defer_weight_grads`)."""
    from megatron_dsv3.pipeline import Tracer
    from megatron_dsv3.pipeline.megatron_adapter import (PipelineConfig, forward_step,
                                                         get_forward_backward_func)
    from megatron_dsv3.pipeline.stages import StagePlan, stages_from_model

    pp, rank = pg.pp.size(), pg.pp.rank()
    try:
        plan = StagePlan(schedule, pp, cfg.num_layers, args.stage_layers)
    except ValueError as error:
        return [skipped(schedule, m, str(error)) for m in args.microbatches]
    model = seeded_full_model(cfg, pg, device, args.seed)
    same_weights = check_fingerprint(schedule, fingerprint(model.state_dict().items()),
                                     fingerprint_ref, pg)
    if args.compile != "none":
        from megatron_dsv3.model import compile_model

        compile_model(model, scope=args.compile)
    stages = stages_from_model(model, plan, rank, overlap_moe=overlap)
    del model
    free_memory(device)
    pieces = stages[0].piecewise_layers is not None  # the same answer for both chunks
    separate = pieces and pg.ep.size() > 1 and count_group == "separate"
    if separate:
        from megatron_dsv3.parallel import duplicate_group
        from megatron_dsv3.moe.async_exchange import AsyncExchange

        groups = {tuple(dist.get_process_group_ranks(pg.ep)): duplicate_group(pg.ep)}
        for stage in stages:
            stage.piecewise_layers.exchange = AsyncExchange(count_groups=groups)
    defer_wgrad = pieces and defer_wgrad
    for stage in stages:
        if stage.piecewise_layers is not None:
            stage.piecewise_layers.defer_weight_grads = defer_wgrad
    params = [p for stage in stages for p in stage.parameters()]
    forward_backward = get_forward_backward_func(PipelineConfig(schedule, pp), group=pg.pp)
    results = []
    for num_microbatches in args.microbatches:
        reason = ours_unsupported(schedule, pp, num_microbatches)
        if reason:
            results.append(skipped(schedule, num_microbatches, reason))
            continue
        # the micro-batches whose loss this rank computes, in the order the adapter returns them
        mine = sorted(m for c, s in enumerate(stages) if s.is_last
                      for m in plan.microbatches_of_chunk(c, num_microbatches))

        def step(num_microbatches=num_microbatches, mine=mine) -> dict:
            iterators = [iter([batches[m] for m in plan.microbatches_of_chunk(c, num_microbatches)])
                         if (s.is_first or s.is_last) else None for c, s in enumerate(stages)]
            dicts = forward_backward(forward_step_func=partial(forward_step, mtp_lambda=0.0),
                                     data_iterator=iterators,
                                     model=list(stages), num_microbatches=num_microbatches,
                                     seq_length=args.seq_len,
                                     micro_batch_size=args.micro_batch_size)
            return {m: d["lm loss"] for m, d in zip(mine, dicts)}

        result = measure(schedule, num_microbatches, step, params, args, device,
                         reference_of(num_microbatches), pg.pp)
        result["moe_overlap"], result["count_group"] = pieces, ("separate" if separate
                                                                else "same")
        result["defer_wgrad"] = defer_wgrad
        name = run_label(schedule, pieces, separate, args.moe_overlap,
                         defer_wgrad and args.defer_wgrad == "both")
        # one traced step (device timestamps at op boundaries; kept apart from the timed steps)
        _zero_grads(params)
        forward_backward.tracer = Tracer()
        step()
        tracer, forward_backward.tracer = forward_backward.tracer, None
        result["bubble"] = bubble_report(tracer, schedule, pg, args.trace_dir and
                                         Path(args.trace_dir) / f"{name}_m{num_microbatches}")
        # and one step with every MoE all-to-all stamped (the F&B pieces' exchanges)
        if pieces and pg.ep.size() > 1:
            _zero_grads(params)
            result["all_to_all"] = exchange_report(step, stages, device)
        if args.profile:
            _zero_grads(params)
            result["kernels"] = kernel_report(step, device, args.trace_dir and
                                              Path(args.trace_dir) / f"{name}_m{num_microbatches}")
        _zero_grads(params)
        result["same_weights"] = same_weights
        results.append(result)
    del stages, params, forward_backward
    free_memory(device)
    return results


def run_label(schedule: str, pieces: Optional[bool], separate: bool, moe_overlap: str,
              defer_wgrad: bool = False) -> str:
    """dualpipev, or with --moe-overlap both dualpipev_ovl / dualpipev_seq; _cg: the counts
    over their own group; _w: B's weight gradients behind its exchanges where it outlasts A
    (named only when --defer-wgrad both compares them)."""
    suffix = "" if moe_overlap != "both" else "_ovl" if pieces else "_seq"
    return f"{schedule}{suffix}{'_cg' if separate else ''}{'_w' if defer_wgrad else ''}"


def runs_on(schedule: str, pp: int) -> bool:
    """Whether our `schedule` takes `pp` pipeline ranks (its class's rule)."""
    from megatron_dsv3.pipeline import schedule_class

    try:
        schedule_class(schedule).validate(pp)
    except ValueError:
        return False
    return True


def ours_unsupported(schedule: str, pp: int, num_microbatches: int) -> Optional[str]:
    from megatron_dsv3.pipeline.megatron_adapter import PipelineConfig

    try:
        PipelineConfig(schedule, pp).check(num_microbatches=num_microbatches)
    except ValueError as error:
        return str(error)
    return None


def exchange_report(step: Callable[[], dict], stages, device) -> dict:
    """One pipeline step with every all-to-all of the stages' MoE pieces stamped
    (comm_timing): per rank the comm time C and the exposed time X of the exchanges issued
    inside F&B interleavings (the steady state) and of all of them (warm-up and cool-down
    forwards and backwards run their layers' pieces one after the other: nothing hides those).
    Every rank calls it; the report on every rank."""
    from megatron_dsv3.profiling.comm_timing import (Clock, TimedExchange, TimedTrace,
                                                    resolve_step, step_numbers)

    clock = Clock(device)
    trace, timings = TimedTrace(clock), []
    stacks = [stage.piecewise_layers for stage in stages]
    saved = [(stack.exchange, stack.trace) for stack in stacks]
    for stack in stacks:  # one trace and one list of timings for both chunks
        stack.exchange, stack.trace = TimedExchange(clock, trace, timings,
                                                    stack.exchange.count_groups), trace
    try:
        clock.begin()
        step()
        end = clock.stamp()
    finally:
        for stack, (exchange, old_trace) in zip(stacks, saved):
            stack.exchange, stack.trace = exchange, old_trace
    record = resolve_step(clock, trace, timings, end=end)
    local = {"rank": dist.get_rank()}
    for key, paired_only in (("steady", True), ("all", False)):
        n = step_numbers(record, paired_only=paired_only)
        local[key] = {"comm_s": n["comm_s"], "exposed_s": n["exposed_s"],
                      "exposed_strict_s": n["exposed_strict_s"], "exchanges": n["exchanges"],
                      "bytes": n["bytes"],
                      "hidden_fraction": 1 - n["exposed_s"] / n["comm_s"] if n["comm_s"] else None,
                      "hidden_fraction_strict": (1 - n["exposed_strict_s"] / n["comm_s"]
                                                 if n["comm_s"] else None)}
    local["step_s"] = record.duration
    per_rank: list = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, local)

    def worst(key: str, field: str) -> Optional[float]:
        values = [r[key][field] for r in per_rank if r[key][field] is not None]
        return min(values) if values else None

    return {"hidden_fraction_steady": worst("steady", "hidden_fraction"),
            "hidden_fraction_steady_strict": worst("steady", "hidden_fraction_strict"),
            "hidden_fraction_all": worst("all", "hidden_fraction"),
            "per_rank": per_rank}


def kernel_report(step: Callable[[], dict], device, directory: Optional[Path]) -> dict:
    """One step under torch.profiler: where the device's time went, per rank. Kernels are
    compute, NCCL (name holds 'nccl') or copies (memcpy / memset). Reported: the sum of the
    compute kernels' durations (kernels slowed by NCCL sharing the SMs make it grow), the union
    of their intervals (busy; the step minus busy is when no compute ran: waits for peers,
    for the host or for the all-to-all), NCCL's union and its overlap with compute, and the
    span from the first kernel to the last. The top kernels go to `directory`/kernels_rank<r>.txt.
    On CPU there are no kernels (zeros)."""
    from megatron_dsv3.profiling.comm_timing import union_length
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda"
                                           else [])
    sync(device, barrier=True)
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        step()
        sync(device)
        wall = time.perf_counter() - start
    kinds: dict[str, list] = {"compute": [], "nccl": [], "copy": []}
    for event in prof.events():
        if event.device_type != DeviceType.CUDA:
            continue
        name = event.name.lower()
        kind = ("nccl" if "nccl" in name else "copy" if "memcpy" in name or "memset" in name
                else "compute")
        kinds[kind].append((event.time_range.start / 1e6, event.time_range.end / 1e6))
    every = [i for v in kinds.values() for i in v]
    compute, nccl = kinds["compute"], kinds["nccl"]
    both = union_length(compute) + union_length(nccl) - union_length(compute + nccl)
    local = {"rank": dist.get_rank(), "step_s": wall,
             "span_s": (max(e for _, e in every) - min(s for s, _ in every)) if every else 0.0,
             "compute_kernel_s": sum(e - s for s, e in compute),
             "compute_busy_s": union_length(compute), "compute_kernels": len(compute),
             "nccl_busy_s": union_length(nccl), "nccl_overlapping_compute_s": both,
             "copy_s": sum(e - s for s, e in kinds["copy"])}
    if directory is not None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        sort_by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
        (directory / f"kernels_rank{dist.get_rank()}.txt").write_text(
            prof.key_averages().table(sort_by=sort_by, row_limit=30))
    per_rank: list = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, local)
    return {"per_rank": per_rank}


def bubble_report(tracer, schedule: str, pg, directory: Optional[Path]) -> Optional[dict]:
    """The traced step's idle time per rank of the pipeline `pg.pp` against `paper_bubble` from
    its own chunk times; files under `directory` when given (global rank 0's pipeline). Every
    rank calls it; the report (of its own pipeline) on every rank."""
    from megatron_dsv3.pipeline import schedule_class
    from megatron_dsv3.profiling.timeline import (ChunkTimes, draw_timeline, events_from_dict,
                                                  idle_by_phase, measured_chunk_times,
                                                  paper_bubble)

    pp = pg.pp.size()
    traces: list = [None] * pp
    dist.all_gather_object(traces, tracer.to_dict(), group=pg.pp)
    times = measured_chunk_times([e for t in traces for e in events_from_dict(t)])
    paper = paper_bubble(schedule, pp, times)
    # the same chunk times in 1F1B's units: one 1F1B stage is every chunk a rank holds once
    per_stage = schedule_class(schedule).num_stages(pp) // pp
    paper_1f1b = paper_bubble("1f1b", pp, ChunkTimes(per_stage * times.F, per_stage * times.B,
                                                     per_stage * times.W))
    idle = [t["bubble_fraction"] * t["duration"] for t in traces]
    mean_idle = statistics.mean(idle)
    report = {"chunk_times": asdict(times), "paper_bubble_s": paper,
              "paper_bubble_1f1b_s": paper_1f1b, "idle_s": idle,
              "bubble_fraction": [t["bubble_fraction"] for t in traces],
              "traced_step_s": [t["duration"] for t in traces],
              "mean_idle_over_paper": mean_idle / paper if paper > 0 else None,
              "max_idle_over_paper": max(idle) / paper if paper > 0 else None}
    # None where the formula gives no bubble (DualPipe on 2 ranks: PP/2 - 1 = 0)
    report["within_10pct_of_paper"] = (abs(mean_idle / paper - 1.0) <= BUBBLE_TOLERANCE
                                       if paper > 0 else None)
    # the formula's part (fill and drain) apart from steady-state waits (unequal F&B times)
    phases = [idle_by_phase(events_from_dict(t), t["duration"]) for t in traces]
    report["ramp_idle_s"] = [p["ramp"] for p in phases]
    report["steady_idle_s"] = [p["steady"] for p in phases]
    report["mean_ramp_idle_over_paper"] = (statistics.mean(report["ramp_idle_s"]) / paper
                                           if paper > 0 else None)
    if directory is not None and dist.get_rank() == 0:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for rank, trace in enumerate(traces):
            (directory / f"trace_rank{rank}.json").write_text(json.dumps(trace, indent=1))
        (directory / "summary.json").write_text(json.dumps(report, indent=1))
        report["trace_dir"] = str(directory)
        try:
            ep = f" x EP={pg.ep.size()}" if pg.ep.size() > 1 else ""
            draw_timeline(traces, directory / "timeline.png",
                          f"{schedule}, PP={pp}{ep}, {traces[0].get('num_microbatches')} "
                          "micro-batches (one traced step; pipeline of rank 0)")
            report["timeline_png"] = str(directory / "timeline.png")
        except ImportError as error:  # the JSON holds everything; draw it elsewhere
            print(f"WARNING: timeline.png not drawn ({error}); draw it from "
                  f"{directory}/trace_rank*.json with trace.draw_timeline", file=sys.stderr)
            report["timeline_png"] = None
    return report


def check_fingerprint(where: str, value: float, reference: Optional[float], pg) -> bool:
    """Whether the ranks of every pipeline built the same weights (with EP each pipeline holds
    its own expert shard) and each rank the same as its first build (`reference`); a warning if
    not (the timings stand, the loss comparison does not). Every rank gets the answer."""
    values: list = [None] * dist.get_world_size()
    dist.all_gather_object(values, (pg.dp.rank(), value,
                                    reference is None or value == reference))
    same = all(ok for _, _, ok in values) and all(
        len({v for d, v, _ in values if d == replica}) == 1 for replica, _, _ in values)
    if not same and dist.get_rank() == 0:
        print(f"WARNING {where}: the seeded full model differs between ranks or builds "
              f"(fingerprints {values}, first build {reference}): its losses are not comparable "
              "with the reference", file=sys.stderr)
    return same


def skipped(schedule: str, num_microbatches: int, reason: str, **extra) -> dict:
    return {"schedule": schedule, "microbatches": num_microbatches, "status": "skipped",
            "reason": reason, **extra}


# ----------------------------------------------------------------------------------------------
# Megatron-Core's 1F1B and interleaved 1F1B on our model
# ----------------------------------------------------------------------------------------------
def megatron_pipeline_state(pp: int, vpp: Optional[int], ep: int, seed: int, device) -> None:
    """Megatron's global groups with pipeline size PP (and VPP model chunks per rank), EP as
    in `init_distributed` (the same rank layout: Megatron's own)."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1,
                                             pipeline_model_parallel_size=pp,
                                             virtual_pipeline_model_parallel_size=vpp,
                                             expert_model_parallel_size=ep)
    seed_megatron_cuda_rng(seed, device)


def build_megatron_chunks(cfg, full_state: dict, pp: int, vpp: Optional[int], device,
                          config_overrides: dict) -> list:
    """This rank's model chunks (one for 1F1B, VPP for interleaved), each built by
    `model.model_provider` with Megatron's pre/post-process flags, holding the full model's
    weights of its layers (a chunk's layer i is the full model's layer `layer_number - 1`)."""
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection

    from megatron_dsv3.config import to_megatron_config
    from megatron_dsv3.model import model_provider

    pg = ProcessGroupCollection.use_mpu_process_groups()
    config = to_megatron_config(cfg, pipeline_parallel_size=pp, expert_parallel_size=pg.ep.size(),
                                use_cpu_initialization=device.type != "cuda",
                                perform_initialization=False,
                                virtual_pipeline_model_parallel_size=vpp, **config_overrides)
    chunks = []
    for vp_stage in (range(vpp) if vpp else [None]):
        first = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
        last = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
        chunk = model_provider(pre_process=first, post_process=last, vp_stage=vp_stage,
                               config=config, pg_collection=pg).to(device)
        local = {}
        for name in chunk.state_dict():
            full_name = name
            if name.startswith("decoder.layers."):
                index, _, rest = name[len("decoder.layers."):].partition(".")
                number = chunk.decoder.layers[int(index)].layer_number
                full_name = f"decoder.layers.{number - 1}.{rest}"
            if full_name in full_state:
                local[name] = full_state[full_name]
        missing, unexpected = chunk.load_state_dict(local, strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if missing or unexpected:
            raise RuntimeError(f"Megatron chunk vp_stage={vp_stage}: weights not found in the "
                               f"full model: {missing=}, {unexpected=}")
        chunks.append(chunk)
    return chunks


def megatron_forward_step(data_iterator, model):
    """Megatron `forward_step_func` for a `model_provider` chunk: (input ids, labels) from the
    iterator on the first and last stages; the loss_func gives (mean next-token CE,
    {"lm loss"}), which Megatron divides by the number of micro-batches."""
    needs_batch = model.pre_process or model.post_process
    ids, labels = next(data_iterator) if needs_batch else (None, None)
    output = model(ids if model.pre_process else None, None, None,
                   labels=labels if model.post_process else None)
    if not model.post_process:
        return output, None
    return output, _megatron_loss_func


def _megatron_loss_func(output):
    from megatron_dsv3.mtp import weighted_lm_loss

    loss, lm, _, _ = weighted_lm_loss(output, 0.0)
    # a copy: Megatron divides the returned loss by the number of micro-batches in place
    return loss, {"lm loss": lm.detach().clone()}


# Megatron-LM's training defaults for its schedules (arguments.py / core_transformer_config)
MEGATRON_P2P = {"1f1b": dict(deallocate_pipeline_outputs=True, batch_p2p_comm=True,
                             overlap_p2p_comm=False),
                "interleaved": dict(deallocate_pipeline_outputs=True, batch_p2p_comm=False,
                                    overlap_p2p_comm=True)}


def megatron_unsupported(schedule: str, pp: int, vpp: int, num_layers: int,
                         num_microbatches: int) -> Optional[str]:
    if pp < 2:
        return f"{schedule} needs PP >= 2"
    chunks = pp * (vpp if schedule == "interleaved" else 1)
    if num_layers % chunks:
        return (f"--layers {num_layers} does not split into {chunks} Megatron stages "
                f"(PP={pp}" + (f" x VPP={vpp})" if schedule == "interleaved" else ")"))
    if schedule == "interleaved" and num_microbatches % pp:
        return (f"interleaved 1F1B runs micro-batches in groups of PP={pp}: M="
                f"{num_microbatches} must be a multiple of {pp}")
    return None


def run_megatron(schedule: str, cfg, pg, args, device, batches, reference_of,
                 fingerprint_ref) -> list[dict]:
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    pp = pg.pp.size()
    vpp = args.vpp if schedule == "interleaved" else None
    reasons = {m: megatron_unsupported(schedule, pp, args.vpp, cfg.num_layers, m)
               for m in args.microbatches}
    if all(reasons.values()):
        return [skipped(schedule, m, r) for m, r in reasons.items()]
    full = seeded_full_model(cfg, pg, device, args.seed)
    full_state = full.state_dict()
    same_weights = check_fingerprint(schedule, fingerprint(full_state.items()), fingerprint_ref,
                                     pg)
    megatron_pipeline_state(pp, vpp, pg.ep.size(), args.seed, device)
    try:
        chunks = build_megatron_chunks(cfg, full_state, pp, vpp, device, MEGATRON_P2P[schedule])
        del full, full_state
        free_memory(device)
        if args.compile != "none":
            from megatron_dsv3.model import compile_model

            for chunk in chunks:
                compile_model(chunk, scope=args.compile)
        if device.type != "cuda" and not args.megatron_on_cpu:
            return [skipped(schedule, m, reasons[m] or MEGATRON_NEEDS_CUDA,
                            cpu_stage_check=None if reasons[m] else cpu_stage_check(
                                chunks, batches[:m], reference_of(m)))
                    for m in args.microbatches]
        forward_backward = get_forward_backward_func()
        params = [p for chunk in chunks for p in chunk.parameters()]
        last_rank = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
        results = []
        for num_microbatches in args.microbatches:
            if reasons[num_microbatches]:
                results.append(skipped(schedule, num_microbatches, reasons[num_microbatches]))
                continue
            _set_aux_loss_scale(chunks, num_microbatches)

            def step(num_microbatches=num_microbatches) -> dict:
                iterators = [iter(batches[:num_microbatches])
                             if (c.pre_process or c.post_process) else None for c in chunks]
                dicts = forward_backward(
                    forward_step_func=megatron_forward_step,
                    data_iterator=iterators if vpp else iterators[0],
                    model=chunks if vpp else chunks[0], num_microbatches=num_microbatches,
                    seq_length=args.seq_len, micro_batch_size=args.micro_batch_size)
                return ({m: d["lm loss"] for m, d in enumerate(dicts)} if last_rank else {})

            result = measure(schedule, num_microbatches, step, params, args, device,
                             reference_of(num_microbatches), pg.pp)
            result["megatron_config"] = {**MEGATRON_P2P[schedule], "vpp": vpp}
            result["same_weights"] = same_weights
            results.append(result)
        del chunks, params
        return results
    finally:
        parallel_state.destroy_model_parallel()
        _restore_parallel_state(pg)
        free_memory(device)


def _restore_parallel_state(pg) -> None:
    """Back to Megatron's groups of `init_distributed` (TP = 1, PP and EP as before)."""
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1,
                                             pipeline_model_parallel_size=pg.pp.size(),
                                             expert_model_parallel_size=pg.ep.size())


def cpu_stage_check(chunks: list, batches: list, reference: list[torch.Tensor]) -> dict:
    """What can be checked of the Megatron path without CUDA: the chunks built by
    `model_provider` with the full model's weights, driven by Megatron's own `forward_step` /
    `backward_step` (with its output deallocation) in GPipe order (every forward, then every
    backward), activations passed over gloo. Returns the loss against the schedule-free one
    and how many parameters got a gradient."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel.schedules import (backward_step,
                                                           deallocate_output_tensor,
                                                           forward_step)

    group = parallel_state.get_pipeline_model_parallel_group()
    pp, rank = group.size(), group.rank()
    num_chunks, num_microbatches = len(chunks), len(batches)
    config = chunks[0].config
    _set_aux_loss_scale(chunks, num_microbatches)
    for chunk in chunks:
        chunk.zero_grad(set_to_none=True)
    num_virtual = pp * num_chunks
    shape = (batches[0][0].shape[1], batches[0][0].shape[0], config.hidden_size)  # [s, b, d]
    owner = [(v % pp, v // pp) for v in range(num_virtual)]  # virtual stage -> (rank, chunk)
    saved: dict = {}
    losses = {}
    for m in range(num_microbatches):
        for v in range(num_virtual):
            if owner[v][0] != rank:
                continue
            chunk = chunks[owner[v][1]]
            vp_stage = owner[v][1] if num_chunks > 1 else None
            if v == 0:
                inputs = None
            else:
                inputs = torch.empty(shape, dtype=config.pipeline_dtype, requires_grad=True)
                dist.recv(inputs, group=group, group_src=owner[v - 1][0])
            store: list = []
            output, _ = forward_step(megatron_forward_step, iter([batches[m]]), chunk,
                                     num_microbatches, inputs, store, config, cp_group_size=1,
                                     vp_stage=vp_stage, is_last_stage=v == num_virtual - 1)
            if v == num_virtual - 1:
                losses[m] = store[0]["lm loss"]
            else:
                dist.send(output.detach(), group=group, group_dst=owner[v + 1][0])
                deallocate_output_tensor(output, config.deallocate_pipeline_outputs)
            saved[m, v] = (inputs, output)
    for m in range(num_microbatches):
        for v in reversed(range(num_virtual)):
            if owner[v][0] != rank:
                continue
            inputs, output = saved.pop((m, v))
            grad = None
            if v < num_virtual - 1:
                grad = torch.empty(shape, dtype=config.pipeline_dtype)
                dist.recv(grad, group=group, group_src=owner[v + 1][0])
            input_grad = backward_step(inputs, output, grad, config)
            if v > 0:
                dist.send(input_grad, group=group, group_dst=owner[v - 1][0])
    params = [p for chunk in chunks for p in chunk.parameters()]
    counts = torch.tensor([sum(p.grad is not None for p in params), len(params)])
    dist.all_reduce(counts)
    loss = mean_loss(gather_losses(losses, num_microbatches, group))
    ref = mean_loss(reference)
    return {"what": "model_provider chunks + Megatron's forward_step/backward_step in GPipe "
                    "order over gloo (not Megatron's schedule)",
            "loss": loss, "reference_loss": ref, "loss_abs_diff": abs(loss - ref),
            "params_with_grad": int(counts[0]), "params": int(counts[1])}


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--schedule", default="all",
                        help=f"one of {', '.join(ALL_SCHEDULES)}, a comma list, or all (DualPipe "
                             "only with an even PP)")
    parser.add_argument("--pp", type=int, default=None,
                        help="pipeline size (default and only choice: the number of processes "
                             "/ EP)")
    parser.add_argument("--expert-parallel-size", "--ep", type=int, default=1,
                        help="EP: the world is PP x EP; each EP rank runs its own pipeline on its "
                             "own micro-batches (data parallel, no gradient reduction), the "
                             "routed experts sharded over the EP ranks of a stage. DualPipe(V) "
                             "then runs its MoE layers as F&B pieces (auto) and reports the "
                             "fraction of the all-to-all hidden behind compute")
    parser.add_argument("--vpp", type=int, default=2,
                        help="model chunks per rank of Megatron's interleaved 1F1B")
    parser.add_argument("--microbatches", default=None,
                        help="micro-batches per step, or a comma list (default 4 x PP)")
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=None,
                        help="tokens per sequence (default: the preset's max_seq_len)")
    parser.add_argument("--layers", type=int, default=None,
                        help="decoder layers (default: at least the preset's and 4 x PP, a "
                             "multiple of 2 PP and PP x VPP: every schedule splits it evenly)")
    parser.add_argument("--preset", default="proxy")
    parser.add_argument("--dtype", default=None, choices=[None, "bfloat16", "float32"])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3,
                        help="untimed steps per schedule and M (the first checks the loss)")
    parser.add_argument("--optimizer", action="store_true",
                        help="time AdamW's step too (lr = 0: weights stay the same)")
    parser.add_argument("--compile", default="none", choices=["none", "modules"],
                        help="torch.compile our modules (model.compile_model) in every schedule; "
                             "not even-handed: DualPipe(V)'s MoE F&B pieces call DeepSeekMoE's "
                             "methods, not its compiled forward, which Megatron's schedules run "
                             "(--moe-overlap off, the default without EP, is like for like)")
    parser.add_argument("--moe-overlap", default="auto", choices=["auto", "on", "off", "both"],
                        help="DualPipe(V) stages run their MoE layers as F&B pieces: auto (the "
                             "stages' default) = only with an EP all-to-all to hide (EP > 1); "
                             "on at EP = 1: the pieces' overhead alone; both: each of ours twice, "
                             "<schedule>_ovl (pieces) and <schedule>_seq (the plain layer loop: "
                             "every all-to-all waited for at once), same weights and data")
    parser.add_argument("--count-group", default="same", choices=["same", "separate", "both"],
                        help="with EP, the MoE pieces' count exchanges over the EP group itself "
                             "(same), over a duplicate of it on their own stream (separate: "
                             "they do not queue behind a row exchange in flight), or both")
    parser.add_argument("--defer-wgrad", default="on", choices=["off", "on", "both"],
                        help="DualPipe(V) with the MoE pieces: where an F&B step's backward "
                             "outlasts its forward, B's remaining segments run their weight "
                             "gradients behind their exchange (PiecewiseLayers."
                             "defer_weight_grads, on by default), off, on or both (rows _w)")
    parser.add_argument("--profile", action="store_true",
                        help="DualPipe(V): one more step under torch.profiler; per rank the "
                             "compute kernels' summed and busy time, NCCL's, and the top "
                             "kernels (<trace-dir>/<schedule>_m<M>/kernels_rank<r>.txt)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--trace-dir", default=None,
                        help="DualPipe(V) traces: <dir>/<schedule>_m<M>/ (JSON, timeline.png)")
    parser.add_argument("--stage-layers", default=None,
                        help="DualPipe(V) only: decoder layers per stage, comma list (e.g. "
                             "2,3,2,2 for 9 layers at PP=2: DualPipeV's rank 0 holds the "
                             "embedding and the head, so it gets fewer layers); Megatron's "
                             "schedules split evenly (skipped when they cannot)")
    parser.add_argument("--json-out", type=Path, default=None)
    return parser.parse_args(argv)


def resolve(args, world: int) -> list[str]:
    """Fill the defaults that depend on PP and the preset; fail early on impossible settings."""
    from megatron_dsv3.config import preset

    ep = args.expert_parallel_size
    if ep < 1 or world % ep:
        raise SystemExit(f"--expert-parallel-size {ep} is invalid: it must divide the "
                         f"{world} processes (world = PP x EP)")
    pp = args.pp or world // ep
    if pp * ep != world:
        raise SystemExit(f"--pp {pp} is invalid: this benchmark runs EP={ep} pipelines over all "
                         f"{world} processes (no other data parallelism): pass --pp "
                         f"{world // ep} or start {pp * ep} processes")
    if pp < 2:
        raise SystemExit(f"a pipeline needs at least 2 processes: start this script with "
                         f"torchrun --nproc-per-node {2 * ep} (or more) for EP={ep}")
    args.pp = pp
    base = preset(args.preset)
    if args.seq_len is None:
        args.seq_len = base.max_seq_len
    if args.layers is None:  # at least 2 layers per DualPipeV stage, every split even
        unit = math.lcm(2 * pp, pp * args.vpp)
        args.layers = -(-max(base.num_layers, 4 * pp) // unit) * unit
    if args.microbatches is None:
        args.microbatches = str(4 * pp)
    args.microbatches = [int(m) for m in str(args.microbatches).split(",")]
    if args.stage_layers is not None:
        args.stage_layers = tuple(int(n) for n in str(args.stage_layers).split(","))
    if args.schedule == "all":
        return [s for s in ALL_SCHEDULES if s in MEGATRON or runs_on(s, pp)]
    schedules = args.schedule.split(",")
    unknown = [s for s in schedules if s not in ALL_SCHEDULES]
    if unknown:
        raise SystemExit(f"--schedule {args.schedule} is invalid: {unknown} unknown; use "
                         f"{', '.join(ALL_SCHEDULES)}, a comma list of them, or all")
    return schedules


def main(argv=None, megatron_on_cpu: bool = False) -> Optional[dict]:
    """megatron_on_cpu: run Megatron's own schedules on a CPU device too (instead of only
    checking their stage models): for a caller that has pointed Megatron's CUDA calls at the
    CPU, as tests/test_benchmark_scripts.py does to run the GPU code path on gloo."""
    args = parse_args(argv)
    args.megatron_on_cpu = megatron_on_cpu
    args.device = prepare_rank_device(args.device)
    schedules = resolve(args, int(os.environ.get("WORLD_SIZE", "1")))
    with distributed(args.device, args.seed, expert_parallel_size=args.expert_parallel_size,
                     pipeline_parallel_size=args.pp) as (pg, device):
        return run(args, schedules, pg, device)


def run(args, schedules: list[str], pg, device) -> Optional[dict]:
    cfg = model_config(args)
    rank, pp, ep = dist.get_rank(), pg.pp.size(), pg.ep.size()
    batches = make_batches(cfg, max(args.microbatches), args.micro_batch_size, args.seq_len,
                           device, replica=pg.dp.rank())
    # the schedule-free reference from the seeded full model, on the first rank of each
    # pipeline (with EP: together with the other pipelines' first ranks, its EP group)
    model = seeded_full_model(cfg, pg, device, args.seed)
    weights = fingerprint(model.state_dict().items())
    same_on_all_ranks = check_fingerprint("reference", weights, None, pg)
    per_microbatch: list = [None]
    if pg.pp.rank() == 0:
        per_microbatch = [[t.float().cpu() for t in reference_lm_losses(model, batches)]]
    dist.broadcast_object_list(per_microbatch, group=pg.pp, group_src=0)
    params = sum(p.numel() for p in model.parameters())  # with EP: this rank's expert shard
    del model
    free_memory(device)

    def reference_of(num_microbatches: int) -> list[torch.Tensor]:
        return per_microbatch[0][:num_microbatches]

    header = {
        **result_header(device),
        "pp": pp, "ep": ep, "preset": cfg.name, "layers": cfg.num_layers, "params": params,
        "dtype": cfg.params_dtype, "micro_batch_size": args.micro_batch_size,
        "seq_len": args.seq_len, "microbatches": args.microbatches, "vpp": args.vpp,
        "stage_layers": args.stage_layers, "steps": args.steps, "warmup": args.warmup, "optimizer": args.optimizer,
        "compile": args.compile, "moe_overlap": args.moe_overlap, "count_group": args.count_group,
        "defer_wgrad": args.defer_wgrad,
        "weights_fingerprint": weights, "same_weights_on_all_ranks": same_on_all_ranks,
    }
    runs: list[dict] = []
    # the baseline first: a run cut short by a time limit keeps what matters most
    overlaps = {"auto": [None], "on": [True], "off": [False], "both": [True, False]}
    for k, schedule in enumerate(sorted(schedules, key=RUN_ORDER.index)):
        if (device.type != "cuda" and schedule in MEGATRON and rank == 0
                and not args.megatron_on_cpu):
            print(f"{schedule}: skipped, {MEGATRON_NEEDS_CUDA}", file=sys.stderr)
        if schedule in MEGATRON:
            runs += run_megatron(schedule, cfg, pg, args, device, batches, reference_of, weights)
        count_groups = {"same": ["same"], "separate": ["separate"],
                        "both": ["same", "separate"]}[args.count_group]
        defers = {"off": [False], "on": [True], "both": [False, True]}[args.defer_wgrad]
        for overlap in (overlaps[args.moe_overlap] if schedule in OURS else []):
            for count_group in (count_groups if overlap is not False else ["same"]):
                for defer in (defers if overlap is not False else [False]):
                    runs += run_ours(schedule, cfg, pg, args, device, batches, reference_of,
                                     weights, overlap, count_group, defer)
        if rank == 0:
            results = {**header, "complete": k == len(schedules) - 1,
                       "runs": with_ratios(runs)}
            if args.json_out:  # after every schedule, so that a partial run leaves its numbers
                write_json(args.json_out, results)
    if rank != 0:
        return None
    print_table(results)
    emit_json(results)  # --json-out: written after every schedule above
    return results


def with_ratios(runs: list[dict]) -> list[dict]:
    """The runs in (M, schedule) order, each with its tokens/s over 1F1B's at the same M."""
    runs = sorted(runs, key=lambda r: (r["microbatches"], ALL_SCHEDULES.index(r["schedule"]),
                                       r.get("moe_overlap") is False,
                                       r.get("count_group") == "separate",
                                       bool(r.get("defer_wgrad"))))
    for r in runs:
        base = next((b for b in runs if b["schedule"] == "1f1b" and b["status"] == "ok"
                     and b["microbatches"] == r["microbatches"]), None)
        if r["status"] == "ok" and base is not None:
            r["ratio_vs_1f1b"] = round(r["tok_per_s"] / base["tok_per_s"], 4)
    return runs


def print_table(results: dict) -> None:
    ep = f" x EP={results['ep']}" if results.get("ep", 1) > 1 else ""
    print(f"PP={results['pp']}{ep} {results['preset']} {results['layers']} layers, micro-batch "
          f"{results['micro_batch_size']} x {results['seq_len']} ({results['device']}); "
          "tok/s of one pipeline", file=sys.stderr)
    print(f"{'schedule':<16} {'M':>3} {'step ms':>9} {'tok/s':>10} {'vs 1F1B':>8} "
          f"{'peak GiB/rank':>20} {'loss-ref':>9} {'idle/paper':>10} {'ramp/paper':>10} "
          f"{'a2a hidden':>10}", file=sys.stderr)
    for r in results["runs"]:
        label = run_label(r["schedule"], r.get("moe_overlap"), r.get("count_group") == "separate",
                          results["moe_overlap"],
                          bool(r.get("defer_wgrad")) and results.get("defer_wgrad") == "both")
        if r["status"] != "ok":
            print(f"{label:<16} {r['microbatches']:>3} skipped: {r['reason'][:80]}",
                  file=sys.stderr)
            continue
        bubble = r.get("bubble") or {}
        ratio, ramp = (bubble.get("mean_idle_over_paper"),
                       bubble.get("mean_ramp_idle_over_paper"))
        hidden = (r.get("all_to_all") or {}).get("hidden_fraction_steady")
        print(f"{label:<16} {r['microbatches']:>3} {r['step_s'] * 1e3:>9.1f} "
              f"{r['tok_per_s']:>10.0f} {r.get('ratio_vs_1f1b', float('nan')):>8.3f} "
              f"{'/'.join(f'{p:.1f}' for p in r['peak_gib']):>20} {r['loss_abs_diff']:>9.2e} "
              f"{'' if ratio is None else f'{ratio:.2f}':>10} "
              f"{'' if ramp is None else f'{ramp:.2f}':>10} "
              f"{'' if hidden is None else f'{hidden:.1%}':>10}", file=sys.stderr)


if __name__ == "__main__":
    main()
