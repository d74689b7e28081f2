"""Where a profiled step's GPU time goes, by kind of kernel: the question issue 10 asks first
("where does the step lose time against the GEMM ceilings: routing, permutation, grouped GEMMs
of 64 small experts, elementwise, host?"), which torch.profiler's table answers only per kernel
name, with CUDA-graph replays and compiled graphs mixed into the same column.

  category_of(name)           a kernel's category from its name (CATEGORIES, first match)
  breakdown(kernels, wall_s)  [(name, start_us, end_us)] of one step -> per category the GPU
                              milliseconds and kernel count, the GPU's busy time (the union of
                              the kernels' intervals: overlapping streams counted once) and
                              the step's host-bound share (wall time with no kernel running)
  kernels_of(prof)            those triples from a finished torch.profiler.profile
  format_breakdown(result)    the table printed beside the profiler's

The names are those an H200 printed for our model and the peers (cuBLAS's nvjet / cutlass
GEMMs, cuDNN's flash attention, Inductor's triton_{poi,red,per}_ kernels, our own Triton
kernels by their function names, NCCL); tests/test_benchmark_scripts.py holds them.
"""

from __future__ import annotations

import re
from typing import Iterable

from megatron_dsv3.pipeline.trace import interval_union

# (category, pattern) in order: the first pattern found in the kernel name decides
CATEGORIES: tuple[tuple[str, str], ...] = (
    ("communication", r"nccl|all_?to_?all|allreduce|all_reduce|reduce_scatter|all_gather"),
    ("attention", r"flash|fmha|sdpa|attention|_attn"),
    ("FP8 quantize / transpose", r"quantiz|transpose_bytes|_to_fp8|cast_to_fp8"),
    ("grouped GEMM", r"grouped|GroupProblemShape|_grouped_mm|moe_gemm"),
    ("dense GEMM", r"nvjet|gemm|cutlass|xmma|cublas|matmul|scaled_mm"),
    ("optimizer", r"adamw|_adam|multi_tensor|foreach"),
    ("gradient accumulation", r"add_into|accumulate_grad"),
    ("cross-entropy", r"cross_entropy|log_softmax|nll_loss"),
    ("routing / permutation",
     r"sort|radix|topk|scan|cumsum|histc|bincount|index|gather|scatter|nonzero|unique"),
    ("compiled fused (Inductor)", r"^triton_(poi|red|per|tem)_"),
    ("norms", r"rms_?norm|layer_?norm"),
    ("copies / memset", r"memcpy|memset|copy|cat_?array|fill"),
    ("eager elementwise / reductions", r"elementwise|vectorized|reduce_kernel|unrolled"),
)
OTHER = "other"
_COMPILED = [(category, re.compile(pattern, re.IGNORECASE)) for category, pattern in CATEGORIES]


def category_of(name: str) -> str:
    """The first category of CATEGORIES whose pattern occurs in `name`, else OTHER."""
    for category, pattern in _COMPILED:
        if pattern.search(name):
            return category
    return OTHER


def breakdown(kernels: Iterable[tuple[str, float, float]], wall_s: float) -> dict:
    """Per category {"ms", "count", "share"} (share of the summed kernel time), "gpu_busy_ms"
    (the union of the intervals), "kernel_ms" (their sum: above busy when streams overlap),
    "wall_ms" and "host_bound_share" (the wall time with no kernel running; 0 when the
    profiled window is shorter than the kernels' span)."""
    kernels = list(kernels)
    per: dict[str, dict] = {}
    for name, start, end in kernels:
        entry = per.setdefault(category_of(name), {"ms": 0.0, "count": 0})
        entry["ms"] += (end - start) / 1e3
        entry["count"] += 1
    total_ms = sum(e["ms"] for e in per.values())
    for entry in per.values():
        entry["share"] = round(entry["ms"] / total_ms, 4) if total_ms else 0.0
        entry["ms"] = round(entry["ms"], 3)
    busy_ms = interval_union((s, e) for _, s, e in kernels) / 1e3
    wall_ms = wall_s * 1e3
    ordered = dict(sorted(per.items(), key=lambda item: -item[1]["ms"]))
    return {"categories": ordered, "kernel_ms": round(total_ms, 3),
            "gpu_busy_ms": round(busy_ms, 3), "wall_ms": round(wall_ms, 3),
            "host_bound_share": round(max(0.0, 1 - busy_ms / wall_ms), 4) if wall_ms else 0.0}


def kernels_of(prof) -> list[tuple[str, float, float]]:
    """(name, start_us, end_us) of every GPU kernel a torch.profiler run recorded (CUDA-graph
    replays included: CUPTI traces the kernels inside a graph)."""
    from torch.autograd import DeviceType

    return [(e.name, e.time_range.start, e.time_range.end) for e in prof.events()
            if e.device_type == DeviceType.CUDA and e.time_range.end > e.time_range.start]


def format_breakdown(result: dict) -> str:
    lines = [f"{'kernel category':<32} {'ms':>10} {'share':>7} {'kernels':>8}"]
    for category, entry in result["categories"].items():
        lines.append(f"{category:<32} {entry['ms']:>10.3f} {entry['share']:>7.1%} "
                     f"{entry['count']:>8}")
    lines.append(f"kernels {result['kernel_ms']:.1f} ms, GPU busy {result['gpu_busy_ms']:.1f} ms "
                 f"of {result['wall_ms']:.1f} ms wall (host-bound share "
                 f"{result['host_bound_share']:.1%})")
    return "\n".join(lines)
