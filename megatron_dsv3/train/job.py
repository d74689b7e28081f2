"""The training job itself: set-up, the loop, `main`.

`setup` initialises the process groups (TP, EP, PP, DP), picks the device, resolves the run
folder and the checkpoint to resume from (before the slow part, so a wrong --resume fails
early), loads the corpus, builds the model (its pipeline stages with PP > 1; with --init-from
the file's weights, each rank taking its TP/EP slice before the stages are cut) and AdamW, and
loads the checkpoint. `train` runs the optimizer steps, logs each (rank 0), validates every
--eval-interval steps and checkpoints every --save-interval steps (both also at the end), and
writes the plots at the end; on SIGTERM / SIGINT every rank finishes its step, saves it and
stops (preemption.py), and a step with a non-finite loss or gradient norm stops the job before
it is applied, naming the checkpoint to resume from. `main` turns a `TrainError` into a
one-line message and exit status 2, a collective that timed out (--dist-timeout-s: a hung
peer) into one and status 1.
"""

from __future__ import annotations

import collections
import os
import signal
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from ..flops import training_flops_per_token
from ..moe.balance import LOAD_WINDOW_STEPS
from ..parallel import from_rank0
from .args import TrainError, parse_args
from .build import (build_initial_model, build_optimizer, compile_for_device,
                    expert_grad_merger, expert_wgrad_mode, load_data, params_dtype, pick_device,
                    sum_expert_grads_in_gemm_if_asked)
from .checkpoint import (checkpoint_payload, checkpoint_to_resume, load_checkpoint,
                         run_folder_of, save_checkpoint)
from .master_weights import MasterWeights
from .metrics_log import MetricsLog, expert_load_image, start_wandb, write_plots
from .pipeline import Pipeline
from .preemption import StopSignals, exit_status, signal_name
from .step import NonFiniteStep, Run, evaluate, train_step


def resolve_out_dir(args, cfg=None) -> Path:
    """--out-dir, the run folder of a --resume path, or runs/<preset or model name>-<time>
    (rank 0's time)."""
    if args.out_dir is not None:
        return args.out_dir
    if args.resume not in (None, "auto"):
        return run_folder_of(args.resume)
    stamp = from_rank0(time.strftime("%Y%m%d-%H%M%S"))
    name = args.preset or (cfg.name if cfg is not None else "run")
    return Path("runs") / f"{name}-{stamp}"


def setup(args, cfg) -> tuple[Run, Optional[Path]]:
    from ..moe.balance import set_balance_loss_scale
    from ..parallel import init_distributed

    backend = "gloo" if args.device == "cpu" else None
    # Megatron's groups with the pipeline (parallel.py has the layout): `pp` is one pipeline,
    # `dp` / `ep` / `expt_dp` are among the ranks holding the same stages.
    pg = init_distributed(args.tensor_parallel_size, args.expert_parallel_size,
                          pipeline_parallel_size=args.pipeline_parallel_size,
                          backend=backend, seed=args.seed, timeout_s=args.dist_timeout_s)
    device = pick_device(args)
    if device.type == "cpu":
        # Megatron's jit_fuser is torch.compile: on CPU it compiles C++ for ~15 s at the first
        # call and gains nothing. Switched off for this job's process only, before that call.
        torch._dynamo.config.disable = True
    if device.type == "cpu" and int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1)
                                  // int(os.environ["LOCAL_WORLD_SIZE"])))
    out_dir = resolve_out_dir(args, cfg)
    # Verified, never a folder of another run, the config compared: before the slow part
    step_dir = checkpoint_to_resume(args, cfg, out_dir)
    corpus = load_data(args, cfg)  # its problems named before the slow part
    init_state = init_weights(args) if step_dir is None else None
    model = build_initial_model(cfg, pg, args.seed, device, init_state,  # fp32
                                f"--init-from {args.init_from}")
    del init_state  # the model holds its own copy: drop the file's mapping
    dtype = params_dtype(args, device)
    args.expert_wgrad = expert_wgrad_mode(args, cfg, dtype, device)  # auto resolved
    # bf16: the fp32 weights become the masters (exactly), the model gets their rounding
    # every gradient through the masters' hook or the step's merged expert gradients (no
    # deferred or in-GEMM weight gradients): the first of a step is stored, not added to a
    # zeroed sum
    store_first = args.expert_wgrad != "in-gemm" and args.pipeline_parallel_size == 1
    masters = (MasterWeights(model, dtype, store_first=store_first)
               if dtype != torch.float32 else None)
    compile_for_device(model, args, device)
    expert_grads = expert_grad_merger(model, args, cfg, masters)
    sum_expert_grads_in_gemm_if_asked(model, args, masters, device)
    pipeline = None
    if args.pipeline_parallel_size > 1:
        pipeline = Pipeline.create(model, args, pg)
        model = torch.nn.ModuleList(pipeline.stages)  # parameters, state dict, routers
    set_balance_loss_scale(model, 1.0 / args.grad_accum)  # each micro-batch's loss / grad_accum
    trained = (masters.params if masters is not None
               else [p for p in model.parameters() if p.requires_grad])
    run = Run(args, cfg, pg, device, model, build_optimizer(trained, args, masters), corpus,
              out_dir=out_dir, pipeline=pipeline, masters=masters, expert_grads=expert_grads)
    if step_dir is not None:
        load_checkpoint(run, step_dir)
    elif args.resume == "auto" and dist.get_rank() == 0:
        print(f"--resume auto: no checkpoint in {run.out_dir / 'checkpoints'}, starting fresh",
              file=sys.stderr)
    return run, step_dir


