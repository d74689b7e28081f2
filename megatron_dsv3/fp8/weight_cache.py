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

Code traced by torch.compile cannot use that cache (a compiled graph, and a CUDA graph
recorded from it, would not revisit Python state). For it, the model's FP8 layers keep their
weights' blocks in persistent tensors (`keep_static_blocks`, by model.mark_fp8_linears): W's
128x128 blocks and W^T's, refreshed in place when the outermost `weights_fixed()` block
begins, and marked as static addresses, so a CUDA graph reads this step's blocks without a
copy. `static_blocks(owner, name)` hands them out only inside the block (a module-level flag
that torch.compile guards on: one graph inside, one outside, where each call quantizes); a
stale copy is never used. Price: two bytes per FP8 weight element, held for the whole run.

  keep_static_blocks(layer, "weight", "fp8_blocks", weight_blocks, transposed)   # model.py
  blocks = static_blocks(layer, "fp8_blocks")    # (data, scales, data_T, scales_T) or None
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Hashable, Iterator, Optional, TypeVar

import torch

Quantized = TypeVar("Quantized")

_step_cache: ContextVar[Optional[dict]] = ContextVar("fp8_weight_cache", default=None)

Blocks = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # W's, then W^T's
# (owner, weight attribute, blocks attribute, quantize, transpose) per kept weight
_static: list[tuple[weakref.ref, str, str, Callable, Callable]] = []
_static_fresh = False  # inside the outermost weights_fixed(): the kept blocks are this step's
_depth = 0  # weights_fixed() blocks open (not read by traced code: no guard on it)


@contextmanager
def weights_fixed() -> Iterator[None]:
    """Within: no weight changes (the micro-batches of one optimizer step), so each weight's
    quantization is computed once and reused; the outermost block first refreshes every
    kept weight's static blocks (keep_static_blocks)."""
    global _static_fresh, _depth
    token = _step_cache.set({})
    if _depth == 0:
        _refresh_static_blocks()
        _static_fresh = True
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0:
            _static_fresh = False
        _step_cache.reset(token)


def keep_static_blocks(owner: torch.nn.Module, weight_name: str, blocks_name: str,
                       quantize: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                       transpose: Callable[..., tuple[torch.Tensor, torch.Tensor]]) -> None:
    """`owner.<blocks_name>` will hold quantize(owner.<weight_name>) and its transpose
    (transpose(data, scales)) as persistent tensors, refreshed in place when each outermost
    weights_fixed() block begins (None until the first)."""
    if any(ref() is owner and name == blocks_name for ref, _, name, _, _ in _static):
        return
    _static[:] = [entry for entry in _static if entry[0]() is not None]  # the dead ones out
    _static.append((weakref.ref(owner), weight_name, blocks_name, quantize, transpose))
    setattr(owner, blocks_name, None)


def static_blocks(owner: torch.nn.Module, blocks_name: str) -> Optional[Blocks]:
    """owner's kept blocks (W's data and scales, W^T's) inside a weights_fixed() block, else
    None (the caller quantizes). Traced code reads the flag: torch.compile guards on it."""
    return getattr(owner, blocks_name, None) if _static_fresh else None


def _refresh_static_blocks() -> None:
    """Each kept weight's blocks recomputed from its weight now, written into the tensors the
    last refresh made (their addresses are what CUDA graphs recorded)."""
    for ref, weight_name, blocks_name, quantize, transpose in _static:
        owner = ref()
        if owner is None:
            continue
        with torch.no_grad():
            data, scales = quantize(getattr(owner, weight_name))
            fresh = (data, scales, *transpose(data, scales))
        kept = getattr(owner, blocks_name, None)
        if kept is None or any((k.shape, k.dtype, k.device) != (f.shape, f.dtype, f.device)
                               for k, f in zip(kept, fresh)):
            for t in fresh:  # a CUDA graph reads them where they are: no copy per replay
                torch._dynamo.mark_static_address(t)
            setattr(owner, blocks_name, fresh)
        else:
            for k, f in zip(kept, fresh):
                k.copy_(f)


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
