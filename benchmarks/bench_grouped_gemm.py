#!/usr/bin/env python3
"""The routed experts' bf16 grouped GEMM in Triton (kernels/grouped_gemm.py) against
torch._grouped_mm (cutlass on Hopper; what moe/experts.py's grouped_mm runs) on the same
operands, one GPU: the forward and the input-gradient GEMMs, which experts_impl='triton'
swaps (the weight gradient stays torch._grouped_mm's or the in-GEMM sums').

  python benchmarks/bench_grouped_gemm.py                                  # H200
  python benchmarks/bench_grouped_gemm.py --tune --repeat 10   # first each candidate launch
                                                               # config on every problem
  python benchmarks/bench_grouped_gemm.py --device cpu --shrink 16 --repeat 1   # logic check

Problems (E experts x T tokens each, x [E*T, K] -> y [E*T, N], W [E, N, K]):
  64 x 384, 2048 -> 2816     the proxy preset's fc1 (4,096 tokens, top-6 of 64 experts)
  64 x 384, 1408 -> 2048     the proxy preset's fc2
  32 x 1024, 7168 -> 2048    DeepSeek-V3's expert fc1 half on 32 local experts
                             (bench_fp8_grouped.py's second problem)
Tokens per expert are uneven (bench_fp8_grouped.uneven_group_ends: +-50% around T, summing to
E*T), so experts end inside tiles as in training. For each, two GEMMs:
  forward  y  = x_e W_e^T    _grouped_mm(x, W.transpose(-2, -1));  ours: b = the same view
  dgrad    dx = dy_e W_e     _grouped_mm(dy, W);                   ours: b = W as stored
(no transposition in memory: the kernel reads W through its strides). A row gives both
times, TFLOP/s, the speedup (grouped_mm's time / ours) and our relative error against
grouped_mm's result (bf16 rounding of two fp32 sums: ~1e-3, not O(1)). --tune times each
candidate launch config of CANDIDATES on each problem and GEMM (a config the compiler refuses
is reported with its error) and prints the fastest per problem and GEMM with its speedup; set
the best one as kernels/grouped_gemm.py's LAUNCH_CONFIG. JSON on stdout (or --json-out), a
table on stderr. On the CPU the reference runs (no kernel): a check of the script's logic.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.bench_fp8_grouped import relative_error, uneven_group_ends
from benchmarks.common import emit_json, mean_seconds, resolve_device, result_header
from megatron_dsv3.kernels.grouped_gemm import (
    LAUNCH_CONFIG,
    grouped_gemm,
    launch_grouped_gemm,
    uses_kernel,
)

# (name, experts, tokens per expert, K, N)
PROBLEMS = (("proxy fc1", 64, 384, 2048, 2816), ("proxy fc2", 64, 384, 1408, 2048),
            ("V3 fc1 half", 32, 1024, 7168, 2048))

CANDIDATES = ([{"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "num_warps": w, "num_stages": s,
                "SCHEDULE": "experts"}
               for m, n, k in ((64, 128, 64), (128, 128, 64), (64, 256, 64), (128, 256, 64),
                               (128, 128, 32))
               for w in (4, 8) for s in (3, 4)]
              + [{"BLOCK_M": m, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": w,
                  "num_stages": s, "SCHEDULE": "rows"} for m, w, s in ((128, 8, 3), (64, 4, 4))])


def operands(experts: int, tokens: int, k: int, n: int, device: torch.device):
    """ends, and per GEMM (a, b): forward (x, W^T as a view), dgrad (dy, W)."""
    generator = torch.Generator().manual_seed(0)
    ends = uneven_group_ends(experts, tokens, device, generator)
    m = experts * tokens
    x = torch.randn(m, k, generator=generator).to(device, torch.bfloat16)
    w = (torch.randn(experts, n, k, generator=generator) * 0.02).to(device, torch.bfloat16)
    dy = (torch.randn(m, n, generator=generator) * 1e-3).to(device, torch.bfloat16)
    return ends, {"forward": (x, w.transpose(-2, -1)), "dgrad": (dy, w)}


def problem_rows(name: str, experts: int, tokens: int, k: int, n: int, repeat: int,
                 device: torch.device) -> list[dict]:
    ends, gemms = operands(experts, tokens, k, n, device)
    rows = []
    for gemm, (a, b) in gemms.items():
        def grouped_mm():
            return torch._grouped_mm(a, b, offs=ends)

        def ours():
            return grouped_gemm(a, b, ends)

        m, k_in, n_out = a.shape[0], a.shape[1], b.shape[2]
        row = {"problem": f"{name}: {experts}x{tokens} {k}->{n}", "gemm": gemm, "m": m,
               "k": k_in, "n": n_out, "kernel": uses_kernel(a, b),
               "grouped_mm_s": mean_seconds(grouped_mm, repeat, device),
               "triton_s": mean_seconds(ours, repeat, device),
               "rel_err_vs_grouped_mm": round(relative_error(ours(), grouped_mm()), 5)}
        flops = 2 * m * k_in * n_out
        for key in ("grouped_mm", "triton"):
            row[f"{key}_tflops"] = round(flops / row[f"{key}_s"] / 1e12, 1)
        row["speedup"] = round(row["grouped_mm_s"] / row["triton_s"], 3)
        rows.append(row)
        print(f"{row['problem']:34s} {gemm:7s} _grouped_mm {row['grouped_mm_s'] * 1e3:7.3f} ms "
              f"({row['grouped_mm_tflops']} TF/s) | triton {row['triton_s'] * 1e3:7.3f} ms "
              f"({row['triton_tflops']} TF/s) x{row['speedup']} | rel err "
              f"{row['rel_err_vs_grouped_mm']}", file=sys.stderr, flush=True)
    return rows


def tune_rows(name: str, experts: int, tokens: int, k: int, n: int, repeat: int,
              device: torch.device) -> list[dict]:
    """Each candidate launch config on this problem's forward and dgrad (the kernel alone),
    beside torch._grouped_mm on the same operands."""
    ends, gemms = operands(experts, tokens, k, n, device)
    problem = f"{name}: {experts}x{tokens} {k}->{n}"
    rows = []
    for gemm, (a, b) in gemms.items():
        flops = 2 * a.shape[0] * a.shape[1] * b.shape[2]
        baseline = mean_seconds(lambda: torch._grouped_mm(a, b, offs=ends), repeat, device)
        timed = []
        for config in CANDIDATES:
            try:
                seconds = mean_seconds(lambda: launch_grouped_gemm(a, b, ends, config=config),
                                       repeat, device)
            except Exception as error:  # a config the compiler refuses (shared memory)
                rows.append({"problem": problem, "gemm": gemm, "config": config,
                             "error": repr(error)[:200]})
                continue
            timed.append({"problem": problem, "gemm": gemm, "config": config,
                          "seconds": seconds, "default": config == LAUNCH_CONFIG,
                          "tflops": round(flops / seconds / 1e12, 1),
                          "grouped_mm_s": baseline, "speedup": round(baseline / seconds, 3)})
        rows += timed
        if timed:
            best = min(timed, key=lambda r: r["seconds"])
            print(f"tune {problem} {gemm}: best {best['config']} {best['seconds'] * 1e3:.3f} ms "
                  f"({best['tflops']} TF/s) x{best['speedup']} against _grouped_mm "
                  f"{baseline * 1e3:.3f} ms", file=sys.stderr, flush=True)
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--shrink", type=int, default=1,
                        help="divide tokens per expert, K and N by this (CPU logic checks)")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--json-out", type=Path, default=None)
    parser.add_argument("--tune", action="store_true",
                        help="first time the kernel under each candidate launch config")
    args = parser.parse_args(argv)
    device = torch.device(resolve_device(args.device))
    results = result_header(device)
    results["launch_config"] = LAUNCH_CONFIG
    problems = [(name, e, t // args.shrink, k // args.shrink, n // args.shrink)
                for name, e, t, k, n in PROBLEMS]
    if args.tune:
        if device.type != "cuda":
            raise SystemExit("--tune times the Triton kernel: it needs --device cuda")
        results["tune"] = [r for p in problems for r in tune_rows(*p, args.repeat, device)]
    results["gemms"] = [r for p in problems for r in problem_rows(*p, args.repeat, device)]
    emit_json(results, args.json_out)
    return results


if __name__ == "__main__":
    main()
