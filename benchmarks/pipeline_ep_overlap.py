#!/usr/bin/env python3
"""How much of the expert-parallel all-to-all the MoE F&B overlap (pipeline/moe_overlap.py)
hides behind compute: one pipeline stage's MoE layers, every piece timed, against the same
step without overlap in the same run.

How to run on N GPUs of one host (the device session: from the repo root, carrying `.whl/`,
the megatron-core wheel; one call is at most 10 minutes):

  bash benchmarks/pipeline_gpu.sh 2      # everything below for 2 GPUs in one call, or by hand:

  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 \
      NVSHMEM_DISABLE_NVLS=1
  # issue 3 on 2 H200s: EP=2, proxy widths, 4 MoE layers, 1 x 4096 tokens per micro-batch
  python3 -m torch.distributed.run --standalone --nproc-per-node 2 \
      benchmarks/pipeline_ep_overlap.py --trace-dir $OUT/ep2 --json-out $OUT/ep2.json
  # 4 H200s: EP=4 (the same command with --nproc-per-node 4 and $OUT/ep4)
  # logic check on CPU (gloo; its numbers mean nothing: gloo's all-to-all and the compute share
  # two cores):
  .venv/bin/python -m torch.distributed.run --standalone --nproc-per-node 2 \
      benchmarks/pipeline_ep_overlap.py --preset tiny --device cpu --seq-len 32 \
      --steps 2 --warmup 1

The step. The world is one EP group (EP = number of processes; every rank has its own tokens,
as data-parallel ranks do). A stage of `--moe-layers` MoE layers of the preset (the model's own
TransformerLayers, built with EP sharded experts) runs micro-batches one after the other; the
steady-state step i is the F&B step of the DualPipe schedules: the backward of micro-batch i-1
(from a random output gradient) together with the forward of micro-batch i (random hidden
states [seq, micro-batch, hidden] in the parameters' dtype).
  overlapped   `run_interleaved(backward_program(i-1), forward_program(i))`: the pieces
               alternate so that each all-to-all of one micro-batch is in flight (on the comm
               stream on GPU) while the other micro-batch computes (moe_overlap's design)
  sequential   the baseline: `run_sequential` of the backward, then of the forward: every
               all-to-all is waited for right after it is issued
Both passes run the same micro-batches from the same weights; their outputs, input gradients
and accumulated parameter gradients are compared (they should be bit-identical).

Definitions (per rank, summed over the timed steps; times on the device: CUDA events on GPU,
host clock on CPU):
  exchange     one row all-to-all (dispatch and combine in the forward, their gradients in the
               backward: 4 per MoE layer and micro-batch). Its interval is [issue, completion]:
               issue = when the compute stream reached the exchange (its rows are ready),
               completion = when the all-to-all finished (GPU: an event the comm stream records
               after waiting for the NCCL work; CPU: the gloo work's completion callback). An
               exchange that queues behind another one on the communicator is in flight from
               its issue on.
  comm time    C = the length of the union of the exchanges' intervals.
  exposed      X = the length of the union of [wait, completion] over exchanges completing
               after `wait`, the moment the compute stream reached the piece that needs the
               rows (just before `AsyncExchange.finish`): the time compute stood still for
               communication.
  hidden fraction = 1 - X / C (0: none hidden; 1: compute never waited).
  strict       the count all-to-all of each MoE layer's route plan (issued at the end of the
               attention piece, waited for in 'F<i>.plan.wait') runs on the same communicator,
               so it queues behind a row exchange still in flight; `hidden_fraction_strict`
               also counts as exposed the part of each plan wait that overlaps such an
               exchange (an upper bound of the exposure: the device may still be computing
               what the host queued before the wait). The true fraction lies between the
               strict and the plain one.
The sequential pass's fraction is the floor of this measurement: what counts as hidden with no
overlap at all (the time an exchange runs while the host is still issuing it; on GPU close to 0
unless the device waits for the host). The count exchanges themselves (EP x experts/EP
integers) are not counted as communication. The first
exchange issued in a step (the backward's combine) and the last one (the forward's last
combine) have nothing of the other micro-batch left to hide behind, so the fraction grows
with the number of layers. Each step starts from an idle device (synchronized between
steps), which a real pipeline would not do.

Outputs: one JSON line (every rank's numbers; the headline `hidden_fraction` is the minimum over
ranks of the overlapped pass), and with `--trace-dir` the per-rank piece timelines of the last
timed step of both passes (`pieces.json`, `timeline.png`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.common import (distributed, emit_json, empty_cache, peak_gib,  # noqa: E402
                               prepare_rank_device, result_header)

# the stamping and the arithmetic (definitions above): one piece of code with the pipeline's
from megatron_dsv3.profiling.comm_timing import (Clock, TimedExchange,  # noqa: E402
                                                TimedTrace, resolve_step, step_numbers,
                                                summarize)


# ----------------------------------------------------------------------------------------------
# The passes
# ----------------------------------------------------------------------------------------------
def microbatch(cfg, args, rank: int, index: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states entering the stage and the gradient arriving at its output, [s, b, d]:
    the same for both passes, different on every rank."""
    g = torch.Generator().manual_seed(10_000 * (rank + 1) + index)
    shape = (args.seq_len, args.micro_batch_size, cfg.hidden_size)
    x = torch.randn(shape, generator=g).to(device=device, dtype=cfg.torch_dtype)
    grad = torch.randn(shape, generator=g).to(device=device, dtype=cfg.torch_dtype)
    return x.requires_grad_(), grad


