"""One tolerance policy and one difference helper for every test.

  * exact (`assert_equal`) wherever both sides run the same operations in the same order;
  * otherwise `assert_close` on the relative error max|a - b| / max|b| (a scale-free number
    that is not fooled by tiny elements), with a bound that the test justifies in `why`:
      FP32_REORDER = 1e-5   fp32, same math, different summation order or fused kernels
      BF16 = 2e-2           bf16 storage (8 mantissa bits)
"""

from __future__ import annotations

import torch

FP32_REORDER = 1e-5
# Hopper's FP8 tensor cores keep about 14 bits while they sum the products of one 128-element K
# block (DeepSeek-V3 report, section 3.3.2), before cuBLASLt's blockwise GEMM promotes the
# block's sum to fp32: 1.6e-4 against the exact-fp32 emulation was measured on an H200; a wrong
# scale or layout is off by O(1)
HOPPER_FP8_ACCUMULATION = 2.0**-11
BF16 = 2e-2


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().double(), expected.detach().double()
    if actual.shape != expected.shape:
        raise AssertionError(f"shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    scale = expected.abs().max().item()
    diff = (actual - expected).abs().max().item() if actual.numel() else 0.0
    return diff / scale if scale > 0 else diff


def assert_close(actual: torch.Tensor, expected: torch.Tensor, bound: float, why: str,
                 name: str = "") -> float:
    """Relative error below `bound`; `why` says where the difference may come from."""
    err = relative_error(actual, expected)
    if not err <= bound:
        raise AssertionError(f"{name}: relative error {err:.3e} exceeds {bound:.1e} ({why})")
    return err


def assert_equal(actual: torch.Tensor, expected: torch.Tensor, name: str = "") -> None:
    if not torch.equal(actual, expected):
        err = relative_error(actual.float(), expected.float())
        raise AssertionError(f"{name}: not bit-identical (relative error {err:.3e})")
