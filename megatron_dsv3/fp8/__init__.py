"""FP8 training (DeepSeek-V3's recipe): E4M3 with fine-grained scales computed from the live
tensor, per 1x128 tile of activations and output gradients, per 128x1 tile of activations
for the weight gradient, per 128x128 block of weights.

  quantize.py   the plain PyTorch quantizers (the references) and Fp8Tensor; the fused kernels
                are kernels/fp8_quantize.py
  gemm.py       GEMMs of K-major FP8 operands, FP32 promotion every 128-element K block (the
                emulation every machine runs)
  linear.py     fp8_linear: y = x W^T with the forward, input- and weight-gradient GEMMs in
                FP8, x and W kept in FP8 for backward; traced by torch.compile from
  ops.py        the quantizers and GEMMs as custom operators (no graph break)
  weight_cache.py  a weight's blocks once per optimizer step (eager cache; persistent
                blocks refreshed per step for compiled layers and CUDA graphs)
  wire.py       rows packed with their scales for the FP8 dispatch all-to-all
  grouped_gemm.py  the routed experts' grouped GEMM: every expert's 128x128-block weights
                (Fp8GroupedTensor) times its rows, the emulation; the kernel is
                kernels/fp8_grouped_gemm.py. Their weight gradient: dy and x in 128x1 tiles
                that restart at every expert's first row (Fp8SegmentTiles), the emulated
                grouped GEMM; the kernels are kernels/fp8_grouped_wgrad.py
"""

from megatron_dsv3.fp8.quantize import (
    FP8_DTYPE,
    FP8_E4M3_MAX,
    MIN_SCALE,
    TILE,
    Fp8Tensor,
    check_quantize_input,
    quantize_1x128,
    quantize_128x1,
    quantize_128x128,
    round_scale_up_to_power_of_two,
)

__all__ = ["FP8_DTYPE", "FP8_E4M3_MAX", "MIN_SCALE", "TILE", "Fp8Tensor", "check_quantize_input",
           "quantize_1x128", "quantize_128x1", "quantize_128x128",
           "round_scale_up_to_power_of_two"]
