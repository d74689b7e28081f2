"""kernels/adamw.py and MasterAdamW (train/master_weights.py) against torch's AdamW.

  * the Triton kernel, run by Triton's interpreter on the CPU (a fresh process), against the
    PyTorch reference of the same update: masters, moments (fp32 and bf16), the bf16 copy, the
    zeroed gradient;
  * MasterAdamW over MasterWeights against torch's AdamW on fp32 copies of the masters, over
    three steps, with and without a gradient scale (clipping inside the step); its state dict
    loads into torch's AdamW and back.
Fresh random inputs each run. Tolerance FP32_REORDER: the same fp32 update, its operations
grouped differently from torch's (torch's AdamW blends the first moment with lerp).
"""

from __future__ import annotations

import textwrap

import pytest
import torch

from helpers.tolerance import FP32_REORDER, assert_close, assert_equal
from helpers.triton_interpreter import assert_ok_in_triton_interpreter
from megatron_dsv3.train.master_weights import MasterAdamW, MasterWeights

_INTERPRETED = textwrap.dedent("""
    import torch
    from megatron_dsv3.kernels.adamw import adamw_reference, launch_adamw
    seed = int(torch.randint(0, 2**31 - 1, ()))
    torch.manual_seed(seed)
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
    cases = ((1000, None, torch.float32), (2048 * 3 + 5, torch.tensor(4.0), torch.float32),
             (0, None, torch.float32), (2048 * 2 + 9, torch.tensor(2.0), torch.bfloat16))
    for n, scale, moments in cases:
        tensors = [torch.randn(n), torch.randn(n), (torch.randn(n) * 0.1).to(moments),
                   (torch.rand(n) * 0.01).to(moments), torch.zeros(n, dtype=torch.bfloat16)]
        copies = [t.clone() for t in tensors]
        for step in (1, 7):
            launch_adamw(*tensors, step=step, grad_scale=scale, **hyper)
            adamw_reference(*copies, step=step, grad_scale=scale, **hyper)
            # fp32 moments: the same fp32 arithmetic. bf16 moments: a moment 1 fp32 ulp away
            # from the reference's may round to the neighbouring bf16 value (2^-8 relative),
            # and the update that uses it moves by as much of lr
            wide = moments == torch.bfloat16
            for name, a, b in zip(("param", "grad", "exp_avg", "exp_avg_sq"), tensors, copies):
                assert a.dtype == b.dtype, name
                err = (a.double() - b.double()).abs()
                bound = 1e-6 * b.double().abs().clamp(min=1.0)
                if wide:
                    bound += b.double().abs() * 2**-7 if name.startswith("exp") else 4e-2 * 2**-7
                assert (err <= bound).all(), (name, moments, err.max().item())
            if wide:  # rounded to nearest (truncation would differ in half the elements)
                for a, b in zip(tensors[2:4], copies[2:4]):
                    assert a.dtype == torch.bfloat16 and a.any(), "moments kept"
                    assert (a != b).double().mean() < 1e-2, "moments rounded to nearest"
            assert not tensors[1].any(), "gradient zeroed"
            # (the bf16 copy is checked against the kernel's own master: a master 1e-7 away
            # from the reference's may round to the neighbouring bf16 value)
            assert torch.equal(tensors[4], tensors[0].to(torch.bfloat16)), "bf16 copy"
            tensors[1].copy_(torch.randn(n)); copies[1].copy_(tensors[1])
    # no bf16 copy, the gradient left as it is (optimizer.KernelAdamW; store_first sums)
    n = 2048 + 3
    tensors = [torch.randn(n), torch.randn(n), (torch.randn(n) * 0.1).to(torch.bfloat16),
               (torch.rand(n) * 0.01).to(torch.bfloat16), None]
    copies = [t.clone() if t is not None else None for t in tensors]
    grad = tensors[1].clone()
    launch_adamw(*tensors, step=2, zero_grad=False, **hyper)
    adamw_reference(*copies, step=2, zero_grad=False, **hyper)
    assert torch.equal(tensors[1], grad) and torch.equal(copies[1], grad), "gradient kept"
    assert ((tensors[0] - copies[0]).abs() <= 1e-6 + 4e-2 * 2**-7).all(), "param"
    print("ok")
""")


