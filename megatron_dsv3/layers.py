"""The building blocks every module here is made of, chosen in one place.

`get_backend(name)` returns the implementation of the four kinds of layer our modules use:
  column(in, out)      weight split by output rows over tensor-parallel ranks
  row(in, out)         weight split by input columns; output all-reduced over TP
  replicated(in, out)  the same full weight on every TP rank (MLA's down-projections)
  norm(hidden)         RMSNorm
"local" is Megatron-Core's own tensor-parallel layers (`ColumnParallelLinear`,
`RowParallelLinear`) plus our `ReplicatedLinear` and `RMSNorm`, and runs on CPU/gloo and
GPU/NCCL. "te" is Transformer Engine's layers through Megatron's TE extension (GPU only).

FP8 (`ModelConfig.fp8='deepseek'`, docs/precision-and-parallelism.md): the local linears have an
`fp8` attribute (False; model.mark_fp8_linears sets it on the layers of the precision map); with it
their GEMMs are fp8/linear.py's `fp8_linear` (forward, input and weight gradient in FP8; the
weight gradient deferrable as above), the rest of the layer Megatron's.

The local linears can defer their weight gradient to a pipeline schedule's W step
(weight_grad.py; docs/pipeline.md): each has a `weight_grad_store` attribute,
None unless a schedule attaches its store (`attach_weight_grad_store`). With None they run
Megatron's (or F.linear's) code unchanged, at the cost of one attribute test; with a store they
run one autograd function (`linear_deferred_wgrad`) that computes the same GEMMs, dX in the
backward (plus the column-parallel dX all-reduce where Megatron does it) and dW there or,
while the store defers, in W. Under torch.compile a layer with a store runs eager, outside the
graph (`_forward_eager`: the deferral is decided in the backward, which tracing would fix).

Every linear returns `(output, bias)` like Megatron's; bias is always None here (DeepSeek
has no linear biases). The TP helpers at the bottom are device-agnostic: Megatron's own
gather/scatter mappings allocate on `torch.cuda.current_device()`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    copy_to_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
)
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

from .config import ConfigError, resolved_linear_backend
from .fp8.linear import fp8_linear
from .fp8.weight_cache import static_blocks
from .megatron_compat import GemmCall, OwnGemmHook, transformer_engine_available
from .weight_grad import WeightGradStore, linear_deferred_wgrad


def normal_init(std: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """Megatron-style init_method: N(0, std) in place (DeepSeek draws every matrix so)."""
    return lambda weight: torch.nn.init.normal_(weight, mean=0.0, std=std)


def init_device(config):
    """Where Megatron's config says parameters are created: the CPU or the current GPU."""
    if getattr(config, "use_cpu_initialization", True):
        return None
    return torch.cuda.current_device()


def tp_group_of(pg_collection):
    """The tensor-parallel group of a Megatron ProcessGroupCollection (None: no TP)."""
    return pg_collection.tp if pg_collection is not None else None


# ----------------------------------------------------------------------------------------------
# Norm
# ----------------------------------------------------------------------------------------------
class RMSNorm(torch.nn.Module):
    """RMSNorm with fp32 statistics (torch's fused kernel upcasts internally).

    Signature matches Megatron's LayerNormBuilder: (config, hidden_size, eps).
    """

    def __init__(self, config=None, hidden_size: int = 0, eps: float = 1e-6):
        super().__init__()
        dtype = getattr(config, "params_dtype", torch.float32)
        device = init_device(config)
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


# ----------------------------------------------------------------------------------------------
# Replicated linear (the "duplicated" mode of TE's TELinear, for the local backend)
# ----------------------------------------------------------------------------------------------
class ReplicatedLinear(torch.nn.Module):
    """y = x W^T with the full W on every tensor-parallel rank.

    Its input and its output gradient are identical on all TP ranks (the gradient is reduced
    downstream), so its weight gradient is too: no communication of its own.
    """

    weight_grad_store: Optional[WeightGradStore] = None
    fp8: bool = False  # the GEMMs in FP8 (mark_fp8_linears)

    def __init__(self, input_size: int, output_size: int, *, config, init_method: Callable,
                 name: Optional[str] = None):
        super().__init__()
        device = init_device(config)
        self.weight = torch.nn.Parameter(
            torch.empty(output_size, input_size, dtype=config.params_dtype, device=device))
        with torch.no_grad():
            master = torch.empty(output_size, input_size, dtype=torch.float32, device=device)
            init_method(master)
            self.weight.copy_(master)

    def forward(self, x: torch.Tensor):
        if self.weight_grad_store is not None and torch.compiler.is_compiling():
            return self._forward_eager(x)  # see _DeferrableWgrad.forward
        if self.fp8:
            return fp8_linear(x, self.weight, store=self.weight_grad_store,
                              blocks=static_blocks(self, "fp8_blocks")), None
        if self.weight_grad_store is None:
            return F.linear(x, self.weight), None
        return linear_deferred_wgrad(x, self.weight, None, self.weight_grad_store), None

    @torch.compiler.disable  # a schedule's store: Python state that the backward reads
    def _forward_eager(self, x: torch.Tensor):
        return self.forward(x)