def init_weights(args) -> Optional[dict]:
    """The full state dict of --init-from (None without it), read through the converter's
    reader (a step folder's digests verified first; the tensors memory-mapped from the file),
    refused if it holds a NaN or Inf; `build_initial_model` checks that it fits the model."""
    from ..checkpoint.convert import read_dsv3_checkpoint
    from ..checkpoint.hf import ConversionError
    from .checkpoint import first_non_finite

    if args.init_from is None:
        return None
    try:
        state, _ = read_dsv3_checkpoint(args.init_from, flag="--init-from", mmap=True)
    except ConversionError as err:
        raise TrainError(str(err)) from err
    bad = first_non_finite({"model": state})
    if bad is not None:
        raise TrainError(f"--init-from {args.init_from}: {bad} holds NaN or Inf; start from "
                         "finite weights (another checkpoint, or convert the source again)")
    return state


def train(run: Run, step_dir: Optional[Path]) -> dict:
    """The loop: step, log, evaluate, checkpoint; plots at the end. Returns a summary."""
    from tqdm import tqdm

    args, out_dir = run.args, run.out_dir
    is_main = dist.get_rank() == 0
    start_step = run.step
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    dist.barrier()  # the run folder exists before any rank writes to it
    history_from = None
    if step_dir is not None and step_dir.parent.parent.resolve() != out_dir.resolve():
        history_from = step_dir.parent.parent / "metrics.jsonl"
    log = MetricsLog(out_dir, start_step, history_from) if is_main else None
    wandb_run = start_wandb(run, out_dir) if is_main else None
    recent_loads: collections.deque = collections.deque(maxlen=LOAD_WINDOW_STEPS)
    names: list[str] = []
    # model FLOPs per GPU and second (flops.py: what the peers' benchmarks count)
    flops_per_token = training_flops_per_token(run.cfg, args.seq_len)
    progress = tqdm(total=args.steps, initial=start_step, disable=not is_main,
                    desc=f"{run.cfg.name} tp={run.pg.tp.size()} ep={run.pg.ep.size()} "
                         f"pp={args.pipeline_parallel_size} dp={run.pg.dp.size()}",
                    dynamic_ncols=True, mininterval=1.0)
    summary = {"out_dir": str(out_dir), "steps": [], "losses": [], "grad_norms": [],
               "stopped_by": None}
    last_checkpoint = step_dir  # what a failed step's message sends the user back to
    with StopSignals() as signals:  # SIGTERM / SIGINT: stop after a step (preemption.py)
        while run.step < args.steps:
            start = time.perf_counter()
            try:
                metrics, loads, stop_signal = train_step(run, lambda: signals.received)
            except NonFiniteStep as err:
                progress.close()
                if wandb_run is not None:
                    wandb_run.finish(exit_code=2)
                raise TrainError(f"{err}. {_resume_hint(last_checkpoint, args)}") from err
            elapsed = time.perf_counter() - start
            metrics["step_time_s"] = elapsed
            metrics["tokens_per_s"] = run.tokens_per_step / elapsed
            metrics["model_tflops_per_gpu"] = (flops_per_token * metrics["tokens_per_s"]
                                               / dist.get_world_size() / 1e12)
            recent_loads.append(loads.loads)
            names = loads.names
            last = run.step == args.steps
            stopping = bool(stop_signal) and not last  # every rank agreed (step.py, step 4)
            if (args.eval_interval and (run.step % args.eval_interval == 0 or last)
                    and not stopping):  # a preempted job saves first, validates never
                metrics.update(evaluate(run))
                if is_main:
                    progress.write(f"step {run.step}: val loss {metrics['val_loss']:.4f}, "
                                   f"train loss {metrics['loss']:.4f}")
            if is_main:
                log.append(metrics)
                if wandb_run is not None:
                    record = dict(metrics)
                    if "val_loss" in metrics or last:  # the load heatmap at each evaluation
                        record["moe/expert_load"] = expert_load_image(
                            out_dir, log.records, names, recent_loads)
                    wandb_run.log(record, step=run.step)
            summary["steps"].append(run.step)
            summary["losses"].append(metrics["loss"])
            summary["grad_norms"].append(metrics["grad_norm"])
            summary.update(val_loss=metrics.get("val_loss", summary.get("val_loss")))
            progress.set_postfix(loss=f"{metrics['loss']:.3f}",
                                 tok_s=f"{metrics['tokens_per_s']:.0f}")
            progress.update(1)
            if stopping or (args.save_interval and (run.step % args.save_interval == 0 or last)):
                last_checkpoint = save_checkpoint(out_dir / "checkpoints", run.step,
                                                  checkpoint_payload(run), rank=dist.get_rank())
            if stopping:
                summary["stopped_by"] = signal_name(stop_signal)
                if is_main:
                    progress.write(f"{signal_name(stop_signal)}: stopped after step {run.step} "
                                   f"of {args.steps}, saved {last_checkpoint}; continue with "
                                   f"--resume auto --out-dir {out_dir}", file=sys.stderr)
                break
    progress.close()
    if is_main:
        if log.records and summary["stopped_by"] is None:  # stopped: the resumed run draws them
            write_plots(out_dir, log.records, names, recent_loads)
        summary["wandb_dir"] = None
        if wandb_run is not None:
            summary["wandb_dir"] = str(Path(wandb_run.dir).parent)
            wandb_run.finish()
        print(f"run folder: {out_dir}" + (f"\nW&B run folder: {summary['wandb_dir']}"
                                          if summary["wandb_dir"] else ""))
    return summary


