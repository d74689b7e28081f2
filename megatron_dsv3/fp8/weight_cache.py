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
  blocks = quantized_weight(weight, weight_blocks)                       # fp8/linear.py
  blocks = quantized_weight(w, fp8_ops.grouped_weight, dtype)            # moe/experts.py
  step = current_step()                                                  # a forward, then
  blocks_T = for_step(step, weight, transposed_weight_blocks, lambda: ...)   # its backward

Backward runs on autograd's own threads on a GPU, where the block's context variable is not
set: what a backward derives per step (the weight's blocks transposed for the input gradient)
goes through the step its forward saw (`current_step()`, kept on the autograd context).

The price is the FP8 copies' memory during the step, about one byte per weight element.
Code traced by torch.compile does not use the cache (a compiled graph, and a CUDA graph
recorded from it, would not revisit Python state): fp8/linear.py and moe/experts.py quantize
there at each call.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Hashable, Iterator, Optional, TypeVar

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


def current_step() -> Optional[dict]:
    """The cache of the `weights_fixed()` block this code runs in, None outside one."""
    return _step_cache.get()


def for_step(step: Optional[dict], weight: torch.Tensor, key: Hashable,
             compute: Callable[[], Quantized]) -> Quantized:
    """compute(), a value derived from `weight` alone, computed once per `key` within `step`
    (a `current_step()`; None: every call computes)."""
    if step is None:
        with torch.no_grad():
            return compute()
    full_key = (id(weight), key)
    if full_key not in step:
        with torch.no_grad():
            step[full_key] = (weight, compute())  # the weight kept alive: its id stays its own
    return step[full_key][1]


def quantized_weight(weight: torch.Tensor, quantize: Callable[[torch.Tensor], Quantized],
                     dtype: Optional[torch.dtype] = None) -> Quantized:
    """quantize(weight, cast to `dtype` when given); inside `weights_fixed()` computed once
    per weight, `quantize` and `dtype`."""
    return for_step(current_step(), weight, (quantize, dtype),
                    lambda: quantize(weight if dtype is None else weight.to(dtype)))
