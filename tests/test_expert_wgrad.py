"""The routed experts' weight gradients of several micro-batches in one GEMM
(moe/expert_wgrad.py), against autograd's per-micro-batch gradients summed.

Fresh random inputs each run: 3 micro-batches, 4 experts, random row counts with an expert that
gets no rows in one micro-batch. Tolerance FP32_REORDER: the same fp32 products, summed in one
GEMM over all rows instead of per micro-batch and then added.
"""

from __future__ import annotations

import pytest
import torch

from helpers.tolerance import FP32_REORDER, assert_close, assert_equal
from megatron_dsv3.moe.expert_wgrad import ExpertGradMerger
from megatron_dsv3.moe.experts import RoutedExperts

EXPERTS, HIDDEN, FFN, MICRO_BATCHES = 4, 16, 8, 3
ROWS = EXPERTS * 6  # the most rows _micro_batches gives a micro-batch


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


def _merger(micro_batches: int = MICRO_BATCHES, **kwargs) -> ExpertGradMerger:
    return ExpertGradMerger(micro_batches, ROWS, dtype=torch.float32, **kwargs)


def test_merged_gradients_equal_the_sum_of_each_micro_batchs_and_input_gradients_are_unchanged():
    """Also: the operands are copied (under CUDA graphs the next replay overwrites the memory
    they came in): the tensors overwritten after each backward change nothing."""
    seed = int(torch.randint(0, 2**31 - 1, ()))
    reference, merged = _experts(seed), _experts(seed)
    merger = _merger()
    assert merger.attach(merged) == 1
    for x, counts, grad_out in _micro_batches():
        x_ref, x_new = x.clone().requires_grad_(), x.clone().requires_grad_()
        (reference(x_ref, counts) * grad_out).sum().backward()
        merger.begin_micro_batch()
        out = merged(x_new, counts)
        assert_equal(out, reference(x, counts), "forward")
        (out * grad_out).sum().backward()
        assert_equal(x_new.grad, x_ref.grad, "input gradient (computed at once, as before)")
        for reused in (x_new, x_new.grad, grad_out, out):
            reused.detach().fill_(7.0)  # the next replay writes its own values there
    assert merged.fc1.grad is None and merged.fc2.grad is None, "no weight gradient before flush"
    assert merger.count == MICRO_BATCHES
    merger.flush()
    assert merger.count == 0
    for name in ("fc1", "fc2"):
        assert_close(getattr(merged, name).grad, getattr(reference, name).grad,
                     FP32_REORDER, f"{name} (seed {seed})")


def test_flush_adds_into_main_grad_or_stores_where_the_sum_holds_nothing_of_the_step():
    """Without `stores_first`, or where it says False, the flush adds into the fp32
    `main_grad`; where it says True (MasterWeights.claims_sum) it overwrites it."""
    for store in (None, True, False):
        experts = _experts(0)
        asked = []
        merger = _merger(stores_first=None if store is None
                         else lambda w: asked.append(w) or store)
        merger.attach(experts)
        experts.fc1.main_grad = torch.full_like(experts.fc1, 5.0)
        experts.fc2.main_grad = torch.full_like(experts.fc2, 5.0)
        x, counts, grad_out = _micro_batches()[0]
        merger.begin_micro_batch()
        (experts(x, counts) * grad_out).sum().backward()
        merger.flush()
        reference = _experts(0)
        (reference(x, counts) * grad_out).sum().backward()
        assert experts.fc1.grad is None
        if store is not None:
            assert sorted(map(id, asked)) == sorted(map(id, (experts.fc1, experts.fc2)))
        offset = 0.0 if store else 5.0
        for name in ("fc1", "fc2"):
            assert_close(getattr(experts, name).main_grad,
                         getattr(reference, name).grad + offset, FP32_REORDER,
                         f"{name} main_grad, store={store}")


def test_more_micro_batches_or_rows_than_the_buffers_hold_are_refused():
    experts = _experts(0)
    merger = _merger(micro_batches=1)
    merger.attach(experts)
    merger.begin_micro_batch()
    with pytest.raises(RuntimeError, match="holds 1 micro-batches and was not flushed"):
        merger.begin_micro_batch()
    merger.flush()
    merger.begin_micro_batch()
    x = torch.randn(ROWS + 1, HIDDEN, requires_grad=True)
    with pytest.raises(ValueError, match=f"brought {ROWS + 1} expert rows, its buffers hold "
                                         f"{ROWS}"):
        experts(x, torch.tensor([ROWS + 1, 0, 0, 0]))
    with pytest.raises(ValueError, match="micro_batches=0"):
        ExpertGradMerger(0, ROWS)


def test_compiled_experts_stash_the_same_operands_as_eager(monkeypatch):
    """Under torch.compile (AOT autograd, the graphs inductor would get; fullgraph, so no graph
    break around the experts) the backward's copies into the buffers happen at the slot the
    step set, exactly as in eager: the merged gradients are equal."""
    from megatron_dsv3.moe import experts as experts_mod

    monkeypatch.setattr(experts_mod, "resolve_experts_impl", lambda impl, device: impl)
    monkeypatch.setenv("TORCHDYNAMO_DISABLE", "0")  # the suite turns dynamo off
    seed = int(torch.randint(0, 2**31 - 1, ()))

    def merged_grads(compiled: bool) -> list[torch.Tensor]:
        torch.manual_seed(seed)
        module = RoutedExperts(EXPERTS, HIDDEN, FFN, tp_group=None, dtype=torch.bfloat16,
                               impl="grouped_mm", init_std=0.2)
        merger = ExpertGradMerger(2, 16)
        merger.attach(module)
        run = torch.compile(module, backend="aot_eager", fullgraph=True) if compiled else module
        gen = torch.Generator().manual_seed(seed)
        for counts in (torch.tensor([3, 0, 5, 8]), torch.tensor([1, 7, 0, 8])):
            merger.begin_micro_batch()
            x = torch.randn(16, HIDDEN, generator=gen).to(torch.bfloat16)
            run(x, counts).float().pow(2).sum().backward()
        merger.flush()
        return [module.fc1.grad, module.fc2.grad]

    eager = merged_grads(False)
    torch._dynamo.reset()
    compiled = merged_grads(True)
    torch._dynamo.reset()
    for name, a, b in zip(("fc1", "fc2"), compiled, eager):
        assert b.abs().max() > 0
        assert torch.equal(a, b), f"{name} (seed {seed})"
