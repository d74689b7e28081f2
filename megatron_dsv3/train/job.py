"""The training job itself: set-up, the loop, `main`.

`setup` initialises the process groups (TP, EP, PP, DP), picks the device, resolves the run
folder and the checkpoint to resume from (before the slow part, so a wrong --resume fails
early), loads the corpus, builds the model (its pipeline stages with PP > 1) and AdamW, and
loads the checkpoint. `train` runs the optimizer steps, logs each (rank 0), validates every
--eval-interval steps and checkpoints every --save-interval steps (both also at the end), and
writes the plots at the end. `main` turns a `TrainError` into a one-line message and exit
status 2.
"""

from __future__ import annotations

import collections
import os
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from ..data import load_corpus
from .args import TrainError, parse_args
from .build import build_initial_model, build_optimizer, compile_for_device, pick_device
from .checkpoint import checkpoint_payload, find_checkpoint, load_checkpoint, save_checkpoint
from .metrics_log import LOAD_WINDOW_STEPS, MetricsLog, start_wandb, write_plots
from .pipeline import Pipeline
from .step import Run, evaluate, train_step


def resolve_out_dir(args) -> Path:
    """--out-dir, the run folder of a --resume path, or runs/<preset>-<time> (rank 0's time)."""
    if args.out_dir is not None:
        return args.out_dir
    if args.resume not in (None, "auto"):
        step_dir = find_checkpoint(args.resume, None)
        return step_dir.parent.parent
    stamp = [time.strftime("%Y%m%d-%H%M%S")]
    if dist.is_initialized():
        dist.broadcast_object_list(stamp, src=0)
    return Path("runs") / f"{args.preset}-{stamp[0]}"


def setup(args, cfg) -> tuple[Run, Optional[Path]]:
    from ..moe.balance import set_balance_loss_scale
    from ..parallel import init_distributed

    backend = "gloo" if args.device == "cpu" else None
    # Megatron's groups with the pipeline (parallel.py has the layout): `pp` is one pipeline,
    # `dp` / `ep` / `expt_dp` are among the ranks holding the same stages.
    pg = init_distributed(args.tensor_parallel_size, args.expert_parallel_size,
                          pipeline_parallel_size=args.pipeline_parallel_size,
                          backend=backend, seed=args.seed)
    device = pick_device(args)
    if device.type == "cpu":
        # Megatron's jit_fuser is torch.compile: on CPU it compiles C++ for ~15 s at the first
        # call and gains nothing. Switched off for this job's process only, before that call.
        torch._dynamo.config.disable = True
    if device.type == "cpu" and int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1)
                                  // int(os.environ["LOCAL_WORLD_SIZE"])))
    out_dir = resolve_out_dir(args)
    step_dir = find_checkpoint(args.resume, out_dir)  # before the slow part: fail early
    tokenizer, corpus = load_corpus(args.data_dir, val_fraction=args.val_fraction)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise TrainError(f"--data-dir {args.data_dir}: its tokenizer has {tokenizer.vocab_size} "
                         f"tokens, more than preset '{cfg.name}' vocab_size={cfg.vocab_size}; "
                         "use a preset with a larger vocabulary or a smaller tokenizer")
    model = build_initial_model(cfg, pg, args.seed, device)
    compile_for_device(model, args, device)
    pipeline = None
    if args.pipeline_parallel_size > 1:
        pipeline = Pipeline.create(model, args, pg)
        model = torch.nn.ModuleList(pipeline.stages)  # parameters, state dict, routers
    set_balance_loss_scale(model, 1.0 / args.grad_accum)  # each micro-batch's loss / grad_accum
    run = Run(args, cfg, pg, device, model, build_optimizer(model, args), corpus,
              out_dir=out_dir, pipeline=pipeline)
    if step_dir is not None:
        load_checkpoint(run, step_dir)
    elif args.resume == "auto" and dist.get_rank() == 0:
        print(f"--resume auto: no checkpoint in {run.out_dir / 'checkpoints'}, starting fresh",
              file=sys.stderr)
    return run, step_dir


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
    progress = tqdm(total=args.steps, initial=start_step, disable=not is_main,
                    desc=f"{run.cfg.name} tp={run.pg.tp.size()} ep={run.pg.ep.size()} "
                         f"pp={args.pipeline_parallel_size} dp={run.pg.dp.size()}",
                    dynamic_ncols=True, mininterval=1.0)
    summary = {"out_dir": str(out_dir), "steps": [], "losses": [], "grad_norms": []}
    while run.step < args.steps:
        start = time.perf_counter()
        metrics, loads = train_step(run)
        elapsed = time.perf_counter() - start
        metrics["step_time_s"] = elapsed
        metrics["tokens_per_s"] = run.tokens_per_step / elapsed
        recent_loads.append(loads.loads)
        names = loads.names
        last = run.step == args.steps
        if args.eval_interval and (run.step % args.eval_interval == 0 or last):
            metrics.update(evaluate(run))
            if is_main:
                progress.write(f"step {run.step}: val loss {metrics['val_loss']:.4f}, "
                               f"train loss {metrics['loss']:.4f}")
        if is_main:
            log.append(metrics)
            if wandb_run is not None:
                wandb_run.log(metrics, step=run.step)
        summary["steps"].append(run.step)
        summary["losses"].append(metrics["loss"])
        summary["grad_norms"].append(metrics["grad_norm"])
        summary.update(val_loss=metrics.get("val_loss", summary.get("val_loss")))
        progress.set_postfix(loss=f"{metrics['loss']:.3f}",
                             tok_s=f"{metrics['tokens_per_s']:.0f}")
        progress.update(1)
        if args.save_interval and (run.step % args.save_interval == 0 or last):
            save_checkpoint(out_dir / "checkpoints", run.step, checkpoint_payload(run),
                            rank=dist.get_rank())
    progress.close()
    if is_main:
        if log.records:
            write_plots(out_dir, log.records, names, recent_loads)
        summary["wandb_dir"] = None
        if wandb_run is not None:
            summary["wandb_dir"] = str(Path(wandb_run.dir).parent)
            wandb_run.finish()
        print(f"run folder: {out_dir}" + (f"\nW&B run folder: {summary['wandb_dir']}"
                                          if summary["wandb_dir"] else ""))
    return summary


def main(argv: Optional[list[str]] = None) -> dict:
    """Parse `argv` (default: the command line), train, return the run's summary."""
    from ..parallel import shutdown_distributed

    args, cfg = parse_args(argv)
    try:
        run, step_dir = setup(args, cfg)
        return train(run, step_dir)
    except TrainError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from err
    finally:
        shutdown_distributed()


def cli() -> None:
    """The `dsv3-train` console script and `python -m megatron_dsv3.train`: main(), exit status
    0 on success (a console script would exit 1 with main's summary dict as its status)."""
    main()
