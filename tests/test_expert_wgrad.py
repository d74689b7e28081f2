"""The routed experts' weight gradients of several micro-batches in one GEMM
(moe/expert_wgrad.py), against autograd's per-micro-batch gradients summed.

Fresh random inputs each run: 3 micro-batches, 4 experts, random row counts with an expert that
gets no rows in one micro-batch. Tolerance FP32_REORDER: the same fp32 products, summed in one
GEMM over all rows instead of per micro-batch and then added.
"""

from __future__ import annotations

import torch

from helpers.tolerance import FP32_REORDER, assert_close, assert_equal
from megatron_dsv3.moe.expert_wgrad import (ExpertGradMerger, _merged_grouped_mm, _merged_loop,
                                            attach_expert_grad_merger)
from megatron_dsv3.moe.experts import RoutedExperts

EXPERTS, HIDDEN, FFN, MICRO_BATCHES = 4, 16, 8, 3


def _experts(seed: int) -> RoutedExperts:
    torch.manual_seed(seed)
    return RoutedExperts(EXPERTS, HIDDEN, FFN, tp_group=None, dtype=torch.float32, impl="loop",
                         init_std=0.2)


def _micro_batches() -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(x, tokens per expert, output gradient) per micro-batch; expert 2 gets no rows in the
    second."""
    batches = []
    for m in range(MICRO_BATCHES):
        counts = torch.randint(1, 7, (EXPERTS,))
        if m == 1:
            counts[2] = 0
        rows = int(counts.sum())
        batches.append((torch.randn(rows, HIDDEN), counts, torch.randn(rows, HIDDEN)))
    return batches


def test_merged_gradients_equal_the_sum_of_each_micro_batchs_and_input_gradients_are_unchanged():
    seed = int(torch.randint(0, 2**31 - 1, ()))
    reference, merged = _experts(seed), _experts(seed)
    merger = ExpertGradMerger()
    assert attach_expert_grad_merger(merged, merger) == 1
    for x, counts, grad_out in _micro_batches():
        x_ref, x_new = x.clone().requires_grad_(), x.clone().requires_grad_()
        (reference(x_ref, counts) * grad_out).sum().backward()
        out = merged(x_new, counts)
        assert_equal(out, reference(x, counts), "forward")
        (out * grad_out).sum().backward()
        assert_equal(x_new.grad, x_ref.grad, "input gradient (computed at once, as before)")
    assert merged.fc1.grad is None and merged.fc2.grad is None, "no weight gradient before flush"
    assert len(merger) == 2
    merger.flush()
    assert len(merger) == 0
    for name in ("fc1", "fc2"):
        assert_close(getattr(merged, name).grad, getattr(reference, name).grad,
                     FP32_REORDER, f"{name} (seed {seed})")


def test_flush_adds_into_main_grad_when_the_weight_has_one():
    experts = _experts(0)
    merger = ExpertGradMerger()
    attach_expert_grad_merger(experts, merger)
    experts.fc1.main_grad = torch.ones_like(experts.fc1)
    experts.fc2.main_grad = torch.zeros_like(experts.fc2)
    x, counts, grad_out = _micro_batches()[0]
    (experts(x, counts) * grad_out).sum().backward()
    merger.flush()
    reference = _experts(0)
    (reference(x, counts) * grad_out).sum().backward()
    assert experts.fc1.grad is None
    assert_close(experts.fc1.main_grad, reference.fc1.grad + 1, FP32_REORDER, "fc1 main_grad")
    assert_close(experts.fc2.main_grad, reference.fc2.grad, FP32_REORDER, "fc2 main_grad")


def test_copied_operands_survive_their_memory_being_reused():
    """copy_operands (CUDA graphs replay into the same memory): overwriting the tensors handed
    to `add` after the backward leaves the merged gradient as it was; without copies it
    changes (the case the copies exist for)."""
    weight = torch.zeros(EXPERTS, HIDDEN, FFN)
    x, counts, _ = _micro_batches()[0]
    grad_y = torch.randn(x.shape[0], HIDDEN)
    x_in = torch.randn(x.shape[0], FFN)
    expected = _merged_loop([(grad_y, x_in, counts.tolist(), "loop")])
    for copy_operands in (True, False):
        merger = ExpertGradMerger(copy_operands=copy_operands)
        weight.grad = None
        reused_grad_y, reused_x = grad_y.clone(), x_in.clone()
        merger.add(weight, reused_grad_y, reused_x, counts.tolist(), "loop")
        reused_grad_y.fill_(7.0)  # the next replay writes its own values there
        reused_x.fill_(-3.0)
        merger.flush()
        if copy_operands:
            assert_equal(weight.grad, expected, "copied operands")
        else:
            assert not torch.equal(weight.grad, expected)


def test_grouped_mm_flush_interleaves_rows_expert_major_like_the_loop():
    """The device path's reordering (a stable sort of row keys) against per-expert stacking;
    torch._grouped_mm's forward runs on the CPU."""
    items_loop, items_grouped = [], []
    for x, counts, grad_out in _micro_batches():
        items_loop.append((grad_out, x, counts.tolist(), "loop"))
        items_grouped.append((grad_out, x, counts.cumsum(0).to(torch.int32), "grouped_mm"))
    assert_close(_merged_grouped_mm(items_grouped), _merged_loop(items_loop), FP32_REORDER,
                 "dW from grouped_mm over reordered rows")
