"""optimizer.py in Megatron's loop: MegatronAdamW built by Megatron's own optimizer builder in
place of its Adam class (megatron_compat.use_megatron_adam), against torch's AdamW on the same
gradients, and pretrain's --adam-moments-dtype.

  * the builder instantiates our class from its FusedAdam keywords; over three steps the bf16
    moments are torch's fp32 ones within bf16 rounding and the parameters follow torch's to a
    fraction of lr; the gradients are left for Megatron to zero; the state loads into torch's
    AdamW;
  * a fresh optimizer's state is whole (one step over every parameter, as Megatron's
    distributed optimizer reads it to load a checkpoint into) and takes a saved one back;
  * which Adam class pretrain installs for which flags;
  * keywords our AdamW cannot honour are refused naming the flag.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from megatron_dsv3.config import ConfigError
from megatron_dsv3.optimizer import MegatronAdamW, MegatronAdamWFP32
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
    init_state_fn(ours)  # Megatron's: fp32 zero moments, which our step turns to bf16
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


def test_the_state_follows_megatrons_swap_of_the_param_groups_for_its_shards():
    """Megatron's DistributedOptimizer (0.19.2, distrib_optimizer.py __init__) constructs the
    Adam over the model's bf16 parameters, then sets `param_groups` to groups of its fp32
    shards and round-trips the state dict; on the GPU that failed with torch's KeyError when
    the state was made at construction (keyed by parameters no longer in any group)."""
    seed = int(torch.randint(0, 2**31 - 1, ()))
    model = [p.detach().bfloat16().requires_grad_() for p in _params(seed)]
    ours = MegatronAdamW(_groups(model), lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    shards = [torch.nn.Parameter(p.detach().float().flatten()[: p.numel() // 2].clone())
              for p in model]
    ours.param_groups = [dict(group, params=[shard])
                         for group, shard in zip(ours.param_groups, shards)]
    ours.load_state_dict(ours.state_dict())
    assert _steps(ours) == {0.0}
    assert {id(p) for p in ours.state} == {id(p) for p in shards}
    for shard in shards:
        shard.grad = torch.ones_like(shard)
    before = [shard.detach().clone() for shard in shards]
    ours.step()
    assert _steps(ours) == {1.0}
    assert all((a < b).all() for a, b in zip(shards, before)), "the shards are what it steps"


def test_a_step_tensor_shared_by_every_state_as_megatron_loads_it_counts_once_per_step():
    """Megatron's distributed optimizer (0.19.2, load_state_dict without TE or apex) puts one
    step tensor into every parameter's state; an in-place increment counted it once per
    parameter, and the resumed run on the GPU left the straight one after its first step."""
    seed = int(torch.randint(0, 2**31 - 1, ()))
    resumed = MegatronAdamW(_groups(_params(seed)), **HYPER, weight_decay=0.1)
    straight = MegatronAdamW(_groups(_params(seed)), **HYPER, weight_decay=0.1)
    g = torch.Generator().manual_seed(seed + 1)
    grads = [[torch.randn(p.shape, generator=g) for p in _params(seed)] for _ in range(5)]

    def step(optimizer, grads_now):
        for group, grad in zip(optimizer.param_groups, grads_now):
            group["params"][0].grad = grad.clone()
        optimizer.step()

    for grads_now in grads[:3]:
        step(straight, grads_now)
    saved = straight.state_dict()
    shared = torch.tensor(3.0)
    for state in saved["state"].values():
        state["step"] = shared
    resumed.load_state_dict(saved)
    with torch.no_grad():
        for a, b in zip(resumed.param_groups, straight.param_groups):
            a["params"][0].copy_(b["params"][0])
    for grads_now in grads[3:]:
        step(straight, grads_now)
        step(resumed, grads_now)
    assert _steps(resumed) == {5.0} and float(shared) == 3.0
    for a, b in zip(resumed.param_groups, straight.param_groups):
        assert torch.equal(a["params"][0], b["params"][0])


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



def _steps(optimizer) -> set:
    """What Megatron's distributed optimizer reads (without TE or apex) from the state dict it
    loads a checkpoint into, asserting exactly one value."""
    return {s["step"].item() for s in optimizer.state_dict()["state"].values()}


@pytest.mark.parametrize("cls, dtype", [(MegatronAdamW, torch.bfloat16),
                                        (MegatronAdamWFP32, torch.float32)])
def test_a_fresh_optimizer_has_the_whole_state_megatron_loads_into(cls, dtype):
    """On the GPU every resume of Megatron's loop failed in its distributed optimizer's
    `assert len(steps) == 1`: torch makes a parameter's state at its first step only."""
    seed = int(torch.randint(0, 2**31 - 1, ()))
    saved = cls(_groups(_params(seed)), lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    assert _steps(saved) == {0.0}
    state = saved.state_dict()["state"]
    assert len(state) == 2 and all(s[k].dtype == dtype and not s[k].any()
                                   for s in state.values() for k in ("exp_avg", "exp_avg_sq"))
    g = torch.Generator().manual_seed(seed)
    for _ in range(2):
        for group in saved.param_groups:
            for p in group["params"]:
                p.grad = torch.randn(p.shape, generator=g)
        saved.step()
    fresh = cls(_groups(_params(seed + 1)), lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95),
                eps=1e-8)
    assert _steps(fresh) == {0.0}
    fresh.load_state_dict(saved.state_dict())
    assert _steps(fresh) == {2.0}
    for a, b in zip(fresh.state.values(), saved.state.values()):
        assert a["exp_avg"].dtype == dtype and torch.equal(a["exp_avg"], b["exp_avg"])
        assert torch.equal(a["exp_avg_sq"], b["exp_avg_sq"]) and a["exp_avg"].any()


@pytest.mark.parametrize("moments, bf16, fused, installed", [
    ("auto", True, True, MegatronAdamW), ("auto", True, False, MegatronAdamW),
    ("float32", True, True, None), ("auto", False, False, MegatronAdamWFP32)])
def test_pretrain_installs_our_adamw_where_megatrons_falls_short(monkeypatch, moments, bf16,
                                                                  fused, installed):
    from megatron_dsv3 import megatron_compat
    from megatron_dsv3.pretrain import use_our_adamw

    chosen = []
    monkeypatch.setattr(megatron_compat, "megatron_has_fused_adam", lambda: fused)
    monkeypatch.setattr(megatron_compat, "use_megatron_adam", chosen.append)
    use_our_adamw(SimpleNamespace(optimizer="adam", adam_moments_dtype=moments, bf16=bf16))
    assert chosen == ([installed] if installed else [])
    use_our_adamw(SimpleNamespace(optimizer="sgd", adam_moments_dtype="float32", bf16=bf16))
    with pytest.raises(ConfigError, match="--adam-moments-dtype bfloat16 is for --optimizer "
                                          "adam .given sgd.: pass --adam-moments-dtype float32"):
        use_our_adamw(SimpleNamespace(optimizer="sgd", adam_moments_dtype="bfloat16", bf16=bf16))
    assert len(chosen) <= 1
