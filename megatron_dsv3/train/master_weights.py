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
  optimizer = MasterAdamW(groups of masters.params, masters, ...)  # fp32 masters and sums
  ... backward of each micro-batch ...                     # hooks add into masters.params[i].grad
  reduce / clip masters.params' gradients                  # they carry the TP/EP attributes
  optimizer.step()   # AdamW on the masters, their bf16 copies into the model, the sums zeroed

With `store_first=True` the first gradient a master receives in a step is stored into its sum
(a bf16 read and an fp32 write) instead of added to a zeroed one, and MasterAdamW's step leaves
the sums as they are instead of zeroing them: 8 bytes per parameter and step less (of ~106 at
8 micro-batches); `finish_accumulation()`, after the step's last backward, zeroes the sums of
masters that got no gradient. Only for runs in which every gradient arrives through the hook
or is written by code that asks `claims_sum` first (moe/expert_wgrad.py's merged expert
gradients); not with deferred weight gradients or sums added inside a GEMM (train/job.py).

`state_dict()` is the model's state dict with the fp32 masters in place of the parameters, so
a checkpoint holds the same fp32 weights whether the run kept fp32 parameters or bf16 ones with
masters, and either kind of run resumes from it. The fp32 gradient of a parameter is also its
`main_grad` (Megatron's name), so layers that defer their weight gradient (weight_grad.py) add
into it directly.
"""

from __future__ import annotations


import torch

from ..kernels.grad_accumulate import add_into_fp32_
from ..optimizer import KernelAdamW

# Megatron's parameter attributes that say how a tensor is split (parallel.py, gradients.py read
# them): the master copy carries them too.
_PARALLEL_ATTRIBUTES = ("tensor_model_parallel", "partition_dim", "partition_stride",
                        "expert_parallel", "allreduce")


class MasterWeights:
    """fp32 master copies and fp32 gradient sums of a model's trainable parameters, which are
    cast to `dtype` in place (buffers, such as the routers' expert biases, keep their dtype).
    `params[i]` is the master of the i-th of `model.parameters()`."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype = torch.bfloat16, *,
                 store_first: bool = False) -> None:
        if not dtype.is_floating_point or dtype == torch.float32:
            raise ValueError(f"MasterWeights(dtype={dtype}) is invalid: the model's parameters "
                             "must be of a lower precision than the fp32 masters (bfloat16)")
        self.model = model
        self.store_first = store_first
        self.model_params = [p for p in model.parameters() if p.requires_grad]
        self.params: list[torch.Tensor] = []
        # store_first: whether master i's sum holds this step's gradients yet
        self.holds_sum = [False] * len(self.model_params)
        self._index = {id(p): i for i, p in enumerate(self.model_params)}
        for index, param in enumerate(self.model_params):
            master = param.detach().float().clone()  # exactly the weights the model was given
            master.grad = torch.zeros_like(master)
            # never reallocated (zeroed in place): CUDA graphs may keep its address, so a
            # compiled graph that adds into it (moe/experts.py) stays a graph
            torch._dynamo.mark_static_address(master.grad)
            for name in _PARALLEL_ATTRIBUTES:
                if hasattr(param, name):
                    setattr(master, name, getattr(param, name))
            param.data = param.data.to(dtype)
            param.main_grad = master.grad
            param.register_post_accumulate_grad_hook(self._accumulate_hook(index, master.grad))
            self.params.append(master)

    @torch.no_grad()
    def publish(self) -> None:
        """The model's parameters become the (rounded) master weights, after an optimizer step
        or after loading masters."""
        torch._foreach_copy_(self.model_params, self.params)

    def _accumulate_hook(self, index: int, buffer: torch.Tensor):
        """The post-accumulate-grad hook of model parameter `index`, whose sum is `buffer`."""
        def hook(param: torch.Tensor) -> None:
            # None: an autograd function left this weight's gradient to someone else
            # (weight_grad.py, moe/expert_wgrad.py, moe/experts.py's sums inside the GEMM)
            if param.grad is None:
                return
            add_into_fp32_(buffer, param.grad, store=self._claim(index))
            param.grad = None
        return hook

    def _claim(self, index: int) -> bool:
        """Whether master `index`'s next gradient is stored into its sum rather than added
        (store_first, nothing of this step there yet); from now on the sum holds the step's."""
        store = self.store_first and not self.holds_sum[index]
        self.holds_sum[index] = True
        return store

    def claims_sum(self, param: torch.Tensor) -> bool:
        """For a gradient that model parameter `param` receives outside its hook, written into
        its `main_grad` directly (moe/expert_wgrad.py): True where it must be stored, not
        added; the sum then holds this step's gradient."""
        return self._claim(self._index[id(param)])

    @torch.no_grad()
    def finish_accumulation(self) -> None:
        """After a step's last backward (store_first): the sums of masters that received no
        gradient this step are zeroed (they still hold an earlier step's)."""
        if self.store_first:
            idle = [m.grad for m, held in zip(self.params, self.holds_sum) if not held]
            if idle:
                torch._foreach_zero_(idle)
            self.holds_sum = [True] * len(self.params)

    def sums_consumed(self) -> None:
        """The optimizer has used the sums: the next gradient of each master is stored."""
        self.holds_sum = [False] * len(self.params)

    @torch.no_grad()
    def zero_grad(self) -> None:
        torch._foreach_zero_([m.grad for m in self.params])
        self.holds_sum = [True] * len(self.params)  # zero is a valid sum to add into

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
        for name, param in self.model.named_parameters():
            if id(param) in self._index:
                self.params[self._index[id(param)]].copy_(state[name])
        self.publish()


class MasterAdamW(KernelAdamW):
    """AdamW (optimizer.KernelAdamW) over a MasterWeights' fp32 masters whose step also does
    the masters' bookkeeping: after it each master's bf16 copy is in the model (`publish`) and
    its gradient sum is zero (`zero_grad`), or with `store_first` left to be overwritten. Per
    tensor that is one pass (kernels/adamw.py: a Triton kernel on a GPU, PyTorch operations
    elsewhere) instead of torch's AdamW, a copy and a fill. `moments_dtype=torch.bfloat16`
    keeps both moments in bf16, as DeepSeek-V3 does."""

    def __init__(self, param_groups, masters: MasterWeights,
                 moments_dtype: torch.dtype = torch.float32, **adamw_kwargs) -> None:
        super().__init__(param_groups, moments_dtype, **adamw_kwargs)
        self.masters = masters
        self._model_param = {id(m): p for m, p in zip(masters.params, masters.model_params)}
        unknown = [p for g in self.param_groups for p in g["params"]
                   if id(p) not in self._model_param]
        if unknown:
            raise ValueError(f"MasterAdamW: {len(unknown)} parameters are not masters of the "
                             "MasterWeights given; pass its `params` (in any grouping)")

    def _bf16_copy_of(self, param: torch.Tensor) -> torch.Tensor:
        return self._model_param[id(param)]

    def _zeroes_grads(self) -> bool:
        return not self.masters.store_first

    def _after_step(self) -> None:
        if self.masters.store_first:
            self.masters.sums_consumed()
