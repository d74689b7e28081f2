"""bf16 parameters trained through fp32 master weights (train/master_weights.py), against
fp32 arithmetic written out by hand on the same bf16 gradients.

Tolerance: exact. The hooks add each micro-batch's bf16 gradient into an fp32 buffer, in
micro-batch order, which the reference does with the same additions; the optimizer runs on the
masters exactly as on fp32 copies; publishing rounds fp32 to bf16 as `.to(torch.bfloat16)`.
"""

from __future__ import annotations

import pytest
import torch

from helpers.tolerance import assert_equal
from megatron_dsv3.train.master_weights import MasterWeights

HIDDEN, MICRO_BATCHES = 16, 3


def _model(seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(HIDDEN, 2 * HIDDEN), torch.nn.GELU(),
                                torch.nn.Linear(2 * HIDDEN, HIDDEN, bias=False))
    return model.to(dtype)


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(4, HIDDEN, generator=g).to(torch.bfloat16) for _ in range(MICRO_BATCHES)]


def test_gradients_of_all_micro_batches_are_summed_in_fp32_and_bf16_grads_freed():
    model, reference = _model(), _model()
    masters = MasterWeights(model)
    sums = [torch.zeros(p.shape) for p in reference.parameters()]
    for x in _batches():
        model(x).float().pow(2).mean().backward()
        reference.zero_grad(set_to_none=True)
        reference(x).float().pow(2).mean().backward()
        for total, param in zip(sums, reference.parameters()):
            total += param.grad.float()
    assert all(p.grad is None for p in model.parameters()), "the bf16 gradients must be freed"
    for i, (master, total) in enumerate(zip(masters.params, sums)):
        assert master.dtype == torch.float32
        assert_equal(master.grad, total, f"fp32 sum of parameter {i}")
    # deferred weight gradients (weight_grad.py) add into `main_grad`: the same buffer
    assert model[0].weight.main_grad is masters.params[0].grad


