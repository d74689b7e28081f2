"""The routed experts' weight gradients added into Megatron's fp32 gradient buffer inside the
grouped GEMM (pretrain's --expert-wgrad in-gemm), under Megatron's DistributedDataParallel on
the CPU (tests/helpers/megatron_on_cpu.py):

  * two micro-batches through DDP with the sums on: the buffer's `main_grad` of fc1 and fc2
    equals autograd's gradients of an fp32 copy of the same (bf16) weights, summed over the
    micro-batches, after DDP's finish_grad_sync (nothing added twice, nothing lost); the
    non-expert parameter's gradient still goes through DDP's hook; no bf16 `.grad` left;
  * --expert-wgrad resolution: auto picks it only where it holds, in-gemm where it cannot
    run is a ConfigError naming what fails and the flag to pass.
Fresh random inputs each run.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from helpers.megatron_on_cpu import run_megatron_on_cpu
from megatron_dsv3.config import ConfigError
from megatron_dsv3.pretrain import expert_wgrad_in_gemm

_BODY = '''
from helpers.tolerance import BF16, assert_close
from megatron_dsv3.moe import experts as experts_module
from megatron_dsv3.moe.experts import RoutedExperts, sum_expert_grads_in_gemm

# the grouped_mm experts on the CPU: with the sums on, every backward GEMM is a forward
# _grouped_mm or the sum op's reference path, which run there (test_grouped_wgrad.py)
experts_module.resolve_experts_impl = lambda impl, device: impl
sums_added = []  # each call of the sum op: the sums did run inside the GEMM
add_ = experts_module.grouped_wgrad_add_
experts_module.grouped_wgrad_add_ = lambda *args: (sums_added.append(1), add_(*args))[1]
seed = int(torch.randint(0, 2**31 - 1, ()))
torch.manual_seed(seed)
config = TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=1, bf16=True,
                           params_dtype=torch.bfloat16, use_cpu_initialization=True)
E, D, F = 4, 16, 8  # widths whose bf16 rows are multiples of 16 bytes (_grouped_mm)

class Model(MegatronModule):
    def __init__(self, impl, dtype):
        super().__init__(config)
        self.experts = RoutedExperts(E, D, F, tp_group=None, dtype=dtype, impl=impl)
        self.scale = torch.nn.Parameter(torch.ones(D, dtype=dtype))

    def forward(self, x, counts):
        return self.experts(x * self.scale, counts)

model = Model("grouped_mm", torch.bfloat16)
reference = Model("loop", torch.float32)
reference.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
assert sum_expert_grads_in_gemm(model) == 1
ddp = DDP(config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
ddp.zero_grad_buffer()
for micro in range(2):
    counts = torch.randint(0, 7, (E,))
    counts[micro] = 0  # an expert without rows
    x = torch.randn(int(counts.sum()), D)
    grad_out = torch.randn(x.shape[0], D)
    (ddp(x.to(torch.bfloat16), counts).float() * grad_out).sum().backward()
    (reference(x.to(torch.bfloat16).float(), counts) * grad_out).sum().backward()
ddp.finish_grad_sync()
assert len(sums_added) == 4, (len(sums_added), "fc1 and fc2 of two micro-batches")
for name in ("fc1", "fc2"):
    param = getattr(model.experts, name)
    assert param.grad is None, (seed, name, "a bf16 gradient left for autograd")
    assert param.main_grad.dtype == torch.float32
    assert_close(param.main_grad, getattr(reference.experts, name).grad, BF16,
                 "bf16 activations (h, swiglu)", f"{name} in DDP's buffer (seed {seed})")
assert_close(model.scale.main_grad, reference.scale.grad, BF16, "bf16 activations",
             f"the non-expert parameter through DDP's hook (seed {seed})")
'''


def test_expert_sums_inside_the_gemm_land_in_megatrons_gradient_buffer():
    run_megatron_on_cpu(_BODY)


def _args(**overrides):
    args = dict(expert_wgrad="auto", bf16=True, accumulate_allreduce_grads_in_fp32=True,
                overlap_grad_reduce=False)
    return SimpleNamespace(**{**args, **overrides})


def test_expert_wgrad_resolution_names_what_fails_and_the_flag(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert expert_wgrad_in_gemm(_args())
    assert not expert_wgrad_in_gemm(_args(expert_wgrad="micro-batch"))
    for bad, why in (({"bf16": False}, "no --bf16"),
                     ({"accumulate_allreduce_grads_in_fp32": False}, "accumulated in bf16"),
                     ({"overlap_grad_reduce": True}, "--overlap-grad-reduce")):
        assert not expert_wgrad_in_gemm(_args(**bad)), bad
        with pytest.raises(ConfigError, match=f"--expert-wgrad in-gemm cannot run here: .*{why}"
                                              ".*Pass --expert-wgrad micro-batch"):
            expert_wgrad_in_gemm(_args(expert_wgrad="in-gemm", **bad))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not expert_wgrad_in_gemm(_args())
    with pytest.raises(ConfigError, match="no GPU"):
        expert_wgrad_in_gemm(_args(expert_wgrad="in-gemm"))
