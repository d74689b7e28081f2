"""FP8 weights quantized once per optimizer step (fp8/weight_cache.py): inside
`weights_fixed()` a weight's quantization is computed at its first use and reused, per weight,
quantizer and dtype; outside it and in the next block it is computed afresh, so a weight the
optimizer changed between steps is never used stale. Through fp8_linear: the forward of two
micro-batches quantizes the weight once and gives the same outputs as without the cache."""

from __future__ import annotations

import torch

from helpers.tolerance import assert_equal
from megatron_dsv3.fp8.weight_cache import quantized_weight, weights_fixed


def test_a_weight_is_quantized_once_inside_the_block_and_afresh_after_it():
    calls = []

    def quantize(w):
        calls.append(w.dtype)
        return w * 2

    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with weights_fixed():
        first = quantized_weight(a, quantize)
        assert quantized_weight(a, quantize) is first
        quantized_weight(b, quantize)
        quantized_weight(a, quantize, torch.bfloat16)  # another dtype: its own entry
        assert len(calls) == 3
    a.add_(1.0)  # the optimizer's step, between the blocks
    with weights_fixed():
        assert_equal(quantized_weight(a, quantize), a * 2, "the changed weight")
    quantized_weight(a, quantize)
    quantized_weight(a, quantize)
    assert len(calls) == 6, "outside a block every use quantizes"


def test_fp8_linear_quantizes_its_weight_once_per_step(monkeypatch):
    from megatron_dsv3.fp8 import linear

    seen = []
    real = linear.weight_blocks
    monkeypatch.setattr(linear, "weight_blocks",
                        lambda w: seen.append(1) or real(w))
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    weight = torch.randn(256, 128, requires_grad=True)
    xs = [torch.randn(3, 128) for _ in range(2)]
    uncached = [linear.fp8_linear(x, weight) for x in xs]
    assert len(seen) == 2
    with weights_fixed():
        cached = [linear.fp8_linear(x, weight) for x in xs]
    assert len(seen) == 3
    for got, want in zip(cached, uncached):
        assert_equal(got, want, "the same FP8 blocks")


def test_backward_transposes_the_weight_blocks_once_per_step_from_any_thread(monkeypatch):
    """The input gradient's W^T blocks are derived once per step, also when backward runs on
    another thread (autograd's device threads on a GPU do not see the block's context
    variable; a new threading.Thread does not either), with the same gradients as uncached."""
    import threading

    from megatron_dsv3.fp8 import linear

    transposes = []
    real = linear.transposed_weight_blocks
    monkeypatch.setattr(linear, "transposed_weight_blocks",
                        lambda w: transposes.append(1) or real(w))
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    weight = torch.randn(256, 128, requires_grad=True)
    xs = [torch.randn(3, 128, requires_grad=True) for _ in range(2)]

    def grads():
        for x in xs:
            x.grad = None
        weight.grad = None
        with weights_fixed():
            for x in xs:
                y = linear.fp8_linear(x, weight)
                worker = threading.Thread(target=lambda: y.sum().backward())
                worker.start()
                worker.join()
        return [x.grad.clone() for x in xs] + [weight.grad.clone()]

    cached = grads()
    assert len(transposes) == 1, transposes
    with monkeypatch.context() as patch:  # the same without the step's cache
        patch.setattr(linear, "current_step", lambda: None)
        uncached = grads()
    assert len(transposes) == 3
    for got, want in zip(cached, uncached):
        assert_equal(got, want, "the same W^T blocks")
