#!/usr/bin/env python3
"""MLA's attention core on one GPU: which SDPA backend, with or without padding the value.

MLA has d_qk = n + r = 192 and d_v = 128. Flash kernels want equal widths (pad v to 192 and
slice the output); cuDNN and memory-efficient kernels take unequal widths. Times forward +
backward of causal attention, bf16, [b, h, s, d], against the plain reference in the same run.

  python benchmarks/bench_attention.py [--seq 4096 --heads 16 --batch 1]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import emit_json  # noqa: E402
from megatron_dsv3.attention.core import reference_attention  # noqa: E402


def bench(fn, q, k, v, reps=20):
    for _ in range(3):
        fn(q, k, v).sum().backward()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn(q, k, v).sum().backward()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--dqk", type=int, default=192)
    parser.add_argument("--dv", type=int, default=128)
    args = parser.parse_args()
    scale = args.dqk ** -0.5
    shape = (args.batch, args.heads, args.seq)
    q = torch.randn(*shape, args.dqk, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(*shape, args.dqk, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(*shape, args.dv, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    # causal fwd+bwd flops: 3 x (2 * b*h * s^2/2 * (dqk + dv))
    flops = 3 * 2 * args.batch * args.heads * args.seq ** 2 / 2 * (args.dqk + args.dv)

    def sdpa(backend, pad):
        def run(q, k, v):
            vv = F.pad(v, (0, args.dqk - args.dv)) if pad else v
            with sdpa_kernel([backend]):
                out = F.scaled_dot_product_attention(q, k, vv, is_causal=True, scale=scale)
            return out[..., :args.dv] if pad else out
        return run

    variants = {
        "flash_padded_v": sdpa(SDPBackend.FLASH_ATTENTION, True),
        "cudnn": sdpa(SDPBackend.CUDNN_ATTENTION, False),
        "cudnn_padded_v": sdpa(SDPBackend.CUDNN_ATTENTION, True),
        "efficient": sdpa(SDPBackend.EFFICIENT_ATTENTION, False),
        "reference": lambda q, k, v: reference_attention(q, k, v, scale),
    }
    with torch.no_grad():
        expected = reference_attention(q, k, v, scale).float()
    results = {}
    for name, fn in variants.items():
        try:
            with torch.no_grad():
                err = ((fn(q, k, v).float() - expected).abs().max() / expected.abs().max()).item()
            ms = bench(fn, q, k, v)
            results[name] = {"ms": round(ms, 3), "tflops": round(flops / ms / 1e9, 1),
                             "rel_err_vs_reference": err}
        except Exception as exc:  # a backend that refuses these shapes
            results[name] = {"error": str(exc).splitlines()[0][:200]}
        print(name, results[name], file=sys.stderr)
    emit_json({"shape": vars(args), "results": results})


if __name__ == "__main__":
    main()