# ----------------------------------------------------------------------------------------------
# Megatron's tensor-parallel linears with a deferrable weight gradient
# ----------------------------------------------------------------------------------------------
class _DeferrableWgrad(OwnGemmHook):
    """Mixin for Megatron's Column/RowParallelLinear: in FP8 (`fp8`), their GEMMs run as
    `fp8_linear`; while a store is attached, as `linear_deferred_wgrad`
    (megatron_compat.OwnGemmHook is the seam); otherwise Megatron's own code runs unchanged."""

    weight_grad_store: Optional[WeightGradStore] = None
    fp8: bool = False  # the GEMMs in FP8 (mark_fp8_linears)

    def forward(self, *args, **kwargs):
        """Megatron's forward; under torch.compile with a store attached, eager outside the
        graph. Whether the weight gradient is deferred is decided in the backward
        (`store.deferring_now`): traced, dynamo reads it once, at trace time (False), and
        compiles the weight gradient into the backward graph, so a schedule's B would compute
        what its W should. Leaving at the layer (rather than at its GEMM) is one graph break,
        with no frames below it that dynamo would compile, and recompile, per weight shape.
        Without a store (normal training) nothing changes: traced, no break."""
        if self.weight_grad_store is not None and torch.compiler.is_compiling():
            return self._forward_eager(*args, **kwargs)
        return super().forward(*args, **kwargs)

    @torch.compiler.disable  # a schedule's store: Python state that the backward reads
    def _forward_eager(self, *args, **kwargs):
        return super().forward(*args, **kwargs)

    def own_gemm_enabled(self, weight: torch.Tensor) -> bool:
        return self.fp8 or (self.weight_grad_store is not None and weight.requires_grad)

    def own_gemm(self, input: torch.Tensor, weight: torch.Tensor, call: GemmCall):
        if call.unsupported:
            what = "FP8" if self.fp8 else "weight-gradient deferral"
            raise NotImplementedError(
                f"{type(self).__name__}: {what} does not support "
                f"{', '.join(call.unsupported)}; turn it off in Megatron's config (for the "
                "fusion: gradient_accumulation_fusion=False, --no-gradient-accumulation-fusion)"
                + ("" if self.fp8 else
                   " or detach the store: attach_weight_grad_store(model, None)"))
        if self.fp8:
            if call.dgrad_group is not None:  # the column-parallel dX all-reduce
                input = copy_to_tensor_model_parallel_region(input, group=call.dgrad_group)
            # the step's static FP8 blocks of self.weight (model.mark_fp8_linears keeps them)
            blocks = static_blocks(self, "fp8_blocks") if weight is self.weight else None
            return fp8_linear(input, weight, call.bias, store=self.weight_grad_store,
                              blocks=blocks)
        return linear_deferred_wgrad(input, weight, call.bias, self.weight_grad_store,
                                     dgrad_group=call.dgrad_group)


class DeferrableColumnParallelLinear(_DeferrableWgrad, ColumnParallelLinear):
    """Megatron's ColumnParallelLinear; its weight gradient deferrable (see _DeferrableWgrad)."""


class DeferrableRowParallelLinear(_DeferrableWgrad, RowParallelLinear):
    """Megatron's RowParallelLinear; its weight gradient deferrable (see _DeferrableWgrad)."""


# ----------------------------------------------------------------------------------------------
# Backends
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LinearBackend:
    """Constructors for the four kinds of layer. Each linear returns (output, None)."""

    name: str
    column: Callable[..., torch.nn.Module]
    row: Callable[..., torch.nn.Module]
    replicated: Callable[..., torch.nn.Module]
    norm: Callable[..., torch.nn.Module]


