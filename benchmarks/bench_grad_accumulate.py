#!/usr/bin/env python3
"""Adding bf16 gradients into fp32 sums: PyTorch's add_ against kernels/grad_accumulate.py, and
the routed experts' weight gradient as a bf16 grouped GEMM plus that addition against the
grouped GEMM that adds into the fp32 sum itself (kernels/grouped_wgrad.py).

  python benchmarks/bench_grad_accumulate.py            # the proxy preset's parameter shapes
  python benchmarks/bench_grad_accumulate.py --device cpu --repeat 2   # logic check (no kernel)

Per shape: the time of one pass of each (the kernel launched directly, also below the size
where `add_into_fp32_` leaves small tensors to PyTorch) and its bandwidth (2 + 4 bytes read, 4
written per element), with a plain fp32 copy of the same tensor in the same run as the memory
ceiling. Per expert projection of the proxy preset (64 experts, 4096 tokens x top-6 rows
spread over them at random), one optimizer step of 8 micro-batches each way --expert-wgrad
takes (GPU only): `torch._grouped_mm` dW in bf16 then `add_into_fp32_` per micro-batch,
`grouped_wgrad_add_` per micro-batch, `grouped_wgrad_segments` once over all 8.
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
from megatron_dsv3.kernels.grad_accumulate import (add_into_fp32_, launch_add_into,  # noqa: E402
                                                   uses_kernel)

# (name, shape): the proxy preset's largest gradients (one MoE layer's experts, the embedding,
# an attention projection)
SHAPES = (("experts fc1 (64 x 2816 x 2048)", (64, 2816, 2048)),
          ("experts fc2 (64 x 2048 x 1408)", (64, 2048, 1408)),
          ("embedding (32768 x 2048)", (32768, 2048)),
          ("q up-projection (3072 x 1536)", (3072, 1536)))


# (name, O, I) of the proxy preset's expert projections: dW [64, O, I] = dY^T X per expert
EXPERT_PROJECTIONS = (("fc1 dW (64 x 2816 x 2048)", 2816, 2048),
                      ("fc2 dW (64 x 2048 x 1408)", 2048, 1408))


# (BLOCK_O, BLOCK_I, BLOCK_K, num_warps, num_stages) tried for the kernel
TILE_SWEEP = ((128, 128, 64, 8, 3), (128, 128, 32, 4, 4), (128, 256, 64, 8, 3),
              (256, 128, 64, 8, 3), (128, 256, 32, 8, 4), (64, 128, 64, 4, 4),
              (128, 64, 64, 4, 4))
MICRO_BATCHES = 8  # of an optimizer step, as in bench_train_step.py


def expert_wgrad_row(name: str, out_features: int, in_features: int, repeat: int,
                     device: torch.device) -> dict:
    """One optimizer step's weight gradient of one expert projection, 8 micro-batches, each way
    the job can take (--expert-wgrad): micro-batch (bf16 grouped GEMM, then the fp32 add, per
    micro-batch), in-gemm (the kernel adding into the sum, per micro-batch), step (the kernel
    over the 8 micro-batches' rows as segments, storing the sum once); the tile sweep on step."""
    from megatron_dsv3.kernels.grouped_wgrad import (grouped_wgrad_add_, grouped_wgrad_segments,
                                                     launch_grouped_wgrad)

    experts, rows = 64, 4096 * 6
    gen = torch.Generator().manual_seed(0)
    ends = torch.stack([torch.bincount(torch.randint(0, experts, (rows,), generator=gen),
                                       minlength=experts).cumsum(0)
                        for _ in range(MICRO_BATCHES)]).to(torch.int32).to(device)
    grad_y = torch.randn(MICRO_BATCHES, rows, out_features, device=device).to(torch.bfloat16)
    x = torch.randn(MICRO_BATCHES, rows, in_features, device=device).to(torch.bfloat16)
    total = torch.zeros(experts, out_features, in_features, device=device)

    def micro_batch():
        for m in range(MICRO_BATCHES):
            add_into_fp32_(total, torch._grouped_mm(grad_y[m].t(), x[m], offs=ends[m]),
                           store=m == 0)

    def in_gemm():
        for m in range(MICRO_BATCHES):
            grouped_wgrad_add_(grad_y[m], x[m], ends[m], total)

    def gemm_only():
        for m in range(MICRO_BATCHES):
            torch._grouped_mm(grad_y[m].t(), x[m], offs=ends[m])

    row = {"projection": name, "micro_batches": MICRO_BATCHES,
           "micro_batch_s": mean_seconds(micro_batch, repeat, device),
           "in_gemm_s": mean_seconds(in_gemm, repeat, device),
           "step_s": mean_seconds(lambda: grouped_wgrad_segments(grad_y, x, ends, total,
                                                                 accumulate=False),
                                  repeat, device),
           "grouped_mm_only_s": mean_seconds(gemm_only, repeat, device)}
    flops = 2 * MICRO_BATCHES * rows * out_features * in_features
    for key in ("micro_batch", "in_gemm", "step", "grouped_mm_only"):
        row[f"{key}_tflop_s"] = round(flops / row[f"{key}_s"] / 1e12, 1)
    row["step_speedup"] = round(row["micro_batch_s"] / row["step_s"], 3)
    row["tiles"] = {}
    for block_o, block_i, block_k, warps, stages in TILE_SWEEP:
        key = f"{block_o}x{block_i}x{block_k} w{warps} s{stages}"
        try:
            row["tiles"][key] = mean_seconds(lambda: launch_grouped_wgrad(
                grad_y, x, ends, total, accumulate=False, block_o=block_o, block_i=block_i,
                block_k=block_k, num_warps=warps, num_stages=stages), repeat, device)
        except Exception as error:  # a config the GPU cannot hold (shared memory): skipped
            print(f"{key}: {type(error).__name__}: {error}"[:200], file=sys.stderr)
    best = min(row["tiles"], key=row["tiles"].get)
    print(f"{'':28s} step tiles: " + ", ".join(f"{k} {v * 1e3:.3f} ms" for k, v in
                                               row["tiles"].items()) + f" | best {best}",
          file=sys.stderr)
    print(f"{name:28s} {MICRO_BATCHES} micro-batches: bf16 grouped GEMM + fp32 add "
          f"{row['micro_batch_s'] * 1e3:.3f} ms (GEMMs alone {row['grouped_mm_only_s'] * 1e3:.3f})"
          f" | in-gemm {row['in_gemm_s'] * 1e3:.3f} ms | step {row['step_s'] * 1e3:.3f} ms "
          f"({row['step_tflop_s']} TFLOP/s) x{row['step_speedup']}", file=sys.stderr)
    return row


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args(argv)
    device = torch.device(resolve_device(args.device))
    results = result_header(device)
    rows = []
    for name, shape in SHAPES:
        total = torch.zeros(shape, device=device)
        grad = torch.randn(shape, device=device).to(torch.bfloat16)
        copy_dst = torch.empty_like(total)
        n = total.numel()
        row = {"shape": name, "elements": n, "kernel": uses_kernel(total, grad),
               "torch_add_s": mean_seconds(lambda: total.add_(grad), args.repeat, device),
               "ours_s": mean_seconds(lambda: launch_add_into(total, grad) if device.type == "cuda"
                                 else add_into_fp32_(total, grad), args.repeat, device),
               "fp32_copy_s": mean_seconds(lambda: copy_dst.copy_(total), args.repeat, device)}
        row["torch_add_tb_s"] = round(10 * n / row["torch_add_s"] / 1e12, 3)
        row["ours_tb_s"] = round(10 * n / row["ours_s"] / 1e12, 3)
        row["fp32_copy_tb_s"] = round(8 * n / row["fp32_copy_s"] / 1e12, 3)
        row["speedup"] = round(row["torch_add_s"] / row["ours_s"], 3)
        rows.append(row)
        print(f"{name:34s} torch add_ {row['torch_add_s'] * 1e3:7.3f} ms "
              f"({row['torch_add_tb_s']:.2f} TB/s) | ours {row['ours_s'] * 1e3:7.3f} ms "
              f"({row['ours_tb_s']:.2f} TB/s) x{row['speedup']} | fp32 copy "
              f"{row['fp32_copy_tb_s']:.2f} TB/s", file=sys.stderr)
    results["rows"] = rows
    if device.type == "cuda":
        results["expert_wgrad"] = [expert_wgrad_row(name, out_f, in_f, args.repeat, device)
                                   for name, out_f, in_f in EXPERT_PROJECTIONS]
    emit_json(results, args.json_out)
    return results


if __name__ == "__main__":
    main()