def _resume_hint(checkpoint: Optional[Path], args) -> str:
    """Where a run that stopped on a failed step continues from."""
    if checkpoint is None:
        return (f"This run wrote no checkpoint before it (--save-interval {args.save_interval}): "
                "start it again after the change")
    return (f"The last checkpoint is {checkpoint}: after the change, continue from it with "
            f"--resume {checkpoint}")


def _is_collective_timeout(err: BaseException) -> bool:
    """gloo's error for a collective that waited longer than the group's timeout. (NCCL's
    watchdog aborts the process instead, with its own message naming the timeout.)"""
    return isinstance(err, RuntimeError) and "timed out" in str(err).lower()


def main(argv: Optional[list[str]] = None) -> dict:
    """Parse `argv` (default: the command line), train, return the run's summary
    (`summary["stopped_by"]`: the signal's name when a signal stopped it before --steps)."""
    from ..parallel import shutdown_distributed

    args, cfg = parse_args(argv)
    try:
        run, step_dir = setup(args, cfg)
        return train(run, step_dir)
    except TrainError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from err
    except RuntimeError as err:
        if not _is_collective_timeout(err):
            raise
        rank = dist.get_rank() if dist.is_initialized() else 0
        print(f"error: rank {rank} waited more than --dist-timeout-s {args.dist_timeout_s:g} "
              "for the other ranks in a collective: one of them hangs (or died without closing "
              "its connections); its own output says where. If a rank legitimately needs "
              "longer between collectives (a slow checkpoint write, a long first step), raise "
              f"--dist-timeout-s. ({str(err).strip().splitlines()[0]})", file=sys.stderr)
        raise SystemExit(1) from err
    finally:
        shutdown_distributed()


def cli() -> None:
    """The `dsv3-train` console script and `python -m megatron_dsv3.train`: main(), exit status
    0 on success (a console script would exit 1 with main's summary dict as its status), 128 +
    the signal after a stop on SIGTERM / SIGINT (143 / 130; preemption.py), 2 for a TrainError,
    1 when a collective timed out (--dist-timeout-s)."""
    summary = main()
    if summary["stopped_by"] is not None:
        raise SystemExit(exit_status(signal.Signals[summary["stopped_by"]]))
