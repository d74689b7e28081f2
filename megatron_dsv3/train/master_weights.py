"""Low-precision model parameters trained through fp32 master weights and fp32 gradient sums.

DeepSeek-V3's precision map keeps master weights and gradients in FP32 while the GEMMs run in
low precision. With fp32 parameters under bf16 autocast (the job's CPU default) every
micro-batch casts every weight to bf16 and accumulates every gradient in fp32 through
autograd; on one H200 those two cost about a third of the proxy preset's step
(benchmarks/RESULTS.md). Here the model holds bf16 parameters (no casts), and each parameter's
gradient is added into an fp32 buffer as soon as autograd has accumulated it (a
post-accumulate-grad hook; the bf16 `.grad` is freed right away), so a step of many micro-batches
sums their gradients in fp32.

  masters = MasterWeights(model)                           # fp32 copies; model -> bf16
  optimizer = torch.optim.AdamW(masters.params, ...)      # fp32 masters, .grad = the fp32 sums
  ... backward of each micro-batch ...                     # hooks add into masters.params[i].grad
  reduce / clip masters.params' gradients                  # they carry the TP/EP attributes
  optimizer.step(); masters.publish(); masters.zero_grad()  # bf16 copies of the masters

`state_dict()` is the model's state dict with the fp32 masters in place of the parameters, so
a checkpoint holds the same fp32 weights whether the run kept fp32 parameters or bf16 ones with
masters, and either kind of run resumes from it. The fp32 gradient of a parameter is also its
`main_grad` (Megatron's name), so layers that defer their weight gradient (weight_grad.py) add
into it directly.
"""

from __future__ import annotations

import torch

from ..kernels.grad_accumulate import add_into_fp32_

# Megatron's parameter attributes that say how a tensor is split (parallel.py, gradients.py read
# them): the master copy carries them too.
_PARALLEL_ATTRIBUTES = ("tensor_model_parallel", "partition_dim", "partition_stride",
                        "expert_parallel", "allreduce")


class MasterWeights:
    """fp32 master copies and fp32 gradient sums of a model's trainable parameters, which are
    cast to `dtype` in place (buffers, such as the routers' expert biases, keep their dtype).
    `params[i]` is the master of the i-th of `model.parameters()`."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype = torch.bfloat16) -> None:
        if not dtype.is_floating_point or dtype == torch.float32:
            raise ValueError(f"MasterWeights(dtype={dtype}) is invalid: the model's parameters "
                             "must be of a lower precision than the fp32 masters (bfloat16)")
        self.model = model
        self.model_params = [p for p in model.parameters() if p.requires_grad]
        self.params: list[torch.Tensor] = []
        for param in self.model_params:
            master = param.detach().float().clone()  # exactly the weights the model was given
            master.grad = torch.zeros_like(master)
            for name in _PARALLEL_ATTRIBUTES:
                if hasattr(param, name):
                    setattr(master, name, getattr(param, name))
            param.data = param.data.to(dtype)
            param.main_grad = master.grad
            param.register_post_accumulate_grad_hook(_add_into(master.grad))
            self.params.append(master)

    @torch.no_grad()
    def publish(self) -> None:
        """The model's parameters become the (rounded) master weights, after an optimizer step
        or after loading masters."""
        torch._foreach_copy_(self.model_params, self.params)

    @torch.no_grad()
    def zero_grad(self) -> None:
        torch._foreach_zero_([m.grad for m in self.params])

    def state_dict(self) -> dict:
        """The model's state dict, its trainable parameters replaced by their fp32 masters
        (under every name a shared parameter has); other entries (buffers, Megatron's
        `_extra_state`) as the model's own state dict has them."""
        master_of = {id(p): m for p, m in zip(self.model_params, self.params)}
        return {name: (master_of[id(value)].detach() if id(value) in master_of
                       else value.detach() if isinstance(value, torch.Tensor) else value)
                for name, value in self.model.state_dict(keep_vars=True).items()}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Load a model state dict (fp32 values, e.g. `state_dict()`'s or an fp32 model's) into
        the model's buffers and the masters, then publish the masters into the parameters."""
        self.model.load_state_dict(state)
        index = {id(p): i for i, p in enumerate(self.model_params)}
        for name, param in self.model.named_parameters():
            if id(param) in index:
                self.params[index[id(param)]].copy_(state[name])
        self.publish()


def _add_into(buffer: torch.Tensor):
    def hook(param: torch.Tensor) -> None:
        if param.grad is not None:  # None: an autograd function left this weight's gradient
            add_into_fp32_(buffer, param.grad)  # to someone else (weight_grad.py, moe/expert_wgrad.py)
            param.grad = None
    return hook
