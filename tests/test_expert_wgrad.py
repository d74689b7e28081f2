"""The routed experts' weight gradients of several micro-batches in one GEMM
(moe/expert_wgrad.py), against autograd's per-micro-batch gradients summed.

Fresh random inputs each run: 3 micro-batches, 4 experts, random row counts with an expert that
gets no rows in one micro-batch. Tolerance FP32_REORDER: the same fp32 products, summed in one
GEMM over all rows instead of per micro-batch and then added.
"""

from __future__ import annotations

import torch

from helpers.tolerance import FP32_REORDER, assert_close, assert_equal
from megatron_dsv3.moe.expert_wgrad import ExpertGradMerger, attach_expert_grad_merger
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


def test_operands_are_copied_so_that_reused_memory_and_more_micro_batches_change_nothing():
    """The merger copies what `add` is given (CUDA graphs replay into the same memory): the
    tensors overwritten after each backward leave the merged gradient as it was. Ten
    micro-batches of growing row counts: the buffers grow past their first size (3 segments,
    the first micro-batch's rows) and keep what they held."""
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    weight = torch.zeros(EXPERTS, HIDDEN, FFN)
    merger = ExpertGradMerger(micro_batches=3)
    expected = torch.zeros(EXPERTS, HIDDEN, FFN)
    for m in range(10):
        counts = torch.randint(0, 3 + m, (EXPERTS,))
        grad_y, x = torch.randn(int(counts.sum()), HIDDEN), torch.randn(int(counts.sum()), FFN)
        start = 0
        for e, count in enumerate(counts.tolist()):
            expected[e] += grad_y[start:start + count].t() @ x[start:start + count]
            start += count
        merger.add(weight, grad_y, x, counts.tolist())
        grad_y.fill_(7.0)  # the next replay writes its own values there
        x.fill_(-3.0)
    merger.flush()
    assert_close(weight.grad, expected, FP32_REORDER, "merged gradient of 10 micro-batches")


def test_flush_stores_where_the_sum_holds_nothing_of_the_step_yet():
    """`stores_first` (MasterWeights.claims_sum) says True: the flush overwrites the weight's
    fp32 sum (an earlier step's values are not added to); False: it adds."""
    experts = _experts(0)
    for store in (True, False):
        asked = []
        merger = ExpertGradMerger(stores_first=lambda w: asked.append(w) or store)
        attach_expert_grad_merger(experts, merger)
        experts.fc1.main_grad = torch.full_like(experts.fc1, 5.0)
        experts.fc2.main_grad = torch.full_like(experts.fc2, 5.0)
        x, counts, grad_out = _micro_batches()[0]
        (experts(x, counts) * grad_out).sum().backward()
        merger.flush()
        reference = _experts(0)
        (reference(x, counts) * grad_out).sum().backward()
        assert sorted(map(id, asked)) == sorted(map(id, (experts.fc1, experts.fc2)))
        offset = 0.0 if store else 5.0
        for name in ("fc1", "fc2"):
            assert_close(getattr(experts, name).main_grad,
                         getattr(reference, name).grad + offset, FP32_REORDER,
                         f"{name} main_grad, store={store}")
