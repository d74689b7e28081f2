#!/usr/bin/env python3
"""Issue 12's accuracy check: the main job in BF16 and in FP8 (`--fp8 deepseek`) from the same
seed and data, the same number of steps; both loss curves in one plot, and how far the FP8
loss is from the BF16 one: the mean train loss over the last `--window` steps, relative
(DeepSeek-V3 reports under 0.25%), with each run's tokens/s (steps after the first two, which
compile and record CUDA graphs).

  python benchmarks/fp8_convergence.py --preset proxy --steps 300        # one H200
  python benchmarks/fp8_convergence.py --preset tiny --steps 4 --window 2 --device cpu \\
      --fp8-layers dispatch --extra=--micro-batch-size=2 --extra=--seq-len=64 \\
      --extra=--warmup-steps=1                      # logic only (~35 s on 2 cores)

Each run is `python -m megatron_dsv3.train` in a fresh process with `--no-wandb`, its folder
under --runs-dir (bf16/, fp8/; default --out-dir/runs); the summary goes to
--out-dir/fp8_convergence.json and the plot to fp8_convergence.png. `--noise-seed S` adds a
third run, BF16 with --seed S: how far two BF16 runs land apart (the yardstick: on a small
model on the CPU, two BF16 runs on different batches ended 0.9% apart). A failed run stops the script with its last output lines.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_job(name: str, args, fp8: bool, seed: int | None = None) -> list[dict]:
    """One training run (`seed`: args.seed unless given); its metrics.jsonl records."""
    out_dir = args.runs_dir / name
    seed = args.seed if seed is None else seed
    command = [sys.executable, "-m", "megatron_dsv3.train", "--preset", args.preset,
               "--steps", str(args.steps), "--seed", str(seed), "--device", args.device,
               "--no-wandb", "--out-dir", str(out_dir), "--eval-interval", "0",
               "--save-interval", "0", *args.extra]
    if fp8:
        command += ["--fp8", "deepseek", "--fp8-layers", args.fp8_layers]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if done.returncode:
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-15:])
        sys.exit(f"fp8_convergence: the {name} run failed (exit {done.returncode}):\n{tail}")
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()
            if line.strip()]


def summarize(bf16: list[dict], fp8: list[dict], window: int) -> dict:
    """The last-`window` mean losses, their relative distance, tokens/s of each run."""
    if len(bf16) != len(fp8) or len(bf16) < window:
        raise ValueError(f"fp8_convergence: {len(bf16)} BF16 and {len(fp8)} FP8 steps; both "
                         f"need the same number, at least --window={window}")

    def last_mean(records):
        return statistics.fmean(r["loss"] for r in records[-window:])

    def tokens_per_s(records):
        timed = [r["tokens_per_s"] for r in records if r["step"] > 2 and "tokens_per_s" in r]
        return statistics.median(timed) if timed else None

    result = {"steps": len(bf16), "window": window, "bf16_loss": last_mean(bf16),
              "fp8_loss": last_mean(fp8), "bf16_tokens_per_s": tokens_per_s(bf16),
              "fp8_tokens_per_s": tokens_per_s(fp8)}
    result["fp8_relative_to_bf16"] = (result["fp8_loss"] - result["bf16_loss"]) / result[
        "bf16_loss"]
    result["within_0_25_percent"] = abs(result["fp8_relative_to_bf16"]) <= 0.0025
    if result["bf16_tokens_per_s"] and result["fp8_tokens_per_s"]:
        result["fp8_speedup"] = result["fp8_tokens_per_s"] / result["bf16_tokens_per_s"]
    return result


def add_noise_run(summary: dict, other: list[dict], seed: int, window: int) -> dict:
    """summary with the BF16 run of another seed against the first: how far two BF16 runs
    land apart, the yardstick for FP8's distance."""
    loss = statistics.fmean(r["loss"] for r in other[-window:])
    return {**summary, "noise_seed": seed, "bf16_other_seed_loss": loss,
            "bf16_other_seed_relative": (loss - summary["bf16_loss"]) / summary["bf16_loss"]}


def plot(bf16: list[dict], fp8: list[dict], summary: dict, path: Path,
         other: list[dict] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 4.5))
    runs = [(bf16, "BF16"), (fp8, "FP8 (DeepSeek recipe)")]
    if other is not None:
        runs.append((other, f"BF16, seed {summary['noise_seed']}"))
    for records, label in runs:
        axis.plot([r["step"] for r in records], [r["loss"] for r in records], label=label,
                  linewidth=1)
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("train loss")
    title = f"last {summary['window']} steps: FP8 {summary['fp8_relative_to_bf16']:+.3%}"
    if other is not None:
        title += f", BF16 seed {summary['noise_seed']} {summary['bf16_other_seed_relative']:+.3%}"
    axis.set_title(title + " against BF16")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="proxy")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--window", type=int, default=50,
                        help="steps at the end whose mean loss is compared")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--fp8-layers", default="attention,shared_experts,routed_experts,dispatch",
                        help="the FP8 run's --fp8-layers (default: proxy's map, its 10944-wide "
                             "dense FFN in BF16)")
    parser.add_argument("--extra", action="append", default=[],
                        help="one more flag for both runs, e.g. --extra=--grad-accum=2")
    parser.add_argument("--noise-seed", type=int, default=None,
                        help="also a BF16 run with this --seed: how far two BF16 runs land "
                             "apart, next to FP8's distance")
    parser.add_argument("--out-dir", type=Path, default=REPO / "gpu_out" / "fp8_convergence")
    parser.add_argument("--runs-dir", type=Path, default=None,
                        help="the two runs' folders (default: --out-dir/runs)")
    args = parser.parse_args(argv)
    args.runs_dir = args.runs_dir or args.out_dir / "runs"
    if args.window < 1 or args.steps < args.window:
        parser.error(f"--window {args.window} must be between 1 and --steps {args.steps}")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    bf16, fp8 = run_job("bf16", args, fp8=False), run_job("fp8", args, fp8=True)
    summary = summarize(bf16, fp8, args.window)
    other = None
    if args.noise_seed is not None:
        other = run_job(f"bf16_seed{args.noise_seed}", args, fp8=False, seed=args.noise_seed)
        summary = add_noise_run(summary, other, args.noise_seed, args.window)
    plot(bf16, fp8, summary, args.out_dir / "fp8_convergence.png", other)
    (args.out_dir / "fp8_convergence.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
