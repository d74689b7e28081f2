"""benchmarks/kernel_breakdown.py: the categories of kernel names an H200 printed for our
model's step (cuBLAS, cuDNN, torch's grouped GEMM, Inductor, our Triton kernels) and the
busy-time arithmetic on made-up intervals."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location(
    "kernel_breakdown", REPO / "benchmarks" / "kernel_breakdown.py")
kb = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(kb)

# names from the profiler tables of benchmarks/results/train_step_h200_2026-12-03/
H200_NAMES = [
    ("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT", "dense GEMM"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_3", "attention"),
    ("_ZN7cutlass13device_kernelIN2at4cuda6detail25enable_3x_kernel_for_sm9xINS_4gemm6kernel"
     "13GemmUniversalINS5_17GroupProblemShapeIN4cute5tupleIJiiiEEEEE", "grouped GEMM"),
    ("_fp8_grouped_gemm_kernel", "grouped GEMM"),
    ("_grouped_wgrad_kernel", "grouped GEMM"),
    ("_quantize_128x1_segments_kernel", "FP8 quantize / transpose"),
    ("_transpose_bytes_kernel", "FP8 quantize / transpose"),
    ("_adamw_kernel", "optimizer"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<...>", "optimizer"),
    ("_add_into_kernel", "gradient accumulation"),
    ("_cross_entropy_forward_kernel", "cross-entropy"),
    ("triton_poi_fused_cat_mul_silu_silu_backward_split_8", "compiled fused (Inductor)"),
    ("void at::native::(anonymous namespace)::radixSortKVInPlace<...>", "routing / permutation"),
    ("void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda>",
     "copies / memset"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>",
     "eager elementwise / reductions"),
    ("ncclDevKernel_AllGather_RING_LL(ncclDevKernelArgsStorage<4096ul>)", "communication"),
    ("some_new_kernel", kb.OTHER),
]


@pytest.mark.parametrize("name, category", H200_NAMES)
def test_each_kernel_name_lands_in_its_category(name, category):
    assert kb.category_of(name) == category


def test_busy_time_counts_overlapping_streams_once_and_the_rest_is_host_bound():
    kernels = [("nvjet_a", 0.0, 400.0), ("_adamw_kernel", 100.0, 300.0),  # inside the GEMM
               ("nvjet_b", 350.0, 600.0), ("triton_poi_x", 800.0, 900.0)]
    result = kb.breakdown(kernels, wall_s=1e-3)                       # 1,000 us of wall time
    assert result["kernel_ms"] == pytest.approx(0.95)                 # 400 + 200 + 250 + 100
    assert result["gpu_busy_ms"] == pytest.approx(0.7)                # [0, 600) and [800, 900)
    assert result["host_bound_share"] == pytest.approx(0.3)
    dense = result["categories"]["dense GEMM"]
    assert (dense["ms"], dense["count"]) == (pytest.approx(0.65), 2)
    assert dense["share"] == pytest.approx(0.65 / 0.95, abs=1e-4)
    assert list(result["categories"])[0] == "dense GEMM"             # the largest first
    table = kb.format_breakdown(result)
    assert "host-bound share 30.0%" in table and "optimizer" in table


def test_a_cpu_profile_holds_no_gpu_kernels():
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        torch.ones(64, 64) @ torch.ones(64, 64)
    assert kb.kernels_of(prof) == []
