#!/usr/bin/env python3
"""The training job's optimizer step against the benchmark's forward + backward, in one run.

  python benchmarks/bench_train_step.py                        # proxy + MTP, 8 x 4096 tokens
  python benchmarks/bench_train_step.py --job-args "--amp bf16"   # more flags for the job
  python benchmarks/bench_train_step.py --preset tiny --device cpu --seq-len 64 --steps 2 \
      --warmup 1 --grad-accum 2                                  # logic check on CPU

Two measurements in one process, one after the other:
  baseline  `bench_proxy.py`'s forward + backward of one micro-batch (its fast path: bf16
            parameters, compiled modules with CUDA graphs on GPU), MTP included
  job       `megatron_dsv3.train`'s own set-up and `train_step` (what `python -m
            megatron_dsv3.train` runs): `--grad-accum` micro-batches of the bundled corpus,
            gradient reduction, clipping, AdamW, the bias update, the step's metrics
The job's tokens/s over the baseline's is the ratio issue 10 asks to bring to 0.9 or more.
`--profile PATH` writes a kernel table of one job step (torch.profiler, GPU only).
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.common import (emit_json, empty_cache, peak_gib, resolve_device,  # noqa: E402
                               result_header, time_steps)


def run_baseline(args) -> dict:
    """bench_proxy.py's forward + backward (its own code path and defaults) of the preset."""
    from benchmarks import bench_proxy

    argv = ["--preset", args.preset, "--device", args.device, "--steps", str(args.steps * 2),
            "--warmup", str(args.warmup + 2), "--batch", str(args.micro_batch_size),
            "--seq-len", str(args.seq_len), "--mtp", *shlex.split(args.baseline_args)]
    return bench_proxy.main(argv)["ours"]


def run_job(args) -> dict:
    """The job's set-up and `train_step`, timed per optimizer step."""
    from megatron_dsv3.train.args import parse_args
    from megatron_dsv3.train.job import setup
    from megatron_dsv3.train.step import train_step

    out_dir = Path(tempfile.mkdtemp(prefix="bench_train_step_"))
    argv = ["--preset", args.preset, "--device", args.device, "--micro-batch-size",
            str(args.micro_batch_size), "--grad-accum", str(args.grad_accum), "--seq-len",
            str(args.seq_len), "--steps", str(args.warmup + args.steps + 1), "--warmup-steps",
            "1", "--save-interval", "0", "--eval-interval", "0", "--no-wandb", "--out-dir",
            str(out_dir), *shlex.split(args.job_args)]
    job_args, cfg = parse_args(argv)
    run, _ = setup(job_args, cfg)
    device = run.device
    metrics: list[dict] = []

    def step() -> None:
        metrics.append(train_step(run)[0])

    kernels = None
    if args.profile and device.type == "cuda":
        from benchmarks.bench_proxy import profile

        kernels = profile(step, args.profile)
    times = time_steps(step, args.steps, args.warmup, device, reset_peak_after_warmup=True)
    median = statistics.median(times)
    return {"argv": argv, "tokens_per_step": run.tokens_per_step, "step_s": round(median, 6),
            "tok_per_s": round(run.tokens_per_step / median, 1), "peak_gib": round(peak_gib(
                device), 2), "step_times": [round(t, 5) for t in times],
            "losses": [round(m["loss"], 4) for m in metrics],
            "params_dtype": str(next(run.model.parameters()).dtype),
            **({"kernel_breakdown": kernels} if kernels else {})}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="proxy")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--grad-accum", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=4, help="timed optimizer steps of the job")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps (compilation)")
    parser.add_argument("--job-args", default="", help="more flags for the training job")
    parser.add_argument("--baseline-args", default="",
                        help="more flags for bench_proxy.py's baseline (e.g. --compile layers)")
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--profile", default=None, help="kernel table of one job step here")
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args(argv)
    args.device = resolve_device(args.device)
    device = torch.device(args.device)
    results = result_header(device)
    if not args.skip_baseline:
        results["baseline"] = run_baseline(args)
        empty_cache(device)
    results["job"] = run_job(args)
    if "baseline" in results:
        results["job_over_baseline"] = round(results["job"]["tok_per_s"]
                                             / results["baseline"]["tok_per_s"], 3)
    job = results["job"]
    print(f"job: {job['step_s'] * 1e3:.1f} ms per step of {job['tokens_per_step']} tokens, "
          f"{job['tok_per_s']:.0f} tok/s, peak {job['peak_gib']} GiB"
          + (f" | baseline fwd+bwd {results['baseline']['tok_per_s']:.0f} tok/s | ratio "
             f"{results['job_over_baseline']}" if "baseline" in results else ""),
          file=sys.stderr)
    emit_json(results, args.json_out)
    return results


if __name__ == "__main__":
    main()