def test_kernel_in_triton_interpreter_matches_the_reference():
    assert_ok_in_triton_interpreter(_INTERPRETED)


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(),
                               torch.nn.Linear(32, 8, bias=False)).to(torch.bfloat16)


def _groups(params):
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


@pytest.mark.parametrize("grad_scale", [None, 3.0], ids=["unscaled", "scaled-inside"])
def test_master_adamw_is_torch_adamw_on_the_masters_then_publish_and_zero(grad_scale):
    seed = int(torch.randint(0, 2**31 - 1, ()))
    model = _model(seed)
    masters = MasterWeights(model)
    hyper = {"lr": 1e-2, "betas": (0.9, 0.95), "eps": 1e-8}
    optimizer = MasterAdamW(_groups(masters.params), masters, **hyper)
    fp32 = [m.detach().clone().requires_grad_() for m in masters.params]
    reference = torch.optim.AdamW(_groups(fp32), foreach=False, **hyper)
    for step in range(3):
        x = torch.randn(4, 16).to(torch.bfloat16)
        model(x).float().pow(2).mean().backward()
        for ref, master in zip(fp32, masters.params):
            ref.grad = master.grad.clone() / (grad_scale or 1.0)
        optimizer.grad_scale = None if grad_scale is None else torch.tensor(grad_scale)
        optimizer.step()
        reference.step()
        for i, (master, ref, param) in enumerate(zip(masters.params, fp32, model.parameters())):
            assert_close(master, ref.detach(), FP32_REORDER, "AdamW update",
                         f"seed {seed} step {step} master {i}")
            assert_equal(param.detach(), master.to(torch.bfloat16), f"step {step} param {i}")
            assert not master.grad.any(), "the gradient sum is zeroed by the step"
    assert not torch.equal(masters.params[0], _model(seed)[0].weight.float()), "weights moved"

    # the state is torch's AdamW's: it loads both ways and the next step agrees
    state = optimizer.state_dict()
    loaded = torch.optim.AdamW(_groups([m.detach().clone().requires_grad_()
                                        for m in masters.params]), foreach=False, **hyper)
    loaded.load_state_dict(state)
    back = MasterAdamW(_groups(masters.params), masters, **hyper)
    back.load_state_dict(reference.state_dict())
    for key in ("exp_avg", "exp_avg_sq"):
        for a, b in zip(loaded.state.values(), optimizer.state.values()):
            assert_equal(a[key], b[key], key)
        for a, b in zip(back.state.values(), reference.state.values()):
            assert_close(a[key], b[key], FP32_REORDER, key)
    assert [int(s["step"]) for s in back.state.values()] == [3] * len(masters.params)


