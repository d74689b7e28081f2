"""Megatron's distributed optimizer with our AdamW, saved and loaded as Megatron's loop does
(torch_dist, the dp_reshardable parameter state), on the CPU: the restored fp32 main weights,
bf16 moments and step equal the saved ones, and so do their fingerprints
(checkpoint/state_fingerprint.py, what pretrain checks after every resume).

Megatron runs on the CPU in a process of its own (tests/helpers/megatron_on_cpu.py).

Found on the GPU first: a resume from Megatron's checkpoint matched the straight run at its
first iteration and left it after; here the restored step was 0 (Megatron copies each tensor
of a parameter's state from the checkpoint's per-parameter state, which holds no step: our
tensor step was overwritten by the fresh optimizer's zero). Fresh random weights each run.
"""

from __future__ import annotations

from helpers.megatron_on_cpu import run_megatron_on_cpu

_BODY = '''
import tempfile

from megatron.core import dist_checkpointing
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron_dsv3.checkpoint.state_fingerprint import (fingerprint,
                                                        fingerprint_differences)
from megatron_dsv3.megatron_compat import torch_optimizers_of, use_megatron_adam
from megatron_dsv3.optimizer import MegatronAdamW

use_megatron_adam(MegatronAdamW)
config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1,
                           bf16=True, params_dtype=torch.bfloat16,
                           use_cpu_initialization=True)

class Model(MegatronModule):
    def __init__(self):
        super().__init__(config)
        self.w = torch.nn.Parameter(torch.randn(16, 8, dtype=torch.bfloat16))
        self.v = torch.nn.Parameter(torch.randn(8, dtype=torch.bfloat16))

    def forward(self, x):
        return (x @ self.w.t()).pow(2).sum() + self.v.sum()

def build():
    model = Model()
    ddp = DDP(config, DistributedDataParallelConfig(use_distributed_optimizer=True,
                                                    grad_reduce_in_fp32=True), model)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-2, bf16=True,
                        use_distributed_optimizer=True,
                        params_dtype=torch.bfloat16), [ddp])
    return model, ddp, optimizer

def states(optimizer):
    return [(p.detach().clone(), {k: torch.as_tensor(v).clone()
                                  for k, v in inner.state[p].items()})
            for inner in torch_optimizers_of(optimizer)
            for group in inner.param_groups for p in group["params"]]

seed = int(torch.randint(0, 2**31 - 1, ()))
torch.manual_seed(seed)
model, ddp, optimizer = build()
for _ in range(3):
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    model(torch.randn(3, 8, dtype=torch.bfloat16)).backward()
    ddp.finish_grad_sync()
    assert optimizer.step()[0]
saved, saved_print = states(optimizer), fingerprint(torch_optimizers_of(optimizer))
meta = {"distrib_optim_sharding_type": "dp_reshardable"}
folder = tempfile.mkdtemp()
model_sd = model.sharded_state_dict()
dist_checkpointing.save({"model": model_sd, "optimizer": optimizer.sharded_state_dict(
    model_sd, is_loading=False, metadata=meta)}, folder)

torch.manual_seed(seed + 1)  # a fresh run: other weights until the load
model2, _, optimizer2 = build()
model2_sd = model2.sharded_state_dict()
loaded = dist_checkpointing.load({"model": model2_sd,
                                  "optimizer": optimizer2.sharded_state_dict(
                                      model2_sd, is_loading=True, metadata=meta)},
                                 folder)
model2.load_state_dict(loaded["model"], strict=False)
optimizer2.load_state_dict(loaded["optimizer"])
restored = states(optimizer2)
assert len(restored) == len(saved) == 2
for i, ((p1, s1), (p2, s2)) in enumerate(zip(saved, restored)):
    assert torch.equal(p1, p2), (seed, i, "main weights")
    assert sorted(s1) == sorted(s2) == ["exp_avg", "exp_avg_sq", "step"], (s1, s2)
    for key in s1:
        assert s1[key].dtype == s2[key].dtype and torch.equal(s1[key], s2[key]), (
            seed, i, key, s1[key], s2[key])
    assert float(s2["step"]) == 3
problems = fingerprint_differences(saved_print,
                                   fingerprint(torch_optimizers_of(optimizer2)))
assert not problems, problems
'''


def test_megatrons_distributed_optimizer_restores_our_adamws_whole_state():
    run_megatron_on_cpu(_BODY)