def test_a_step_on_the_masters_is_adamw_in_fp32_and_the_model_gets_its_bf16_rounding():
    model = _model()
    masters = MasterWeights(model)
    optimizer = torch.optim.AdamW(masters.params, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    fp32 = [m.detach().clone().requires_grad_() for m in masters.params]
    reference = torch.optim.AdamW(fp32, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    for step in range(2):
        for x in _batches():
            model(x).float().pow(2).mean().backward()
        for ref, master in zip(fp32, masters.params):
            ref.grad = master.grad.clone()
        optimizer.step()
        reference.step()
        masters.publish()
        masters.zero_grad()
        for i, (master, ref, param) in enumerate(zip(masters.params, fp32, model.parameters())):
            assert_equal(master, ref.detach(), f"step {step} master {i}")
            assert_equal(param.detach(), master.to(torch.bfloat16), f"step {step} param {i}")
            assert master.grad.abs().max() == 0


def test_state_dict_holds_the_fp32_masters_and_loading_it_restores_and_publishes_them():
    model = _model(seed=0)
    model.register_buffer("bias_like", torch.arange(3.0))  # a buffer keeps its fp32 values
    masters = MasterWeights(model)
    with torch.no_grad():
        for master in masters.params:
            master.add_(1e-3)  # masters that the bf16 weights cannot hold exactly
    saved = masters.state_dict()
    assert list(saved) == list(model.state_dict())
    for (name, _), master in zip(model.named_parameters(), masters.params):
        assert saved[name].dtype == torch.float32
        assert_equal(saved[name], master, name)
    other = _model(seed=5)
    other.register_buffer("bias_like", torch.zeros(3))
    restored = MasterWeights(other)
    restored.load_state_dict(saved)
    for a, b, param in zip(restored.params, masters.params, other.parameters()):
        assert_equal(a, b, "master weight")
        assert_equal(param.detach(), b.to(torch.bfloat16), "published parameter")
    assert_equal(other.bias_like, torch.arange(3.0), "buffer")
    with pytest.raises(RuntimeError, match="Missing key"):
        restored.load_state_dict({k: v for k, v in saved.items() if k != "2.weight"})


def test_fp32_weights_become_masters_exactly_and_the_model_their_bf16_rounding():
    model = _model(dtype=torch.float32)
    fp32 = [p.detach().clone() for p in model.parameters()]
    masters = MasterWeights(model)
    for i, (master, value, param) in enumerate(zip(masters.params, fp32, model.parameters())):
        assert_equal(master, value, f"master {i}")
        assert param.dtype == torch.bfloat16
        assert_equal(param.detach(), value.to(torch.bfloat16), f"param {i}")


def test_parallel_attributes_travel_and_an_fp32_model_dtype_is_refused():
    model = _model()
    model[0].weight.expert_parallel = True
    model[0].weight.tensor_model_parallel, model[0].weight.partition_dim = True, 0
    masters = MasterWeights(model)
    assert masters.params[0].expert_parallel and masters.params[0].partition_dim == 0
    assert not hasattr(masters.params[1], "expert_parallel")
    with pytest.raises(ValueError, match="lower precision than the fp32 masters"):
        MasterWeights(torch.nn.Linear(2, 2), dtype=torch.float32)


def test_weights_whose_gradient_is_merged_elsewhere_get_it_in_their_fp32_master():
    """The routed experts with --expert-wgrad step: autograd brings no gradient to their
    weights (the hooks see None); the merger adds the step's into `main_grad`, the master's."""
    from megatron_dsv3.moe.expert_wgrad import ExpertGradMerger
    from megatron_dsv3.moe.experts import RoutedExperts

    def experts():
        torch.manual_seed(3)
        return RoutedExperts(2, HIDDEN, 8, tp_group=None, dtype=torch.float32, impl="loop",
                             init_std=0.2)

    model, reference = experts(), experts()
    masters = MasterWeights(model)
    merger = ExpertGradMerger(len(_batches()), 8)
    reference = reference.to(torch.bfloat16)
    merger.attach(model)
    counts = torch.tensor([3, 5])
    for x in _batches():
        merger.begin_micro_batch()
        x = torch.cat([x, x[:4]])  # 8 rows
        model(x, counts).float().pow(2).mean().backward()
        reference(x, counts).float().pow(2).mean().backward()
    assert all(master.grad.abs().max() == 0 for master in masters.params), "nothing before flush"
    merger.flush()
    for master, param in zip(masters.params, reference.parameters()):
        # the merged GEMM sums the micro-batches inside one bf16 GEMM: within bf16 rounding
        torch.testing.assert_close(master.grad, param.grad.float(), rtol=2e-2, atol=1e-4)


def test_merged_expert_gradients_are_stored_into_sums_that_hold_nothing_of_the_step():
    """store_first with the merger asking `claims_sum`: two steps, no optimizer zeroing the
    sums in between; each step's flush stores the step's gradient (adding it to the previous
    step's would double it), and finish_accumulation keeps it."""
    from megatron_dsv3.moe.expert_wgrad import ExpertGradMerger
    from megatron_dsv3.moe.experts import RoutedExperts

    def experts():
        torch.manual_seed(4)
        return RoutedExperts(2, HIDDEN, 8, tp_group=None, dtype=torch.float32, impl="loop",
                             init_std=0.2)

    model = experts()
    masters = MasterWeights(model, store_first=True)
    merger = ExpertGradMerger(len(_batches()), 8, stores_first=masters.claims_sum)
    merger.attach(model)
    counts = torch.tensor([3, 5])
    for step in range(2):
        reference = experts().to(torch.bfloat16)
        for x in _batches():
            merger.begin_micro_batch()
            x = torch.cat([x, x[:4]])  # 8 rows; the same in both steps: added, step 1 doubles
            model(x, counts).float().pow(2).mean().backward()
            reference(x, counts).float().pow(2).mean().backward()
        merger.flush()
        masters.finish_accumulation()
        for master, param in zip(masters.params, reference.parameters()):
            torch.testing.assert_close(master.grad, param.grad.float(), rtol=2e-2, atol=1e-4)
        masters.sums_consumed()  # what MasterAdamW's step does with store_first


def _steps_with(store_first: bool, idle_step: int):
    """Three MasterAdamW steps of MICRO_BATCHES micro-batches; in step `idle_step` the last
    layer gets no gradient (its input detached from it: only the first layer trains). Returns
    the masters, their sums after each step's accumulation, and the model."""
    from megatron_dsv3.train.master_weights import MasterAdamW

    model = _model()
    masters = MasterWeights(model, store_first=store_first)
    optimizer = MasterAdamW(masters.params, masters, lr=1e-2, betas=(0.9, 0.95),
                            weight_decay=0.1)
    sums = []
    for step in range(3):
        for x in _batches():
            if step == idle_step:
                model[0](x).float().pow(2).mean().backward()
            else:
                model(x).float().pow(2).mean().backward()
        masters.finish_accumulation()
        sums.append([m.grad.clone() for m in masters.params])
        optimizer.step()
    return masters, sums, model


def test_storing_the_first_gradient_of_a_step_gives_the_same_sums_and_steps():
    """store_first: the step's first gradient overwrites the sum (MasterAdamW no longer zeroes
    it), bit for bit the zeroed-then-added sums; a master that got no gradient in a step has a
    zero sum, not the previous step's."""
    for idle_step in (1, 2):
        added, added_sums, added_model = _steps_with(False, idle_step)
        stored, stored_sums, stored_model = _steps_with(True, idle_step)
        for step, (expected, actual) in enumerate(zip(added_sums, stored_sums)):
            for i, (e, a) in enumerate(zip(expected, actual)):
                assert_equal(a, e, f"idle step {idle_step}: step {step} sum {i}")
        assert not added_sums[idle_step][2].any(), "the idle layer's sum is zero"
        for i, (e, a) in enumerate(zip(added.params, stored.params)):
            assert_equal(a, e, f"idle step {idle_step}: master {i} after 3 steps")
        for e, a in zip(added_model.parameters(), stored_model.parameters()):
            assert_equal(a.detach(), e.detach(), "published bf16 weights")
        # what the optimizer left: zeroed sums without store_first, used ones with it
        assert not any(m.grad.any() for m in added.params)
        assert any(m.grad.any() for m in stored.params)
