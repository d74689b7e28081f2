#!/usr/bin/env python3
"""FP8 (issue 12) on one GPU: the quantizers against a bf16 copy of the same tensor, and the FP8
linear (fp8/linear.py) forward + backward against a bf16 nn.Linear and, where torchao imports
(benchmarks/fp8_gpu.sh carries it), torchao's blockwise FP8 linear, in the same run.

  python benchmarks/bench_fp8.py                                   # H200: DeepSeek-V3 shapes
  python benchmarks/bench_fp8.py --device cpu --tokens 256 --shrink 16 --repeat 1   # logic
  python benchmarks/bench_fp8.py --tune ...     # first every quantizer under each launch config
  (the --tune logic on a CPU: TRITON_INTERPRET=1 ... --device cpu --tokens 128 --shrink 56)

Quantizers, on a [tokens, 7168] bf16 activation and a [7168, 2048] bf16 weight: each fused
kernel's time and bandwidth (2 bytes read, 1 written per element, plus the fp32 scales) against
a bf16 copy of the same tensor (2 read, 2 written), the memory ceiling; the target is 80% of it.
Linear, for each (K, N) of the issue's table at `--tokens` rows: forward + backward of
fp8_linear (three FP8 GEMMs, quantizers included; again with W's blocks computed once, as
inside a training step's weights_fixed(); and on a GPU compiled with CUDA graphs, as a compiled
module runs it) against torch.nn.functional.linear in bf16,
and the forward GEMM alone (fp8_gemm on quantized operands) against the bf16 matmul. The
speedups are the ratios of the two in the same run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.common import (emit_json, mean_seconds, resolve_device,  # noqa: E402
                               result_header)
from megatron_dsv3.fp8.gemm import fp8_gemm, uses_scaled_mm  # noqa: E402
from megatron_dsv3.fp8.linear import fp8_linear  # noqa: E402
from megatron_dsv3.fp8.weight_cache import weights_fixed  # noqa: E402
from megatron_dsv3.kernels.fp8_quantize import (  # noqa: E402
    LAUNCH_CONFIG, launch_quantize_1x128, launch_quantize_128x1, launch_quantize_128x128,
    quantize_1x128_fused, quantize_128x1_fused, quantize_128x128_fused, uses_kernel)

# (K, N) of DeepSeek-V3's linears (the issue's table): y [M, N] = x [M, K] W^T
SHAPES = ((7168, 2048), (2048, 7168), (7168, 18432), (7168, 1536), (1536, 24576))


def quantizer_rows(tokens: int, shrink: int, repeat: int, device: torch.device) -> list[dict]:
    x = torch.randn(tokens, 7168 // shrink, device=device).to(torch.bfloat16)
    w = torch.randn(7168 // shrink, 2048 // shrink, device=device).to(torch.bfloat16)
    rows = []
    # (name, quantizer, input, bytes moved per element besides the scales, scales per element)
    for name, fn, t, bytes_per_element, scales_per_element in (
            ("activation 1x128", quantize_1x128_fused, x, 3, 1 / 128),
            ("activation 128x1 (transposed)", quantize_128x1_fused, x, 3, 1 / 128),
            ("weight 128x128", quantize_128x128_fused, w, 3, 1 / (128 * 128))):
        copy = torch.empty_like(t)
        n = t.numel()
        row = {"quantizer": name, "shape": list(t.shape), "kernel": uses_kernel(t),
               "quantize_s": mean_seconds(lambda: fn(t), repeat, device),
               "bf16_copy_s": mean_seconds(lambda: copy.copy_(t), repeat, device)}
        scales = int(n * scales_per_element) * 4
        row["quantize_tb_s"] = round((bytes_per_element * n + scales) / row["quantize_s"] / 1e12,
                                     3)
        row["bf16_copy_tb_s"] = round(4 * n / row["bf16_copy_s"] / 1e12, 3)
        row["fraction_of_copy"] = round(row["quantize_tb_s"] / row["bf16_copy_tb_s"], 3)
        rows.append(row)
        print(f"{name:32s} {row['quantize_s'] * 1e3:7.3f} ms {row['quantize_tb_s']:.2f} TB/s | "
              f"bf16 copy {row['bf16_copy_tb_s']:.2f} TB/s | {row['fraction_of_copy']:.2f} of it",
              file=sys.stderr)
    return rows


# --tune: the launch parameters tried per kernel (kernels/fp8_quantize.py's LAUNCH_CONFIG)
CANDIDATES = {
    "1x128": [{"BLOCK_M": m, "num_warps": w} for m in (8, 16, 32, 64) for w in (2, 4, 8)],
    "128x1": [{"BLOCK_K": k, "num_warps": w} for k in (16, 32, 64, 128) for w in (2, 4, 8)],
    "128x128": [{"CHUNK": c, "num_warps": w} for c in (16, 32, 64, 128) for w in (4, 8)],
}


def tune_rows(tokens: int, shrink: int, repeat: int, device: torch.device) -> list[dict]:
    """Each kernel under each candidate launch config, on the benchmark's tensors: seconds and
    the fraction of a bf16 copy of the same tensor; the best config of each kernel printed."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # Triton's interpreter
    x = torch.randn(tokens, 7168 // shrink, device=device).to(dtype)
    w = torch.randn(7168 // shrink, 2048 // shrink, device=device).to(dtype)
    launchers = {"1x128": (launch_quantize_1x128, x), "128x1": (launch_quantize_128x1, x),
                 "128x128": (launch_quantize_128x128, w)}
    rows = []
    for kernel, (launch, t) in launchers.items():
        copy = torch.empty_like(t)
        copy_s = mean_seconds(lambda: copy.copy_(t), repeat, device)
        for config in CANDIDATES[kernel]:
            seconds = mean_seconds(lambda: launch(t, config=config), repeat, device)
            rows.append({"kernel": kernel, "config": config, "seconds": seconds,
                         "default": config == LAUNCH_CONFIG[kernel],
                         "bf16_copy_s": copy_s, "copy_over_kernel": round(copy_s / seconds, 3)})
        best = min((r for r in rows if r["kernel"] == kernel), key=lambda r: r["seconds"])
        print(f"tune {kernel:8s} best {best['config']} {best['seconds'] * 1e3:.3f} ms "
              f"(copy {copy_s * 1e3:.3f} ms)", file=sys.stderr, flush=True)
    return rows


def torchao_linear(device: torch.device):
    """torchao 0.18's DeepSeek-style blockwise FP8 linear (cuBLASLt GEMMs), as a function of
    (x, w) like the others, or None where torchao or a Hopper GPU is missing (the issue's
    baseline: carry its wheel, see benchmarks/fp8_gpu.sh)."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (9, 0):
        return None
    try:
        from torchao.prototype.blockwise_fp8_training.linear import fp8_blockwise_mm
    except ImportError:
        return None
    return lambda x, w: fp8_blockwise_mm.apply(x, w, 128, torch.bfloat16, False)


def linear_rows(tokens: int, shrink: int, repeat: int, device: torch.device,
                compiled_rows: bool = True) -> list[dict]:
    from megatron_dsv3.fp8.quantize import quantize_1x128, quantize_128x128

    torchao = torchao_linear(device)
    rows = []
    for k, n in SHAPES:
        k, n = k // shrink, n // shrink
        x = torch.randn(tokens, k, device=device).to(torch.bfloat16).requires_grad_()
        w = (torch.randn(n, k, device=device) * 0.02).to(torch.bfloat16).requires_grad_()
        dy = torch.randn(tokens, n, device=device).to(torch.bfloat16)

        def step(linear):
            x.grad = w.grad = None
            linear(x, w).backward(dy)

        xq, wq = quantize_1x128(x.detach()), quantize_128x128(w.detach())
        row = {"k": k, "n": n, "tokens": tokens, "scaled_mm": uses_scaled_mm(xq, wq),
               "bf16_fwd_bwd_s": mean_seconds(lambda: step(torch.nn.functional.linear), repeat,
                                         device),
               "fp8_fwd_bwd_s": mean_seconds(lambda: step(fp8_linear), repeat, device),
               "bf16_gemm_s": mean_seconds(lambda: x.detach() @ w.detach().t(), repeat, device),
               "fp8_gemm_s": mean_seconds(lambda: fp8_gemm(xq, wq, out_dtype=torch.bfloat16),
                                     repeat, device)}
        row["fwd_bwd_speedup"] = round(row["bf16_fwd_bwd_s"] / row["fp8_fwd_bwd_s"], 3)
        with weights_fixed():  # as in a training step: W's blocks quantized once, then reused
            row["fp8_fwd_bwd_w_fixed_s"] = mean_seconds(lambda: step(fp8_linear), repeat, device)
        row["w_fixed_speedup"] = round(row["bf16_fwd_bwd_s"] / row["fp8_fwd_bwd_w_fixed_s"], 3)
        if device.type == "cuda" and compiled_rows:  # traced from the custom operators,
            # replayed as CUDA graphs
            compiled = torch.compile(lambda x_, w_: fp8_linear(x_, w_), mode="reduce-overhead",
                                     dynamic=False)
            try:
                # compile, the eager warm-up runs and the CUDA-graph recordings untimed: with
                # one untimed call the recordings fell into the mean (2026-12-03: the compiled
                # rows 0.48-1.21x, below the eager ones)
                row["fp8_compiled_fwd_bwd_s"] = mean_seconds(lambda: step(compiled), repeat,
                                                             device, warmup=4)
                row["compiled_speedup"] = round(
                    row["bf16_fwd_bwd_s"] / row["fp8_compiled_fwd_bwd_s"], 3)
            except Exception as err:  # noqa: BLE001  recorded, the other rows still measured
                row["fp8_compiled_error"] = f"{type(err).__name__}: {err}"[:400]
        if torchao is not None:
            row["torchao_fwd_bwd_s"] = mean_seconds(lambda: step(torchao), repeat, device)
            row["torchao_speedup"] = round(row["bf16_fwd_bwd_s"] / row["torchao_fwd_bwd_s"], 3)
        row["gemm_speedup"] = round(row["bf16_gemm_s"] / row["fp8_gemm_s"], 3)
        row["fp8_gemm_tflops"] = round(2 * tokens * k * n / row["fp8_gemm_s"] / 1e12, 1)
        rows.append(row)
        print(f"{k:6d} x {n:6d}: fwd+bwd bf16 {row['bf16_fwd_bwd_s'] * 1e3:7.3f} ms, fp8 "
              f"{row['fp8_fwd_bwd_s'] * 1e3:7.3f} ms x{row['fwd_bwd_speedup']} (W fixed "
              f"x{row['w_fixed_speedup']}, compiled x{row.get('compiled_speedup', '-')}) | GEMM "
              f"x{row['gemm_speedup']} ({row['fp8_gemm_tflops']} TFLOP/s) | torchao "
              f"x{row.get('torchao_speedup', '-')}", file=sys.stderr, flush=True)
    return rows


def profile_linear(k: int, n: int, tokens: int, device: torch.device, calls: int = 5) -> dict:
    """torch.profiler over `calls` eager fp8_linear forward + backward at K x N: the kernels by
    device time (printed), and the device's busy time per call against the wall time per call
    (busy well below wall: the host is the limit, not the kernels)."""
    import time

    from torch.profiler import ProfilerActivity, profile

    x = torch.randn(tokens, k, device=device).to(torch.bfloat16).requires_grad_()
    w = (torch.randn(n, k, device=device) * 0.02).to(torch.bfloat16).requires_grad_()
    dy = torch.randn(tokens, n, device=device).to(torch.bfloat16)

    def step():
        x.grad = w.grad = None
        fp8_linear(x, w).backward(dy)

    for _ in range(3):
        step()
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(calls):
            step()
        torch.cuda.synchronize(device)
        wall = (time.perf_counter() - start) / calls
    averages = prof.key_averages()
    print(averages.table(sort_by="self_device_time_total", row_limit=15), file=sys.stderr)
    busy = sum(e.self_device_time_total for e in averages) / 1e6 / calls
    result = {"k": k, "n": n, "tokens": tokens, "wall_s_per_call": round(wall, 6),
              "device_busy_s_per_call": round(busy, 6),
              "kernels": {e.key[:80]: round(e.self_device_time_total / 1e6 / calls, 6)
                          for e in sorted(averages, key=lambda e: -e.self_device_time_total)
                          if e.self_device_time_total > 0}}
    print(f"profile {k} x {n}: wall {wall * 1e3:.3f} ms per call, device busy "
          f"{busy * 1e3:.3f} ms", file=sys.stderr, flush=True)
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--shrink", type=int, default=1,
                        help="divide every K and N by this (CPU logic checks)")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--json-out", type=Path, default=None)
    parser.add_argument("--tune", action="store_true",
                        help="first time every kernel under each candidate launch config")
    parser.add_argument("--skip-compiled", action="store_true",
                        help="no compiled (CUDA-graph) rows: their compilation is most of the "
                             "script's time on a GPU")
    parser.add_argument("--profile", default=None, metavar="KxN",
                        help="only profile fp8_linear at this shape (GPU), e.g. 2048x7168")
    args = parser.parse_args(argv)
    device = torch.device(resolve_device(args.device))
    results = result_header(device)
    if args.profile:
        if device.type != "cuda":
            parser.error("--profile needs a GPU (--device cuda)")
        try:
            k, n = (int(v) for v in args.profile.lower().split("x"))
        except ValueError:
            parser.error(f"--profile={args.profile!r}: give K x N as e.g. 2048x7168")
        results["profile"] = profile_linear(k, n, args.tokens, device)
        emit_json(results, args.json_out)
        return results
    if args.tune:
        results["tune"] = tune_rows(args.tokens, args.shrink, args.repeat, device)
    results["quantizers"] = quantizer_rows(args.tokens, args.shrink, args.repeat, device)
    results["linears"] = linear_rows(args.tokens, args.shrink, args.repeat, device,
                                     compiled_rows=not args.skip_compiled)
    emit_json(results, args.json_out)
    return results


if __name__ == "__main__":
    main()
