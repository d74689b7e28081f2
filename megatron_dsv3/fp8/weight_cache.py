"""FP8 weights quantized once per optimizer step instead of once per micro-batch.

Each FP8 GEMM wants its weight in 128x128 blocks, and a step of M micro-batches would quantize
every weight M times (the routed experts of the proxy preset: 4.4B elements, ~13 GB of memory
traffic per micro-batch). Between two optimizer steps no weight changes, so inside
`weights_fixed()` (the training step wraps its micro-batches in it) each weight is quantized
at its first use and the blocks are reused; they are dropped when the block ends. Outside it
every use quantizes afresh.

Why an explicit scope rather than noticing writes: weights are written in ways autograd's
version counter does not see (a Triton kernel's stores, Megatron's optimizer copying into
`param.data` or into the buffer the parameters are views of), and a stale FP8 copy would train
on old weights without a word.

  with weights_fixed():                                                 # train/step.py
      ... micro-batches ...
  blocks = quantized_weight(weight, quantize_128x128_fused)              # fp8/linear.py
  blocks = quantized_weight(w, quantize_128x128_grouped_fused, dtype)    # moe/experts.py

The price is the FP8 copies' memory during the step, about one byte per weight element.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Iterator, Optional, TypeVar

import torch

Quantized = TypeVar("Quantized")

_step_cache: ContextVar[Optional[dict]] = ContextVar("fp8_weight_cache", default=None)


@contextmanager
def weights_fixed() -> Iterator[None]:
    """Within: no weight changes (the micro-batches of one optimizer step), so each weight's
    quantization is computed once and reused."""
    token = _step_cache.set({})
    try:
        yield
    finally:
        _step_cache.reset(token)


def quantized_weight(weight: torch.Tensor, quantize: Callable[[torch.Tensor], Quantized],
                     dtype: Optional[torch.dtype] = None) -> Quantized:
    """quantize(weight, cast to `dtype` when given); inside `weights_fixed()` computed once
    per weight, `quantize` and `dtype`."""
    cache = _step_cache.get()
    key = (id(weight), quantize, dtype)
    if cache is not None and key in cache:
        return cache[key][1]
    with torch.no_grad():
        value = quantize(weight if dtype is None else weight.to(dtype))
    if cache is not None:
        cache[key] = (weight, value)  # the weight kept alive: its id stays its own
    return value