def _local_column(input_size, output_size, *, config, init_method, tp_group, stride=1,
                  gather_output=False, name=None):
    return DeferrableColumnParallelLinear(
        input_size, output_size, config=config, init_method=init_method, bias=False,
        gather_output=gather_output, stride=stride, skip_bias_add=False, tp_group=tp_group,
        name=name)


def _local_row(input_size, output_size, *, config, init_method, tp_group, name=None):
    return DeferrableRowParallelLinear(
        input_size, output_size, config=config, init_method=init_method, bias=False,
        input_is_parallel=True, skip_bias_add=False, tp_group=tp_group, name=name)


def _local_replicated(input_size, output_size, *, config, init_method, tp_group=None,
                      name=None):
    return ReplicatedLinear(input_size, output_size, config=config, init_method=init_method,
                            name=name)


def _te_backend() -> LinearBackend:
    from megatron.core.extensions.transformer_engine import (
        TEColumnParallelLinear,
        TELinear,
        TENorm,
        TERowParallelLinear,
    )

    def column(input_size, output_size, *, config, init_method, tp_group, stride=1,
               gather_output=False, name=None):
        # TE has no `stride`: a fused [gate; up] weight is initialised per rank rather than
        # split from one master draw. Same math, another random init; checkpoints convert.
        return TEColumnParallelLinear(input_size, output_size, config=config,
                                      init_method=init_method, gather_output=gather_output,
                                      bias=False, skip_bias_add=False, is_expert=False,
                                      tp_group=tp_group)

    def row(input_size, output_size, *, config, init_method, tp_group, name=None):
        return TERowParallelLinear(input_size, output_size, config=config,
                                   init_method=init_method, bias=False, input_is_parallel=True,
                                   skip_bias_add=False, is_expert=False, tp_group=tp_group)

    def replicated(input_size, output_size, *, config, init_method, tp_group=None, name=None):
        return TELinear(input_size, output_size, parallel_mode="duplicated", config=config,
                        init_method=init_method, bias=False, skip_bias_add=False,
                        skip_weight_param_allocation=False, tp_group=None)

    def norm(config=None, hidden_size=0, eps=1e-6):
        return TENorm(config=config, hidden_size=hidden_size, eps=eps)

    return LinearBackend("te", column, row, replicated, norm)


LOCAL = LinearBackend("local", _local_column, _local_row, _local_replicated, RMSNorm)


@functools.cache
def get_backend(name: str = "auto") -> LinearBackend:
    """The layer implementations for `ModelConfig.linear_backend`."""
    if name == "auto":
        name = resolved_linear_backend(name)
    if name == "local":
        return LOCAL
    if name == "te":
        if not transformer_engine_available():
            raise ConfigError("linear_backend='te' is invalid here: Transformer Engine does not "
                              "import; install transformer-engine[pytorch] or use 'local'")
        return _te_backend()
    raise ConfigError(f"linear_backend={name!r} is invalid: choose 'auto', 'local' or 'te'")


# ----------------------------------------------------------------------------------------------
# Tensor-parallel helpers that run on CPU (gloo) and GPU (NCCL) alike
# ----------------------------------------------------------------------------------------------
def tp_size(group) -> int:
    return 1 if group is None else group.size()


def tp_rank(group) -> int:
    return 0 if group is None else group.rank()


def copy_to_tp(x: torch.Tensor, group) -> torch.Tensor:
    """Identity forward; all-reduce of the gradient over TP in backward."""
    if tp_size(group) == 1:
        return x
    return copy_to_tensor_model_parallel_region(x, group=group)


def reduce_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    """All-reduce over TP in forward; identity backward."""
    if tp_size(group) == 1:
        return x
    return reduce_from_tensor_model_parallel_region(x, group=group)


class _GatherLastDim(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        parts = [torch.empty_like(x) for _ in range(group.size())]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        group = ctx.group
        return grad.chunk(group.size(), dim=-1)[group.rank()].contiguous(), None


def gather_last_dim_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    """All-gather the last dimension over TP (forward); keep this rank's slice (backward)."""
    if tp_size(group) == 1:
        return x
    return _GatherLastDim.apply(x, group)


def mark_tensor_parallel(param: torch.nn.Parameter, dim: int, stride: int = 1) -> None:
    """Megatron's metadata for a TP-split parameter (read by checkpointing and by our
    sharding helpers in `megatron_dsv3.parallel`)."""
    set_tensor_model_parallel_attributes(param, is_parallel=True, dim=dim, stride=stride)
