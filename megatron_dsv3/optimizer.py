"""AdamW whose step is one pass per tensor of kernels/adamw.py, with its moments in fp32 or bf16.

DeepSeek-V3 keeps AdamW's two moments in bf16 ("the BF16 data format instead of FP32 to track
the first and second moments"), the arithmetic and the master weights in fp32. torch's AdamW
needs its moments in the parameters' dtype; Megatron's optimizer keeps them in bf16 only through
Transformer Engine's FusedAdam (`--use-precision-aware-optimizer`). `KernelAdamW` is torch's
AdamW (decoupled weight decay, torch's state-dict layout: `step`, `exp_avg`, `exp_avg_sq`
per parameter, so states load both ways; the step a Python float inside) on fp32 parameters
with `moments_dtype` moments: a Triton kernel per tensor on a GPU, PyTorch operations
elsewhere. Subclasses say what else the pass
writes (`_bf16_copy_of`: the model's bf16 weight of a master) and whether it zeroes the
gradient (`_zeroes_grads`).

  KernelAdamW            fp32 parameters, their `.grad` left as it is (Megatron zeroes its own)
  MegatronAdamW          the same under the keyword arguments Megatron's optimizer builder
                         passes its `Adam` class (megatron_compat.use_megatron_adam), its
                         state dict whole (every parameter's step and moments, made when it
                         is asked for); MegatronAdamWFP32: fp32 moments
  train.master_weights.MasterAdamW
                         fp32 masters of bf16 parameters: publishes the bf16 copies and
                         consumes the gradient sums in the same pass
"""

from __future__ import annotations

from typing import Optional

import torch

from .kernels.adamw import adamw_

MOMENT_DTYPES = (torch.float32, torch.bfloat16)


class KernelAdamW(torch.optim.AdamW):
    """torch's AdamW with kernels/adamw.py's step (module docstring). Gradients are divided by
    `grad_scale` (a device scalar) when it is set, as torch's fused AdamW does: gradient
    clipping scales inside the step (gradients.clip_gradients)."""

    applies_grad_scale = True  # gradients.clip_gradients: scale inside the step

    def __init__(self, params, moments_dtype: torch.dtype = torch.float32, **adamw_kwargs):
        if moments_dtype not in MOMENT_DTYPES:
            raise ValueError(f"{type(self).__name__}(moments_dtype={moments_dtype}) is invalid: "
                             "the moments are kept in torch.float32 or torch.bfloat16")
        super().__init__(params, foreach=False, fused=False, **adamw_kwargs)
        self.moments_dtype = moments_dtype
        self.grad_scale: Optional[torch.Tensor] = None

    # The step count is a Python float inside the optimizer and a tensor in its state dict (as
    # torch's AdamW keeps it). Megatron's distributed optimizer copies every *tensor* of a
    # parameter's state from the checkpoint's per-parameter state, in which the step is not
    # stored: a tensor step was overwritten by the fresh optimizer's 0 after every resume,
    # after Megatron had set it from the saved param groups (found on the GPU: the resumed
    # run's losses left the straight run's after the first step; reproduced on the CPU,
    # tests/test_megatron_optimizer_resume.py).
    def state_dict(self) -> dict:
        packed = super().state_dict()
        packed["state"] = {index: {**state, "step": torch.tensor(float(state["step"]))}
                           if "step" in state else state
                           for index, state in packed["state"].items()}
        return packed

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's loading (which casts the moments to the parameters' fp32), then the moments
        in this optimizer's dtype and the step a Python float."""
        super().load_state_dict(state_dict)
        for state in self.state.values():
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state and state[key].dtype != self.moments_dtype:
                    state[key] = state[key].to(self.moments_dtype)
            if "step" in state:
                state["step"] = float(state["step"])

    def _state_of(self, param: torch.Tensor) -> dict:
        """`param`'s state with what is missing made (step 0, zero moments): all of it for a
        new parameter, the step for moments made by Megatron's init_state_fn."""
        state = self.state[param]
        if "step" not in state:
            state["step"] = 0.0
        for key in ("exp_avg", "exp_avg_sq"):
            if key not in state:
                state[key] = torch.zeros_like(param, dtype=self.moments_dtype)
        return state

    def _bf16_copy_of(self, param: torch.Tensor) -> Optional[torch.Tensor]:
        """The bf16 tensor the step writes `param`'s rounding into (None: none)."""
        return None

    def _zeroes_grads(self) -> bool:
        return False

    def _after_step(self) -> None:
        pass

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError(f"{type(self).__name__}.step takes no closure")
        zero_grad = self._zeroes_grads()
        for group in self.param_groups:
            if group["amsgrad"] or group["maximize"]:
                raise ValueError(f"{type(self).__name__} supports neither amsgrad nor maximize")
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self._state_of(param)
                for key in ("exp_avg", "exp_avg_sq"):  # fp32 ones made by someone else
                    if state[key].dtype != self.moments_dtype:
                        state[key] = state[key].to(self.moments_dtype)
                # a new value, never `+= 1` on a tensor: Megatron's distributed optimizer may
                # hand every parameter's state one shared step tensor, which an in-place
                # increment advanced once per parameter
                state["step"] = float(state["step"]) + 1
                adamw_(param, param.grad, state["exp_avg"], state["exp_avg_sq"],
                       self._bf16_copy_of(param), step=int(state["step"]),
                       lr=float(group["lr"]), beta1=beta1, beta2=beta2, eps=group["eps"],
                       weight_decay=group["weight_decay"], grad_scale=self.grad_scale,
                       zero_grad=zero_grad)
        self._after_step()


