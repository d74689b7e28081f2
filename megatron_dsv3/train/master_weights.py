"""bf16 model parameters trained through fp32 master weights and fp32 gradients.

DeepSeek-V3's precision map keeps master weights and gradients in FP32 while the GEMMs run in
low precision. With fp32 parameters under bf16 autocast (the job's CPU default) every
micro-batch casts every weight to bf16 and accumulates every gradient in fp32 through
autograd; on one H200 those two cost about a third of the proxy preset's step
(benchmarks/RESULTS.md). Here the model holds bf16 parameters (no casts), and each parameter's
gradient is added into an fp32 buffer as soon as autograd has accumulated it (a
post-accumulate-grad hook; the bf16 `.grad` is freed right away), so a step of many micro-batches
sums their gradients in fp32.

  masters = MasterWeights(model.parameters())
  optimizer = torch.optim.AdamW(masters.params, ...)      # fp32 masters, .grad = the fp32 sums
  ... backward of each micro-batch ...                     # hooks add into masters.params[i].grad
  reduce / clip masters.params' gradients                  # they carry the TP/EP attributes
  optimizer.step(); masters.publish(); masters.zero_grad()  # bf16 copies of the masters

The fp32 gradient of parameter i is also its `main_grad` (Megatron's name), so layers that
defer their weight gradient (weight_grad.py) add into it directly.
"""

from __future__ import annotations

from typing import Iterable

import torch

# Megatron's parameter attributes that say how a tensor is split (parallel.py, gradients.py read
# them): the master copy carries them too.
_PARALLEL_ATTRIBUTES = ("tensor_model_parallel", "partition_dim", "partition_stride",
                        "expert_parallel", "allreduce")


class MasterWeights:
    """fp32 master copies and fp32 gradient sums of low-precision model parameters."""

    def __init__(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        self.model_params = [p for p in parameters if p.requires_grad]
        fp32 = [p for p in self.model_params if p.dtype == torch.float32]
        if fp32:
            raise ValueError(f"MasterWeights is for low-precision parameters, but {len(fp32)} "
                             "are fp32 already: train those directly")
        self.params: list[torch.Tensor] = []
        self._hooks = []
        for param in self.model_params:
            master = param.detach().float().clone()
            master.grad = torch.zeros_like(master)
            for name in _PARALLEL_ATTRIBUTES:
                if hasattr(param, name):
                    setattr(master, name, getattr(param, name))
            param.main_grad = master.grad
            self._hooks.append(param.register_post_accumulate_grad_hook(
                _add_into(master.grad)))
            self.params.append(master)

    @torch.no_grad()
    def publish(self) -> None:
        """The model's parameters become the (rounded) master weights, after an optimizer step
        or after loading masters from a checkpoint."""
        torch._foreach_copy_(self.model_params, self.params)

    @torch.no_grad()
    def zero_grad(self) -> None:
        torch._foreach_zero_([m.grad for m in self.params])

    def state_dict(self) -> dict:
        return {"masters": [m.detach().clone() for m in self.params]}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        saved = state["masters"]
        if len(saved) != len(self.params):
            raise ValueError(f"checkpoint has {len(saved)} master weights, the model "
                             f"{len(self.params)}: was it written by another model config?")
        for master, value in zip(self.params, saved):
            if master.shape != value.shape:
                raise ValueError(f"master weight of shape {tuple(value.shape)} in the checkpoint, "
                                 f"{tuple(master.shape)} in the model")
            master.copy_(value)
        self.publish()

    def remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []


def _add_into(buffer: torch.Tensor):
    def hook(param: torch.Tensor) -> None:
        buffer.add_(param.grad)
        param.grad = None
    return hook
