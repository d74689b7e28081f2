"""gradients.clip_gradients: the clipping factor applied by a pass over the gradients, or
inside torch's fused AdamW (its grad_scale), gives the same update; both against the factor
computed by hand. Fresh random gradients each run; the fused kernel runs on the CPU too. AdamW's
eps is 1 here so that its update depends on the gradients' scale (with a tiny eps one step is
nearly scale-free, and a clipping factor left out would go unseen)."""

from __future__ import annotations

import pytest
import torch

from helpers.tolerance import FP32_REORDER, assert_close
from megatron_dsv3.gradients import clip_gradients, scales_inside


def _params(seed: int, scale: float) -> list[torch.nn.Parameter]:
    torch.manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(shape)) for shape in ((64, 32), (32,), (7, 5, 3))]
    for p in params:
        p.grad = torch.randn(p.shape) * scale
    return params


@pytest.mark.parametrize("max_norm,grad_scale", [(1.0, 10.0), (1.0, 1e-3), (0.0, 10.0)],
                         ids=["clipped", "under-the-limit", "no-clipping"])
def test_fused_clipping_inside_adamw_equals_a_pass_over_the_gradients(dist_single, max_norm,
                                                                      grad_scale):
    seed = int(torch.randint(0, 2**31 - 1, ()))
    plain, fused = _params(seed, grad_scale), _params(seed, grad_scale)
    expected_norm = torch.cat([p.grad.flatten() for p in plain]).double().norm()
    factor = min(1.0, max_norm / (expected_norm.item() + 1e-6)) if max_norm > 0 else 1.0
    by_hand = [(p.detach().clone(), p.grad * factor) for p in plain]
    opt_plain = torch.optim.AdamW(plain, lr=0.1, weight_decay=0.1, eps=1.0, fused=False)
    opt_fused = torch.optim.AdamW(fused, lr=0.1, weight_decay=0.1, eps=1.0, fused=True)
    assert scales_inside(opt_fused) and not scales_inside(opt_plain)
    for params, opt in ((plain, opt_plain), (fused, opt_fused)):
        norm = clip_gradients(params, max_norm, dist_single, optimizer=opt)
        assert_close(norm.double(), expected_norm, FP32_REORDER, "fp64-accumulated norm")
        opt.step()
    if max_norm == 0:
        assert opt_fused.grad_scale is None
    reference = [w.clone().requires_grad_() for w, _ in by_hand]
    for w, (_, g) in zip(reference, by_hand):
        w.grad = g
    torch.optim.AdamW(reference, lr=0.1, weight_decay=0.1, eps=1.0, fused=False).step()
    for a, b, ref in zip(plain, fused, reference):
        assert_close(a.detach(), ref.detach(), FP32_REORDER, f"pass over grads (seed {seed})")
        assert_close(b.detach(), ref.detach(), FP32_REORDER, f"inside fused AdamW (seed {seed})")
    assert not torch.equal(plain[0].detach(), by_hand[0][0]), "the step moved the weights"