class MegatronAdamW(KernelAdamW):
    """KernelAdamW built by Megatron's optimizer builder in place of its `Adam`
    (megatron_compat.use_megatron_adam) from the keyword arguments it passes TE's or apex's
    FusedAdam: params, lr, weight_decay, betas, eps, capturable, adam_w_mode. Moments in bf16
    (`MegatronAdamWFP32`: fp32).

    Its state dict holds every parameter's state (step 0 and zero moments where no step ran):
    without TE or apex Megatron's distributed optimizer reads one `step` from all of them when
    it builds the state dict a checkpoint loads into, on a fresh optimizer (measured on the GPU:
    torch's lazily made state failed every resume there). It is made when the state dict is
    asked for, not at construction: that optimizer swaps `param_groups` for its fp32 shards
    after constructing us and round-trips the state dict at once (a state made at construction
    was keyed by parameters no longer in any group: torch's state_dict failed, found on the
    GPU). Its step stays a Python float inside the optimizer (KernelAdamW.state_dict): a
    tensor step was reset to 0 by every resume, tests/test_megatron_optimizer_resume.py."""

    default_moments_dtype = torch.bfloat16

    def __init__(self, params, *, lr: float, weight_decay: float, betas, eps: float,
                 capturable: bool = False, adam_w_mode: bool = True,
                 moments_dtype: Optional[torch.dtype] = None):
        if capturable:
            raise ValueError(f"{type(self).__name__} (--adam-moments-dtype) cannot be captured "
                             "in a CUDA graph: drop --optimizer-cuda-graph")
        if not adam_w_mode:
            raise ValueError(f"{type(self).__name__} (--adam-moments-dtype) is AdamW: drop "
                             "--no-decoupled-weight-decay")
        super().__init__(params, moments_dtype or self.default_moments_dtype, lr=lr,
                         weight_decay=weight_decay, betas=betas, eps=eps)

    def state_dict(self) -> dict:
        """torch's state dict over the parameters now in `param_groups`, each with its whole
        state (class docstring); the state of parameters no longer in a group is dropped."""
        live = {id(p) for group in self.param_groups for p in group["params"]}
        for param in [p for p in self.state if id(p) not in live]:
            del self.state[param]
        for group in self.param_groups:
            for param in group["params"]:
                self._state_of(param)
        return super().state_dict()


class MegatronAdamWFP32(MegatronAdamW):
    """MegatronAdamW with fp32 moments: Megatron's Adam without TE or apex (its torch AdamW
    cannot resume from a distributed-optimizer checkpoint there, see MegatronAdamW)."""

    default_moments_dtype = torch.float32
