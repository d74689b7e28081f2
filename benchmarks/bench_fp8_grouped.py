#!/usr/bin/env python3
"""The routed experts' grouped FP8 GEMM (kernels/fp8_grouped_gemm.py) against bf16
torch._grouped_mm (what moe/experts.py runs) on the same problem, one GPU.

  python benchmarks/bench_fp8_grouped.py                                   # H200
  python benchmarks/bench_fp8_grouped.py --device cpu --shrink 16 --repeat 1   # logic check
  python benchmarks/bench_fp8_grouped.py --tune ...    # first the forward and the weight-
                                                       # gradient kernels under each candidate
                                                       # launch config

Problems (E experts x T tokens each, x [E*T, K] -> y [E*T, N], W [E, N, K]):
  64 x 384, 2048 -> 1408     (DeepSeek-V3-Lite-like expert FFN: fc2's K, fc1's half N)
  32 x 1024, 7168 -> 2048    (DeepSeek-V3's expert fc1 half on 32 local experts)
Tokens per expert are uneven (drawn around T, summing to E*T), so tiles straddle expert
boundaries as they do in training. For each, three GEMMs:
  forward  y  = x_e W_e^T     bf16: _grouped_mm(x, W^T);  fp8: a = x in 1x128, b = W
  dgrad    dx = dy_e W_e      bf16: _grouped_mm(dy, W);   fp8: a = dy in 1x128,
                                                           b = W's blocks transposed
                                                           (kernels/fp8_transpose.py)
  wgrad    dW_e = dy_e^T x_e  bf16: _grouped_mm(dy^T, x);  fp8: dy and x in segment-aligned
                              128x1 tiles (kernels/fp8_grouped_wgrad.py), dW [E, N, K] in bf16
and for FP8 two times: the GEMM alone on operands quantized beforehand, and with the
quantizers included (forward: x in 1x128 and W in 128x128 per expert; dgrad: dy in 1x128 and
W's blocks transposed, W quantized in the forward; wgrad: dy and x, each in segment-aligned
128x1 tiles). Each row also gives the FP8 result's relative error against the bf16 one
(E4M3's rounding: a few percent, not O(1)). For wgrad, "m", "k", "n" of a row are dW's rows
(N), the contraction (the tokens) and dW's columns (K).
On the CPU the emulation runs (no kernel): a check of the script's logic, not of speed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.common import emit_json, mean_seconds, resolve_device, result_header
from megatron_dsv3.kernels.fp8_grouped_gemm import (
    LAUNCH_CONFIG,
    fp8_grouped_gemm,
    launch_fp8_grouped_gemm,
    quantize_128x128_grouped_fused,
    uses_grouped_gemm_kernel,
)
from megatron_dsv3.kernels.fp8_grouped_wgrad import LAUNCH_CONFIG as WGRAD_LAUNCH_CONFIG
from megatron_dsv3.kernels.fp8_grouped_wgrad import (
    fp8_grouped_wgrad,
    quantize_128x1_segments_fused,
    uses_wgrad_kernel,
)
from megatron_dsv3.kernels.fp8_quantize import quantize_1x128_fused
from megatron_dsv3.kernels.fp8_transpose import transposed_blocks_grouped_fused

# (experts, tokens per expert, K, N)
PROBLEMS = ((64, 384, 2048, 1408), (32, 1024, 7168, 2048))

CANDIDATES = [{"BLOCK_M": m, "BLOCK_N": n, "num_warps": w, "num_stages": s, "SCHEDULE": order}
              for (m, n), orders in (((128, 128), ("rows", "experts")),
                                     ((64, 128), ("rows", "experts")),
                                     ((128, 64), ("rows",)), ((128, 256), ("rows",)))
              for order in orders for w in (4, 8) for s in (3, 4)]


def uneven_group_ends(experts: int, tokens: int, device: torch.device,
                      generator: torch.Generator) -> torch.Tensor:
    """int32 end rows of `experts` groups of about `tokens` rows each (+-50%), summing to
    experts * tokens."""
    weights = 0.5 + torch.rand(experts, generator=generator)
    counts = (weights / weights.sum() * experts * tokens).floor().long()
    counts[-1] += experts * tokens - counts.sum()
    return counts.cumsum(0).to(torch.int32).to(device)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).abs().max()
            / expected.float().abs().max()).item()


def problem_rows(experts: int, tokens: int, k: int, n: int, repeat: int,
                 device: torch.device) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    m = experts * tokens
    ends = uneven_group_ends(experts, tokens, device, generator)
    x = torch.randn(m, k, generator=generator).to(device, torch.bfloat16)
    w = (torch.randn(experts, n, k, generator=generator) * 0.02).to(device, torch.bfloat16)
    dy = (torch.randn(m, n, generator=generator) * 1e-3).to(device, torch.bfloat16)
    wq = quantize_128x128_grouped_fused(w)
    rows = []
    for gemm in ("forward", "dgrad", "wgrad"):
        gemm_fp8, uses_kernel = fp8_grouped_gemm, uses_grouped_gemm_kernel
        if gemm == "forward":
            k_in, n_out = k, n
            def bf16():
                return torch._grouped_mm(x, w.transpose(-2, -1), offs=ends)
            def quantize():
                return quantize_1x128_fused(x), quantize_128x128_grouped_fused(w)
        elif gemm == "dgrad":
            k_in, n_out = n, k
            def bf16():
                return torch._grouped_mm(dy, w, offs=ends)
            def quantize():
                return quantize_1x128_fused(dy), transposed_blocks_grouped_fused(wq)
        else:  # dW [E, n, k]: rows n, contraction over the m tokens, columns k
            k_in, n_out = m, k
            gemm_fp8, uses_kernel = fp8_grouped_wgrad, uses_wgrad_kernel
            def bf16():
                return torch._grouped_mm(dy.t(), x, offs=ends)
            def quantize():
                return (quantize_128x1_segments_fused(dy, ends),
                        quantize_128x1_segments_fused(x, ends))
        a, b = quantize()

        def fp8_gemm_only():
            return gemm_fp8(a, b, ends, torch.bfloat16)

        def fp8_with_quantizers():
            return gemm_fp8(*quantize(), ends, torch.bfloat16)

        row = {"problem": f"{experts}x{tokens} {k}->{n}", "gemm": gemm,
               "m": n if gemm == "wgrad" else m, "k": k_in, "n": n_out,
               "kernel": uses_kernel(a, b),
               "bf16_s": mean_seconds(bf16, repeat, device),
               "fp8_gemm_s": mean_seconds(fp8_gemm_only, repeat, device),
               "fp8_with_quantizers_s": mean_seconds(fp8_with_quantizers, repeat, device),
               "fp8_rel_err_vs_bf16": round(relative_error(fp8_gemm_only(), bf16()), 5)}
        flops = 2 * row["m"] * k_in * n_out
        for key in ("bf16", "fp8_gemm", "fp8_with_quantizers"):
            row[f"{key}_tflops"] = round(flops / row[f"{key}_s"] / 1e12, 1)
        row["gemm_speedup"] = round(row["bf16_s"] / row["fp8_gemm_s"], 3)
        row["with_quantizers_speedup"] = round(row["bf16_s"] / row["fp8_with_quantizers_s"], 3)
        rows.append(row)
        print(f"{row['problem']:24s} {gemm:7s} bf16 {row['bf16_s'] * 1e3:7.3f} ms "
              f"({row['bf16_tflops']} TF/s) | fp8 GEMM {row['fp8_gemm_s'] * 1e3:7.3f} ms "
              f"x{row['gemm_speedup']} ({row['fp8_gemm_tflops']} TF/s) | with quantizers "
              f"{row['fp8_with_quantizers_s'] * 1e3:7.3f} ms x{row['with_quantizers_speedup']}"
              f" | rel err {row['fp8_rel_err_vs_bf16']}", file=sys.stderr, flush=True)
    return rows


WGRAD_CANDIDATES = [{"BLOCK_O": o, "BLOCK_I": i, "BLOCK_E": 128, "num_warps": w,
                     "num_stages": s}
                    for o, i in ((64, 128), (128, 128), (64, 64), (128, 64))
                    for w in (4, 8) for s in (2, 3, 4)]


def sweep(name: str, problem: str, flops: int, candidates: list[dict], default: dict,
          launch, repeat: int, device: torch.device) -> list[dict]:
    """launch(config) timed under each candidate launch config; the fastest printed."""
    rows = []
    for config in candidates:
        try:
            seconds = mean_seconds(lambda: launch(config), repeat, device)
        except Exception as error:  # a config the compiler refuses (shared memory): reported
            rows.append({"gemm": name, "config": config, "error": repr(error)[:200]})
            continue
        rows.append({"problem": problem, "gemm": name, "config": config, "seconds": seconds,
                     "default": config == default,
                     "tflops": round(flops / seconds / 1e12, 1)})
    timed = [r for r in rows if "seconds" in r]
    if timed:
        best = min(timed, key=lambda r: r["seconds"])
        print(f"tune {name} {problem}: best {best['config']} {best['seconds'] * 1e3:.3f} ms "
              f"({best['tflops']} TF/s)", file=sys.stderr, flush=True)
    return rows


def tune_rows(experts: int, tokens: int, k: int, n: int, repeat: int,
              device: torch.device) -> list[dict]:
    """The forward GEMM and the weight-gradient GEMM (stored in bf16) under each candidate
    launch config, each kernel alone on operands quantized beforehand."""
    from megatron_dsv3.kernels.fp8_grouped_wgrad import launch_fp8_grouped_wgrad

    generator = torch.Generator().manual_seed(0)
    ends = uneven_group_ends(experts, tokens, device, generator)
    x = torch.randn(experts * tokens, k, generator=generator).to(device, torch.bfloat16)
    w = (torch.randn(experts, n, k, generator=generator) * 0.02).to(device, torch.bfloat16)
    dy = (torch.randn(experts * tokens, n, generator=generator) * 1e-3).to(device,
                                                                          torch.bfloat16)
    a, b = quantize_1x128_fused(x), quantize_128x128_grouped_fused(w)
    dy_q, x_q = quantize_128x1_segments_fused(dy, ends), quantize_128x1_segments_fused(x, ends)
    problem, flops = f"{experts}x{tokens} {k}->{n}", 2 * experts * tokens * k * n
    return (sweep("forward", problem, flops, CANDIDATES, LAUNCH_CONFIG,
                  lambda config: launch_fp8_grouped_gemm(a, b, ends, torch.bfloat16,
                                                         config=config), repeat, device)
            + sweep("wgrad", problem, flops, WGRAD_CANDIDATES, WGRAD_LAUNCH_CONFIG["wgrad"],
                    lambda config: launch_fp8_grouped_wgrad(dy_q, x_q, ends, torch.bfloat16,
                                                            config=config), repeat, device))


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
    results["wgrad_launch_config"] = WGRAD_LAUNCH_CONFIG
    problems = [(e, t // args.shrink, k // args.shrink, n // args.shrink)
                for e, t, k, n in PROBLEMS]
    if args.tune:
        results["tune"] = [r for p in problems for r in tune_rows(*p, args.repeat, device)]
    results["gemms"] = [r for p in problems for r in problem_rows(*p, args.repeat, device)]
    emit_json(results, args.json_out)
    return results


if __name__ == "__main__":
    main()