def run_pass(mode: str, layers, cfg, args, device, group, count_groups=None) -> dict:
    """Forward of micro-batch 0, then F&B steps i = 1..warmup+steps (backward of i-1 with the
    forward of i), then the backward of the last one; the steps after the warm-up are timed.
    count_groups: AsyncExchange's (the count exchanges over a duplicate of the EP group).
    Mode overlapped_wgrad: the layers hold a WeightGradStore (as a schedule's stages do) and
    the backward's weight gradients run after each of its segments (run_interleaved's
    first_weight_grads)."""
    from megatron_dsv3.moe.pieces import MoELayerPieces
    from megatron_dsv3.pipeline.fb_overlap import (backward_program, forward_program,
                                                   run_interleaved, run_sequential)
    from megatron_dsv3.weight_grad import WeightGradStore, attach_weight_grad_store

    rank = dist.get_rank()
    clock = Clock(device, group)
    trace = TimedTrace(clock)
    exchange = TimedExchange(clock, trace, count_groups=count_groups)
    store = WeightGradStore() if mode == "overlapped_wgrad" else None
    for layer in layers:
        layer.zero_grad(set_to_none=True)
        attach_weight_grad_store(layer, store)

    def runs():
        return [MoELayerPieces(layer, exchange, {"attention_mask": None}) for layer in layers]

    x, grad = microbatch(cfg, args, rank, 0, device)
    previous = (runs(), grad)
    outputs = [run_sequential(forward_program(previous[0], x)).detach()]
    forward_layers = args.forward_layers or len(layers)  # the forward's share of the F&B step
    input_grads, records = [], []
    for i in range(1, args.warmup + args.steps + 1):
        x, grad = microbatch(cfg, args, rank, i, device)
        current = runs()
        trace.clear()
        exchange.timings = []
        clock.begin()
        forward = forward_program(current[:forward_layers], x, trace)
        if mode.startswith("overlapped"):
            input_grad, output = run_interleaved(backward_program(previous[0], previous[1], trace),
                                                 forward, store, trace)
        else:
            input_grad = run_sequential(backward_program(previous[0], previous[1], trace))
            output = run_sequential(forward)
        trace.append("end")
        record = resolve_step(clock, trace, exchange.timings)
        if forward_layers < len(layers):  # the rest of the forward, untimed, before its backward
            output = run_sequential(forward_program(current[forward_layers:], output))
        if i > args.warmup:
            records.append(record)
        outputs.append(output.detach())
        input_grads.append(input_grad)
        previous = (current, grad)
    input_grads.append(run_sequential(backward_program(previous[0], previous[1])))
    param_grads = {f"{k}.{n}": p.grad.detach().clone() for k, layer in enumerate(layers)
                   for n, p in layer.named_parameters() if p.grad is not None}
    for layer in layers:
        attach_weight_grad_store(layer, None)
    return {"records": records, "outputs": outputs, "input_grads": input_grads,
            "param_grads": param_grads}


def max_abs_diff(a: list, b: list) -> float:
    return max(((x.float() - y.float()).abs().max().item() for x, y in zip(a, b)), default=0.0)


