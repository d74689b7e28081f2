#!/usr/bin/env python3
"""Adding bf16 gradients into fp32 sums: PyTorch's add_ against kernels/grad_accumulate.py.

  python benchmarks/bench_grad_accumulate.py            # the proxy preset's parameter shapes
  python benchmarks/bench_grad_accumulate.py --device cpu --repeat 2   # logic check (no kernel)

Per shape: the time of one pass of each (the kernel launched directly, also below the size
where `add_into_fp32_` leaves small tensors to PyTorch) and its bandwidth (2 + 4 bytes read, 4 written per
element), with a plain fp32 copy of the same tensor in the same run as the memory ceiling.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.common import emit_json, resolve_device, result_header, sync  # noqa: E402
from megatron_dsv3.kernels.grad_accumulate import (add_into_fp32_, launch_add_into,  # noqa: E402
                                                   uses_kernel)

# (name, shape): the proxy preset's largest gradients (one MoE layer's experts, the embedding,
# an attention projection)
SHAPES = (("experts fc1 (64 x 2816 x 2048)", (64, 2816, 2048)),
          ("experts fc2 (64 x 2048 x 1408)", (64, 2048, 1408)),
          ("embedding (32768 x 2048)", (32768, 2048)),
          ("q up-projection (3072 x 1536)", (3072, 1536)))


def seconds(fn, repeat: int, device: torch.device) -> float:
    fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync(device)
    return (time.perf_counter() - start) / repeat


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
               "torch_add_s": seconds(lambda: total.add_(grad), args.repeat, device),
               "ours_s": seconds(lambda: launch_add_into(total, grad) if device.type == "cuda"
                                 else add_into_fp32_(total, grad), args.repeat, device),
               "fp32_copy_s": seconds(lambda: copy_dst.copy_(total), args.repeat, device)}
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
    emit_json(results, args.json_out)
    return results


if __name__ == "__main__":
    main()