def test_bf16_moments_are_torch_adamws_rounded_and_their_state_loads_both_ways():
    """moments_dtype=bf16 (DeepSeek-V3's): over three steps the moments are torch's fp32 AdamW
    moments within bf16 rounding and the masters follow its updates to a fraction of lr; the
    state loads into torch's AdamW (widened to fp32) and back (rounded to bf16)."""
    seed = int(torch.randint(0, 2**31 - 1, ()))
    model = _model(seed)
    masters = MasterWeights(model)
    hyper = {"lr": 1e-2, "betas": (0.9, 0.95), "eps": 1e-8}
    optimizer = MasterAdamW(_groups(masters.params), masters, moments_dtype=torch.bfloat16,
                            **hyper)
    fp32 = [m.detach().clone().requires_grad_() for m in masters.params]
    reference = torch.optim.AdamW(_groups(fp32), foreach=False, **hyper)
    # each step rounds each moment once (at most 2^-9 of its value, 2^-8 with slack) and
    # carries the earlier steps' errors times beta
    bounds = {}
    for step in range(3):
        model(torch.randn(4, 16).to(torch.bfloat16)).float().pow(2).mean().backward()
        for ref, master in zip(fp32, masters.params):
            ref.grad = master.grad.clone()
        optimizer.step()
        reference.step()
        for i, (master, ref) in enumerate(zip(masters.params, fp32)):
            state, ref_state = optimizer.state[master], reference.state[ref]
            for key, beta in (("exp_avg", 0.9), ("exp_avg_sq", 0.95)):
                assert state[key].dtype == torch.bfloat16, key
                ours = state[key].double()
                bound = beta * bounds.get((i, key), 0.0) + ours.abs() * 2**-8
                bounds[i, key] = bound
                err = (ours - ref_state[key].double()).abs()
                assert (err <= bound * 1.01 + 1e-30).all(), (
                    f"seed {seed} step {step} tensor {i} {key}: {(err - bound).max().item()}")
            drift = (master.double() - ref.detach().double()).abs().max().item()
            assert drift <= hyper["lr"] * 0.05 * (step + 1), f"seed {seed} master {i}: {drift}"
    with pytest.raises(ValueError, match="moments_dtype"):
        MasterAdamW(_groups(masters.params), masters, moments_dtype=torch.float16, **hyper)

    loaded = torch.optim.AdamW(_groups([m.detach().clone().requires_grad_()
                                        for m in masters.params]), foreach=False, **hyper)
    loaded.load_state_dict(optimizer.state_dict())
    back = MasterAdamW(_groups(masters.params), masters, moments_dtype=torch.bfloat16, **hyper)
    back.load_state_dict(reference.state_dict())
    for a, b in zip(loaded.state.values(), optimizer.state.values()):
        assert a["exp_avg"].dtype == torch.float32
        assert_equal(a["exp_avg"], b["exp_avg"].float(), "widened exactly")
    for a, b in zip(back.state.values(), reference.state.values()):
        assert_equal(a["exp_avg_sq"], b["exp_avg_sq"].to(torch.bfloat16), "rounded on load")


def test_master_adamw_refuses_parameters_that_are_not_masters():
    masters = MasterWeights(_model(0))
    with pytest.raises(ValueError, match="not masters"):
        MasterAdamW([torch.nn.Parameter(torch.zeros(2))], masters, lr=1e-3)


def test_a_loaded_state_keeps_the_loading_optimizers_implementation():
    """A bf16 run's checkpoint (MasterAdamW: unfused groups) loaded into an fp32 run's fused
    AdamW keeps it fused, and the other way round; the moments and steps are the saved ones."""
    from megatron_dsv3.train.checkpoint import load_optimizer_state

    masters = MasterWeights(_model(3))
    hyper = {"lr": 1e-2, "betas": (0.9, 0.95), "eps": 1e-8}
    bf16_run = MasterAdamW(_groups(masters.params), masters, **hyper)
    _model_forward_backward(masters)
    bf16_run.step()
    fp32_params = [m.detach().clone().requires_grad_() for m in masters.params]
    fp32_run = torch.optim.AdamW(_groups(fp32_params), fused=True, **hyper)
    load_optimizer_state(fp32_run, bf16_run.state_dict())
    assert all(g["fused"] and not g["foreach"] for g in fp32_run.param_groups)
    for a, b in zip(fp32_run.state.values(), bf16_run.state.values()):
        assert_equal(a["exp_avg"], b["exp_avg"], "exp_avg")
    back = MasterAdamW(_groups(masters.params), masters, **hyper)
    load_optimizer_state(back, fp32_run.state_dict())
    assert all(not g["fused"] and not g["foreach"] for g in back.param_groups)
    assert [int(s["step"]) for s in back.state.values()] == [1] * len(masters.params)


def _model_forward_backward(masters: MasterWeights) -> None:
    masters.model(torch.randn(4, 16).to(torch.bfloat16)).float().pow(2).mean().backward()