# ----------------------------------------------------------------------------------------------
# Pictures
# ----------------------------------------------------------------------------------------------
_PIECE_COLORS = {"attn": "#4c72b0", "plan": "#8c8c8c", "mlp": "#55a868", "shared": "#8172b2",
                 "combine": "#dd8452", "issue": "#dddddd", "wait": "#c44e52"}
_EXCHANGE_COLORS = {"dispatch": "#64b5cd", "combine": "#dd8452"}


def draw(per_rank: list[dict], path: Path, title: str) -> None:
    """One panel per pass; per rank a compute row (pieces; F solid, B hatched; the waits red,
    the issuing grey) and a comm row (each all-to-all from issue to completion)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    modes = list(per_rank[0])
    fig, axes = plt.subplots(len(modes), 1, figsize=(14, 1.3 * len(per_rank) * len(modes) + 1.5),
                             squeeze=False)
    for ax, mode in zip(axes[:, 0], modes):
        rows = len(per_rank) * 2
        end = max(r[mode]["duration"] for r in per_rank)
        for rank, r in enumerate(per_rank):
            y_compute, y_comm = rows - 1 - 2 * rank, rows - 2 - 2 * rank
            for name, start, stop in r[mode]["pieces"]:
                _, piece, action = (name.split(".") + ["", ""])[:3]
                if action in ("wait", "issue"):
                    color, hatch = _PIECE_COLORS[action], None
                elif action in ("run", "rest") and piece in _PIECE_COLORS:
                    color, hatch = _PIECE_COLORS[piece], "//" if name[0] == "B" else None
                else:
                    continue
                ax.broken_barh([(start, stop - start)], (y_compute + 0.1, 0.8), facecolors=color,
                               edgecolor="black", linewidth=0.2, hatch=hatch)
            for e in r[mode]["exchanges"]:
                piece = e["name"].split(".")[1]
                ax.broken_barh([(e["issue"], e["completion"] - e["issue"])], (y_comm + 0.2, 0.6),
                               facecolors=_EXCHANGE_COLORS.get(piece, "grey"), alpha=0.6,
                               edgecolor="black", linewidth=0.2,
                               hatch="//" if e["name"][0] == "B" else None)
        ax.set_yticks([rows - 1 - k + 0.5 for k in range(rows)])
        ax.set_yticklabels([f"rank {k // 2} {'compute' if k % 2 == 0 else 'all-to-all'}"
                            for k in range(rows)], fontsize=7)
        ax.set_xlim(0, end)
        ax.set_title(f"{mode}: {per_rank[0][mode]['summary']}", loc="left", fontsize=8)
    axes[-1, 0].set_xlabel("seconds from the start of the step")
    fig.suptitle(title + "\nB hatched; red: compute waiting for an all-to-all", fontsize=9,
                 x=0.01, ha="left")
    handles = [Patch(color=c, label=p) for p, c in _PIECE_COLORS.items()]
    handles += [Patch(color=c, alpha=0.6, label=f"{p} all-to-all")
                for p, c in _EXCHANGE_COLORS.items()]
    fig.legend(handles=handles, loc="upper right", ncol=4, fontsize=7, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="proxy")
    parser.add_argument("--moe-layers", type=int, default=4, help="MoE layers of the stage")
    parser.add_argument("--forward-layers", type=int, default=None,
                        help="the F&B step's forward runs only the first K MoE layers (the "
                             "backward runs all): the backward has segments left after the "
                             "forward's run out, as on a DualPipeV rank whose two chunks hold "
                             "different numbers of MoE layers; the rest of the forward runs "
                             "untimed after the step (default: all, a symmetric step)")
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=None,
                        help="tokens per sequence (default: the preset's max_seq_len)")
    parser.add_argument("--dtype", default=None, choices=[None, "bfloat16", "float32"])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=10, help="timed F&B steps per pass")
    parser.add_argument("--warmup", type=int, default=3, help="untimed F&B steps per pass")
    parser.add_argument("--compile", default="none", choices=["none", "modules"],
                        help="torch.compile our modules (MLA, FFNs) first")
    parser.add_argument("--count-group", default="same", choices=["same", "separate"],
                        help="separate: a third pass, overlapped with the count exchanges over "
                             "a duplicate of the EP group on their own stream (overlapped_cg)")
    parser.add_argument("--defer-wgrad", action="store_true",
                        help="one more pass, overlapped_wgrad: the layers hold a WeightGradStore "
                             "(as a pipeline schedule's stages do) and the backward's weight "
                             "gradients run after each of its segments, behind its exchange")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--trace-dir", type=Path, default=None)
    parser.add_argument("--json-out", type=Path, default=None)
    return parser.parse_args(argv)


def build_layers(args, pg, device):
    """The preset's first `first_k_dense` dense layers + `--moe-layers` MoE layers, experts
    sharded over the EP group; returns the config and the MoE layers (the rest is dropped)."""
    from megatron_dsv3.config import preset, to_megatron_config
    from megatron_dsv3.model import build_model
    from megatron_dsv3.moe.balance import set_balance_loss_scale
    from megatron_dsv3.moe.layer import DeepSeekMoE

    cfg = preset(args.preset)
    cfg = cfg.replace(num_layers=cfg.moe.first_k_dense + args.moe_layers, mtp__num_layers=0,
                      max_seq_len=max(args.seq_len or cfg.max_seq_len, 1))
    if args.dtype:
        cfg = cfg.replace(params_dtype=args.dtype)
    torch.manual_seed(args.seed)
    model = build_model(cfg, pg_collection=pg, megatron_config=to_megatron_config(
        cfg, expert_parallel_size=pg.ep.size(), use_cpu_initialization=device.type != "cuda"))
    model = model.to(device).train()
    if args.compile != "none":
        from megatron_dsv3.model import compile_model

        compile_model(model, scope=args.compile)
    layers = [layer for layer in model.decoder.layers if isinstance(layer.mlp, DeepSeekMoE)]
    set_balance_loss_scale(model, 1.0)  # one micro-batch per backward
    return cfg, layers


def main(argv=None) -> Optional[dict]:
    args = parse_args(argv)
    args.device = prepare_rank_device(args.device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world < 2:
        raise SystemExit("expert parallelism needs at least 2 processes: start this script with "
                         "torchrun --nproc-per-node 2 (or more); EP = the number of processes")
    with distributed(args.device, args.seed, expert_parallel_size=world) as (pg, device):
        return run(args, pg, device)


def run(args, pg, device) -> Optional[dict]:
    cfg, layers = build_layers(args, pg, device)
    if args.seq_len is None:
        args.seq_len = cfg.max_seq_len
    rank, ep = dist.get_rank(), pg.ep.size()
    if cfg.moe.num_experts % ep:
        raise SystemExit(f"EP={ep} does not divide the {cfg.moe.num_experts} experts of preset "
                         f"{cfg.name}: use a divisor of it as the number of processes")
    if args.forward_layers is not None and not 1 <= args.forward_layers <= len(layers):
        raise SystemExit(f"--forward-layers {args.forward_layers} is invalid: it must be between "
                         f"1 and --moe-layers {len(layers)}")
    passes = {}
    modes = {"overlapped": None, "sequential": None}
    if args.count_group == "separate":  # the counts over their own communicator and stream
        from megatron_dsv3.parallel import duplicate_group

        modes["overlapped_cg"] = {tuple(dist.get_process_group_ranks(pg.ep)):
                                  duplicate_group(pg.ep)}
    if args.defer_wgrad:
        modes["overlapped_wgrad"] = None
    for mode, count_groups in modes.items():
        passes[mode] = run_pass(mode, layers, cfg, args, device, pg.ep, count_groups)
        empty_cache(device)
    over, seq = passes["overlapped"], passes["sequential"]
    # both passes, with every tensor kept for their comparison; None on CPU
    peak = round(peak_gib(device), 3) if device.type == "cuda" else None
    local = {"rank": rank, "peak_gib": peak,
             "max_abs_diff": {"outputs": max_abs_diff(over["outputs"], seq["outputs"]),
                              "input_grads": max_abs_diff(over["input_grads"],
                                                          seq["input_grads"]),
                              "param_grads": max_abs_diff(list(over["param_grads"].values()),
                                                          list(seq["param_grads"].values()))}}
    for mode, result in passes.items():
        local[mode] = summarize([step_numbers(r) for r in result["records"]])
    last = {mode: {**asdict(result["records"][-1]),
                   "summary": _one_line(local[mode])} for mode, result in passes.items()}
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (local, last))
    if rank != 0:
        return None
    per_rank = [r for r, _ in everyone]
    hidden = [r["overlapped"]["hidden_fraction"] for r in per_rank]
    results = {
        **result_header(device),
        "numbers_meaningful": device.type == "cuda",
        "ep": ep, "preset": cfg.name, "moe_layers": len(layers),
        "forward_layers": args.forward_layers or len(layers), "dtype": cfg.params_dtype,
        "micro_batch_size": args.micro_batch_size, "seq_len": args.seq_len,
        "steps": args.steps, "warmup": args.warmup, "compile": args.compile,
        "hidden_fraction": min(h for h in hidden if h is not None) if any(
            h is not None for h in hidden) else None,
        "hidden_fraction_strict": min(r["overlapped"]["hidden_fraction_strict"] or 0.0
                                      for r in per_rank),
        "sequential_hidden_fraction": max(r["sequential"]["hidden_fraction"] or 0.0
                                          for r in per_rank),
        "speedup_vs_sequential": round(
            max(r["sequential"]["step_s"] for r in per_rank)
            / max(r["overlapped"]["step_s"] for r in per_rank), 4),
        "max_abs_diff": {k: max(r["max_abs_diff"][k] for r in per_rank)
                         for k in per_rank[0]["max_abs_diff"]},
        "per_rank": per_rank,
    }
    for key, mode in (("count_group", "overlapped_cg"), ("defer_wgrad", "overlapped_wgrad")):
        if mode not in passes:
            continue
        results[key] = {
            "hidden_fraction": min(r[mode]["hidden_fraction"] or 0.0 for r in per_rank),
            "hidden_fraction_strict": min(r[mode]["hidden_fraction_strict"] or 0.0
                                          for r in per_rank),
            "speedup_vs_sequential": round(
                max(r["sequential"]["step_s"] for r in per_rank)
                / max(r[mode]["step_s"] for r in per_rank), 4),
            "max_abs_diff_vs_sequential": {
                "outputs": max_abs_diff(passes[mode]["outputs"], seq["outputs"]),
                "param_grads": max_abs_diff(list(passes[mode]["param_grads"].values()),
                                            list(seq["param_grads"].values()))}}
    if args.trace_dir is not None:
        args.trace_dir.mkdir(parents=True, exist_ok=True)
        timelines = [t for _, t in everyone]
        (args.trace_dir / "pieces.json").write_text(json.dumps(timelines, indent=1))
        try:
            draw(timelines, args.trace_dir / "timeline.png",
                 f"MoE F&B step, EP={ep}, {cfg.name}, {len(layers)} MoE layers, "
                 f"{args.micro_batch_size} x {args.seq_len} tokens per micro-batch "
                 f"({results['device']}; last timed step)")
            results["timeline_png"] = str(args.trace_dir / "timeline.png")
        except ImportError as error:
            print(f"WARNING: timeline.png not drawn ({error}); pieces.json holds the data",
                  file=sys.stderr)
    for r in per_rank:
        print(f"rank {r['rank']}: overlapped {_one_line(r['overlapped'])} | sequential "
              f"{_one_line(r['sequential'])}", file=sys.stderr)
    print(f"hidden fraction (min over ranks) {results['hidden_fraction']}, strict "
          f"{results['hidden_fraction_strict']}; speed-up over sequential "
          f"{results['speedup_vs_sequential']}x; max |overlapped - sequential| "
          f"{results['max_abs_diff']}" + ("" if device.type == "cuda" else
                                           " (CPU: the numbers mean nothing)"), file=sys.stderr)
    for key, mode, what in (("count_group", "overlapped_cg", "counts on their own group"),
                            ("defer_wgrad", "overlapped_wgrad", "B's weight grads deferred")):
        if key in results:
            for r in per_rank:
                print(f"rank {r['rank']}: overlapped, {what} {_one_line(r[mode])}",
                      file=sys.stderr)
            print(f"{what}: {results[key]}", file=sys.stderr)
    emit_json(results, args.json_out)
    return results


def _one_line(s: dict) -> str:
    steps, hidden = len(s["step_times"]), s["hidden_fraction"]
    return (f"step {s['step_s'] * 1e3:.2f} ms, all-to-all {s['comm_s'] * 1e3 / steps:.2f} ms/step, "
            f"exposed {s['exposed_s'] * 1e3 / steps:.2f} ms/step, hidden "
            + ("n/a" if hidden is None else f"{hidden:.1%}"))

if __name__ == "__main__":
    main()
