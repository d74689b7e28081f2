"""optimizer.py in Megatron's loop: MegatronAdamW built by Megatron's own optimizer builder in
place of its Adam class (megatron_compat.use_megatron_adam), against torch's AdamW on the same
gradients, and pretrain's --adam-moments-dtype.

  * the builder instantiates our class from its FusedAdam keywords; over three steps the bf16
    moments are torch's fp32 ones within bf16 rounding and the parameters follow torch's to a
    fraction of lr; Megatron's init_state_fn (fp32 moments) is taken over; the gradients are
    left for Megatron to zero; the state loads into torch's AdamW;
  * keywords our AdamW cannot honour are refused naming the flag.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from megatron_dsv3.optimizer import MegatronAdamW
from megatron_dsv3.pretrain import adam_moments_dtype

HYPER = {"lr": 1e-2, "betas": (0.9, 0.95), "eps": 1e-8}


def _params(seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(32, 16, generator=g)),
            torch.nn.Parameter(torch.randn(32, generator=g))]


def _groups(params):
    return [{"params": [params[0]], "weight_decay": 0.1, "wd_mult": 1.0},
            {"params": [params[1]], "weight_decay": 0.0, "wd_mult": 0.0}]


def test_megatrons_builder_makes_our_adamw_which_follows_torchs(monkeypatch, dist_single):
    from megatron.core import optimizer as megatron_optimizer
    from megatron.core.optimizer import (OptimizerConfig,
                                         _get_megatron_optimizer_based_on_param_groups)

    from megatron_dsv3.megatron_compat import use_megatron_adam

    for name in ("Adam", "USING_PYTORCH_OPTIMIZER"):  # restored after the test
        monkeypatch.setattr(megatron_optimizer, name, getattr(megatron_optimizer, name))
    use_megatron_adam(MegatronAdamW)
    seed = int(torch.randint(0, 2**31 - 1, ()))
    params, ref_params = _params(seed), _params(seed)
    config = OptimizerConfig(optimizer="adam", lr=HYPER["lr"], weight_decay=0.1,
                             adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8)
    ours, init_state_fn = _get_megatron_optimizer_based_on_param_groups(
        config, model_chunks=[], param_groups=_groups(params), skip_megatron_wrapping=True)
    assert type(ours) is MegatronAdamW
    init_state_fn(ours)  # Megatron's: fp32 zeros, which our first step takes over
    assert all(s["exp_avg"].dtype == torch.float32 for s in ours.state.values())
    reference = torch.optim.AdamW(_groups(ref_params), foreach=False, **HYPER)
    g = torch.Generator().manual_seed(seed + 1)
    bounds = {}
    for step in range(3):
        for p, r in zip(params, ref_params):
            p.grad = torch.randn(p.shape, generator=g)
            r.grad = p.grad.clone()
        grads = [p.grad.clone() for p in params]
        ours.step()
        reference.step()
        for i, (p, r) in enumerate(zip(params, ref_params)):
            assert torch.equal(p.grad, grads[i]), "Megatron zeroes the gradients itself"
            state, ref_state = ours.state[p], reference.state[r]
            for key, beta in (("exp_avg", 0.9), ("exp_avg_sq", 0.95)):
                assert state[key].dtype == torch.bfloat16, key
                # each step rounds each moment once (2^-9 of it, 2^-8 with slack) and carries
                # the earlier steps' errors times beta
                bound = beta * bounds.get((i, key), 0.0) + state[key].double().abs() * 2**-8
                bounds[i, key] = bound
                err = (state[key].double() - ref_state[key].double()).abs()
                assert (err <= bound * 1.01 + 1e-30).all(), (seed, step, i, key)
            drift = (p.detach().double() - r.detach().double()).abs().max().item()
            assert drift <= HYPER["lr"] * 0.05 * (step + 1), (seed, step, i, drift)
    loaded = torch.optim.AdamW(_groups(_params(seed)), foreach=False, **HYPER)
    loaded.load_state_dict(ours.state_dict())
    for a, b in zip(loaded.state.values(), ours.state.values()):
        assert a["exp_avg"].dtype == torch.float32
        assert torch.equal(a["exp_avg"], b["exp_avg"].float()) and int(a["step"]) == 3


def test_keywords_our_adamw_cannot_honour_name_the_flag():
    with pytest.raises(ValueError, match="--optimizer-cuda-graph"):
        MegatronAdamW(_params(0), lr=1e-3, weight_decay=0.0, betas=(0.9, 0.95), eps=1e-8,
                      capturable=True)
    with pytest.raises(ValueError, match="--no-decoupled-weight-decay"):
        MegatronAdamW(_params(0), lr=1e-3, weight_decay=0.0, betas=(0.9, 0.95), eps=1e-8,
                      adam_w_mode=False)
    from megatron_dsv3.megatron_compat import use_megatron_adam

    with pytest.raises(TypeError, match="torch.optim.AdamW"):
        use_megatron_adam(torch.optim.SGD)


def test_moments_follow_bf16_training_unless_asked():
    assert adam_moments_dtype(SimpleNamespace(adam_moments_dtype="auto", bf16=True)) == "bfloat16"
    assert adam_moments_dtype(SimpleNamespace(adam_moments_dtype="auto", bf16=False)) == "float32"
    assert adam_moments_dtype(SimpleNamespace(adam_moments_dtype="float32", bf16=True)) == \
        "float32"

