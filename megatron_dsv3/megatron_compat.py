"""Every private part of Megatron-Core this package calls or overrides, behind a version check.

Megatron-Core renames and re-signs its private methods between releases without notice. The
rest of the package reaches them only through this module, so that a new release is checked
(and, if needed, adapted) in one place:

  TransformerLayer._forward_attention / _forward_pre_mlp_layernorm / _forward_post_mlp
        `layer_attention`, `layer_pre_mlp_norm`, `layer_post_mlp`: a TransformerLayer run in
        parts (the MoE F&B overlap cuts a layer at its MLP; moe/pieces.py)
  GPTModel._postprocess
        `GPTPostprocessHook`: a GPTModel whose `_postprocess` (MTP, output layer, loss after
        the decoder) calls our public `postprocess(...)` (model.py)
  ColumnParallelLinear / RowParallelLinear._forward_impl
        `OwnGemmHook`: Megatron's tensor-parallel linears with their GEMM call replaced by our
        own autograd function when the layer asks for it (layers.py: deferrable weight
        gradients; FP8 GEMMs will use the same seam)
  parallel_state._MPU_PIPELINE_MODEL_PARALLEL_WORLD_SIZE / _RANK
        `one_pipeline_stage()`: Megatron's global pipeline size and rank read 1 and 0 while a
        whole model is built on a rank of a DualPipe pipeline (parallel.py)
  megatron.core.datasets.utils.compile_helpers
        `use_prebuilt_dataset_helpers()`: megatron.training's initialisation runs `make` in
        megatron/core/datasets on rank 0 and exits when it fails; the megatron-core wheel ships
        the built `helpers_cpp` extension but no Makefile, so `pretrain()` from the wheel
        always stopped there (pretrain.py installs this before calling it)
  megatron.training.training.save_checkpoint / load_checkpoint
        `around_megatron_checkpointing(after_save, before_load, after_load)`: the names
        Megatron's loop calls, wrapped (pretrain.py writes and checks a digest manifest of each
        checkpoint and a fingerprint of its optimizer state); `torch_optimizers_of`: the torch
        optimizers inside Megatron's (ChainedOptimizer.chained_optimizers, `.optimizer`)
  megatron.training.training.evaluate
        `around_megatron_evaluate(context)`: evaluation inside a context (pretrain: eager
        while the training modules are CUDA graphs)
  megatron.training.training.get_forward_backward_func
        `around_forward_backward(context)`: each iteration's schedule call inside a context
        (pretrain: FP8 weights quantized once per iteration, fp8/weight_cache.py);
        `use_forward_backward_func(factory)`: the schedule Megatron's loop runs (pretrain with
        --pipeline-schedule dualpipev: ours)
  megatron.core.optimizer.Adam / USING_PYTORCH_OPTIMIZER
        `use_megatron_adam(cls)`: the class Megatron's optimizer builder instantiates for
        `--optimizer adam` (TE's or apex's FusedAdam when they import, else torch's AdamW),
        replaced by ours (optimizer.MegatronAdamW: bf16 moments without TE);
        `megatron_has_fused_adam()`: whether Megatron found TE's or apex's FusedAdam
  megatron.core.dist_checkpointing's torch_dist layout (serialization.save)
        `COMMON_STATE_KEY`, `sharded_object_entry(key, obj)`, `write_torch_dist_config`: how
        Megatron stores the common state and an unsharded object (e.g. a linear's
        _extra_state) in DCP's files and marks the folder as torch_dist
        (checkpoint/megatron_files.py writes such a folder without a process group)

At import the module checks that the installed megatron-core is the release it was written
against (`TESTED_VERSION`) and that each private method above still takes the arguments used
here (`_check_signatures`). Another release with matching signatures only warns; a mismatch
raises ImportError naming the method: update the function of this module that wraps it (and
`TESTED_VERSION`), nothing else.
"""

from __future__ import annotations

import inspect
import io
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from megatron.core import package_info, parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.transformer_layer import TransformerLayer

TESTED_VERSION = "0.19.2"
# MAJOR.MINOR.PATCH (its __version__ may carry the hash of whatever git checkout it sits in)
INSTALLED_VERSION = package_info.__shortversion__

# The private methods used here and the parameters we pass or receive (a subset of theirs).
_PRIVATE_SIGNATURES = {
    (TransformerLayer, "_forward_attention"): ("hidden_states", "attention_mask"),
    (TransformerLayer, "_forward_pre_mlp_layernorm"): ("hidden_states",),
    (TransformerLayer, "_forward_post_mlp"): ("mlp_output_with_bias", "residual"),
    (GPTModel, "_postprocess"): (
        "hidden_states", "input_ids", "position_ids", "labels", "mtp_in_postprocess",
        "loss_mask", "attention_mask", "runtime_gather_output", "inference_context",
        "packed_seq_params"),
    (ColumnParallelLinear, "_forward_impl"): ("input", "weight"),
    (RowParallelLinear, "_forward_impl"): ("input", "weight"),
}
_PRIVATE_GLOBALS = ("_MPU_PIPELINE_MODEL_PARALLEL_WORLD_SIZE", "_MPU_PIPELINE_MODEL_PARALLEL_RANK")


def _check_signatures() -> None:
    problems = []
    for (cls, name), params in _PRIVATE_SIGNATURES.items():
        method = getattr(cls, name, None)
        if method is None:
            problems.append(f"{cls.__name__}.{name} no longer exists")
            continue
        have = inspect.signature(method).parameters
        missing = [p for p in params if p not in have]
        if missing:
            problems.append(f"{cls.__name__}.{name} no longer takes {missing}")
    problems += [f"parallel_state.{name} no longer exists" for name in _PRIVATE_GLOBALS
                 if not hasattr(parallel_state, name)]
    if problems:
        raise ImportError(
            f"megatron_dsv3 was written against megatron-core {TESTED_VERSION}; the installed "
            f"{INSTALLED_VERSION} changed the private surface it uses:\n  "
            + "\n  ".join(problems)
            + "\nInstall megatron-core==" + TESTED_VERSION + " or update the wrapper of each "
            "listed item in megatron_dsv3/megatron_compat.py")
    if INSTALLED_VERSION != TESTED_VERSION:
        warnings.warn(f"megatron_dsv3 was tested with megatron-core {TESTED_VERSION}, found "
                      f"{INSTALLED_VERSION}; the private methods it uses still have the "
                      "expected arguments (megatron_dsv3/megatron_compat.py)", stacklevel=2)


_check_signatures()


# ----------------------------------------------------------------------------------------------
# TransformerLayer in parts
# ----------------------------------------------------------------------------------------------
def layer_attention(layer: TransformerLayer, hidden_states: torch.Tensor,
                    **layer_kwargs) -> torch.Tensor:
    """input_layernorm -> self-attention -> residual add: the layer's hidden states before its
    MLP norm, [s, b, d]. `layer_kwargs` are TransformerLayer.forward's (attention_mask, ...)."""
    hidden_states, _context = layer._forward_attention(hidden_states, **layer_kwargs)
    return hidden_states


def layer_pre_mlp_norm(layer: TransformerLayer, hidden_states: torch.Tensor) -> torch.Tensor:
    """The MLP's input: pre_mlp_layernorm of the attention output."""
    return layer._forward_pre_mlp_layernorm(hidden_states)


def layer_post_mlp(layer: TransformerLayer, mlp_output: torch.Tensor,
                   residual: torch.Tensor) -> torch.Tensor:
    """The MLP output (no bias) + the residual: the layer's output [s, b, d]."""
    return layer._forward_post_mlp((mlp_output, None), residual)


# ----------------------------------------------------------------------------------------------
# GPTModel's post-processing
# ----------------------------------------------------------------------------------------------
class GPTPostprocessHook(GPTModel):
    """GPTModel whose post-processing after the decoder (MTP, output layer, loss) is the
    subclass's public `postprocess(hidden_states, *, input_ids, position_ids, labels,
    loss_mask, attention_mask, run_mtp, runtime_gather_output)`. Inference contexts and packed
    sequences are refused: the training model does not take them."""

    def postprocess(self, hidden_states: torch.Tensor, *, input_ids, position_ids, labels,
                    loss_mask, attention_mask, run_mtp: bool, runtime_gather_output):
        raise NotImplementedError(f"{type(self).__name__} must define postprocess()")

    def _postprocess(self, hidden_states, input_ids, position_ids, labels, rotary_pos_emb,
                     rotary_pos_cos, rotary_pos_sin, mtp_in_postprocess=None, loss_mask=None,
                     decoder_input=None, attention_mask=None, padding_mask=None,
                     inference_params=None, packed_seq_params=None, sequence_len_offset=None,
                     runtime_gather_output=None, extra_block_kwargs=None,
                     inference_context=None, output_processor=None,
                     output_processor_context=None):
        for name, value in (("inference_context", inference_context),
                            ("inference_params", inference_params),
                            ("packed_seq_params", packed_seq_params),
                            ("output_processor", output_processor)):
            if value is not None:
                raise ValueError(f"{type(self).__name__}: {name} is not supported by the "
                                 "training model; call it without one")
        return self.postprocess(hidden_states, input_ids=input_ids, position_ids=position_ids,
                                labels=labels, loss_mask=loss_mask,
                                attention_mask=attention_mask, run_mtp=bool(mtp_in_postprocess),
                                runtime_gather_output=runtime_gather_output)


# ----------------------------------------------------------------------------------------------
# Megatron's tensor-parallel linears with our GEMM
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GemmCall:
    """What Megatron's linear hands its GEMM, in the terms our GEMMs take."""
    bias: Optional[torch.Tensor]
    dgrad_group: Optional[torch.distributed.ProcessGroup]  # all-reduce dX over it (column TP)
    unsupported: tuple[str, ...]    # Megatron options on that our GEMMs do not implement


def _gemm_call(bias=None, gradient_accumulation_fusion=False, allreduce_dgrad=False,
               sequence_parallel=False, grad_output_buffer=None, wgrad_deferral_limit=None,
               tp_group=None, gtp_remat_size=1) -> GemmCall:
    unsupported = tuple(name for name, on in (
        ("sequence_parallel", sequence_parallel),
        ("gradient_accumulation_fusion", gradient_accumulation_fusion),
        ("defer_embedding_wgrad_compute", grad_output_buffer is not None),
        ("gtp_remat_size > 1", gtp_remat_size > 1)) if on)
    return GemmCall(bias, tp_group if allreduce_dgrad else None, unsupported)


class OwnGemmHook:
    """Mixin for ColumnParallelLinear / RowParallelLinear (put it first in the bases). Their
    `_forward_impl` is the call of Megatron's GEMM autograd function, after Megatron's own input
    handling (copy to the TP region) and before the row-parallel output all-reduce. When
    `self.own_gemm_enabled(weight)` is true it runs `self.own_gemm(input, weight, call)` instead
    (`call`: a GemmCall); parameters, their names and TP metadata, and everything around the
    GEMM stay Megatron's."""

    def own_gemm_enabled(self, weight: torch.Tensor) -> bool:
        raise NotImplementedError

    def own_gemm(self, input: torch.Tensor, weight: torch.Tensor, call: GemmCall):
        raise NotImplementedError

    def _forward_impl(self, input, weight, *args, **kwargs):
        if not self.own_gemm_enabled(weight):
            if "tp_group" in kwargs and kwargs["tp_group"] is None:
                # RowParallelLinear hands its GEMM tp_group=None (unused: no dX all-reduce);
                # Megatron then warns on rank 0, and under torch.compile that warning is a
                # graph break in every attention and MLP module. Its own group: no warning.
                kwargs["tp_group"] = self.tp_group
            return super()._forward_impl(input, weight, *args, **kwargs)
        return self.own_gemm(input, weight, _gemm_call(*args, **kwargs))


# ----------------------------------------------------------------------------------------------
# Megatron's global pipeline rank
# ----------------------------------------------------------------------------------------------
@contextmanager
def one_pipeline_stage() -> Iterator[None]:
    """Inside, Megatron's global pipeline-parallel size and rank read 1 and 0 (what its MTP
    placement and layer offsets consult), whatever the groups say; restored on exit."""
    saved = (parallel_state._MPU_PIPELINE_MODEL_PARALLEL_WORLD_SIZE,
             parallel_state._MPU_PIPELINE_MODEL_PARALLEL_RANK)
    parallel_state.set_pipeline_model_parallel_world_size(1)
    parallel_state.set_pipeline_model_parallel_rank(0)
    try:
        yield
    finally:
        parallel_state.set_pipeline_model_parallel_world_size(saved[0])
        parallel_state.set_pipeline_model_parallel_rank(saved[1])


# ----------------------------------------------------------------------------------------------
# Megatron's dataset helpers
# ----------------------------------------------------------------------------------------------
def use_prebuilt_dataset_helpers() -> None:
    """Make `compile_helpers` (which megatron.training's `_compile_dependencies` imports and
    calls on rank 0 at every start) a no-op when the wheel's built `helpers_cpp` extension
    imports; it runs `make` as before where it does not (a source checkout without the build).
    Idempotent."""
    from megatron.core.datasets import utils

    original = utils.compile_helpers
    if getattr(original, "_prebuilt_aware", False):
        return

    def compile_helpers() -> None:
        try:
            from megatron.core.datasets import helpers_cpp  # noqa: F401
        except ImportError:
            original()

    compile_helpers._prebuilt_aware = True
    utils.compile_helpers = compile_helpers


# ----------------------------------------------------------------------------------------------
# Megatron's checkpoint save and load in its loop
# ----------------------------------------------------------------------------------------------
def _wrap_in_training_loop(name: str, wrap) -> None:
    """Replace the function `name` that megatron.training.training calls by `wrap(original)`,
    the original being Megatron's own even when an earlier call wrapped it already (so a second
    call replaces the wrapper instead of stacking one more)."""
    from megatron.training import training

    current = getattr(training, name)
    original = getattr(current, "_megatron_original", current)
    wrapped = wrap(original)
    wrapped._megatron_original = original
    setattr(training, name, wrapped)


def torch_optimizers_of(optimizer) -> list:
    """The torch optimizers inside a Megatron optimizer (a ChainedOptimizer's
    `chained_optimizers`, each wrapper's `optimizer`), in order; [] for None."""
    if optimizer is None:
        return []
    chained = getattr(optimizer, "chained_optimizers", None)
    if chained is not None:
        return [inner for part in chained for inner in torch_optimizers_of(part)]
    inner = getattr(optimizer, "optimizer", None)
    return [inner] if isinstance(inner, torch.optim.Optimizer) else []


def around_megatron_checkpointing(after_save, before_load, after_load=None) -> None:
    """Wrap the `save_checkpoint` / `load_checkpoint` that megatron.training.training calls
    (names it imports from megatron.training.checkpointing): `after_save(iteration,
    non_persistent, optimizer)` once Megatron's save has returned on this rank,
    `before_load(load_arg)` before its load and `after_load(load_arg, optimizer)` after it
    (load_arg: the argument naming the folder, 'load' unless given; optimizer: the one Megatron
    passed, None where it saves or loads none). Idempotent: a second call replaces the hooks."""

    def optimizer_of(args, kwargs):
        # both take (model, optimizer, ...) after save's iteration
        return kwargs.get("optimizer", args[1] if len(args) > 1 else None)

    def with_after_save(save):
        def save_checkpoint(iteration, *args, **kwargs):
            result = save(iteration, *args, **kwargs)
            after_save(iteration, bool(kwargs.get("non_persistent_ckpt", False)),
                       optimizer_of(args, kwargs))
            return result
        return save_checkpoint

    def with_hooks_around_load(load):
        def load_checkpoint(*args, **kwargs):
            load_arg = kwargs.get("load_arg", args[3] if len(args) > 3 else "load")
            before_load(load_arg)
            result = load(*args, **kwargs)
            if after_load is not None:
                after_load(load_arg, optimizer_of(args, kwargs))
            return result
        return load_checkpoint

    _wrap_in_training_loop("save_checkpoint", with_after_save)
    _wrap_in_training_loop("load_checkpoint", with_hooks_around_load)


def around_megatron_evaluate(context) -> None:
    """Megatron's loop runs each evaluation (`evaluate`, a name of
    megatron.training.training) inside `context()`. Idempotent: a second call replaces it."""

    def within_context(evaluate):
        def evaluate_within(*args, **kwargs):
            with context():
                return evaluate(*args, **kwargs)
        return evaluate_within

    _wrap_in_training_loop("evaluate", within_context)


def use_forward_backward_func(factory) -> None:
    """The `get_forward_backward_func` Megatron's training and evaluation loops call (a name
    megatron.training.training imports) returns `factory()` instead of Megatron's schedule."""
    from megatron.training import training

    training.get_forward_backward_func = lambda *args, **kwargs: factory()


def around_forward_backward(context) -> None:
    """Each call of the schedule Megatron's training and evaluation loops get from
    `get_forward_backward_func` (its own, or one installed by use_forward_backward_func before
    this) runs inside `context()`: all micro-batches of one iteration, before the optimizer
    step. Idempotent: a second call replaces the context."""

    def within_context(get_forward_backward_func):
        def get(*args, **kwargs):
            schedule = get_forward_backward_func(*args, **kwargs)

            def forward_backward(*f_args, **f_kwargs):
                with context():
                    return schedule(*f_args, **f_kwargs)
            return forward_backward
        return get

    _wrap_in_training_loop("get_forward_backward_func", within_context)


# ----------------------------------------------------------------------------------------------
# Megatron's Adam class
# ----------------------------------------------------------------------------------------------
def use_megatron_adam(cls) -> None:
    """Megatron's optimizer builder (`_get_megatron_optimizer_based_on_param_groups`) builds
    `cls(params=..., lr=, weight_decay=, betas=, eps=, capturable=, adam_w_mode=)` for
    `--optimizer adam`, as it builds TE's or apex's FusedAdam; Megatron's distributed
    optimizer accepts it if it is a torch.optim.AdamW (its checkpoint reads torch's per-
    parameter `step`)."""
    from megatron.core import optimizer

    if not issubclass(cls, torch.optim.AdamW):
        raise TypeError(f"use_megatron_adam({cls.__name__}): Megatron's distributed optimizer "
                        "takes subclasses of torch.optim.AdamW only")
    optimizer.Adam = cls
    optimizer.USING_PYTORCH_OPTIMIZER = False  # the FusedAdam keywords (adam_w_mode)


# ----------------------------------------------------------------------------------------------
# Megatron's torch_dist checkpoint layout
# ----------------------------------------------------------------------------------------------
TORCH_DIST_BACKEND = "torch_dist"
# dist_checkpointing.save puts everything that is not a ShardedTensor / ShardedObject (the
# arguments, the iteration, ...) into one ShardedObject under this key; load_common_state_dict
# reads it back
COMMON_STATE_KEY = "common_state"


def sharded_object_entry(key: str, obj) -> tuple[str, io.BytesIO]:
    """(DCP key, bytes) under which Megatron's torch_dist save writes a ShardedObject `key`
    holding `obj` that is not sharded (global shape (1,), one replica): DCP's key is the
    object's unique_key, its bytes torch.save of the list of the rank's shards, [obj]."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    buffer = io.BytesIO()
    torch.save([obj], buffer)
    buffer.seek(0)
    return ShardedObject(key, None, (1,), (0,)).unique_key, buffer


def write_torch_dist_config(folder) -> None:
    """metadata.json in `folder`, what Megatron's save writes last and its loader looks for to
    take the folder as a torch_dist checkpoint (backend and format version)."""
    from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    strategy = TorchDistSaveShardedStrategy()
    save_config(CheckpointingConfig(strategy.backend, strategy.version), str(folder))


def transformer_engine_available() -> bool:
    """Whether Megatron's Transformer Engine extension found TE (its HAVE_TE): the one switch
    between TE's modules and recipes and our own."""
    try:
        from megatron.core.extensions.transformer_engine import HAVE_TE
    except ImportError:
        return False
    return bool(HAVE_TE)


def megatron_has_fused_adam() -> bool:
    """Whether Megatron's `Adam` is TE's or apex's FusedAdam (before use_megatron_adam)."""
    from megatron.core import optimizer

    return not optimizer.USING_PYTORCH_OPTIMIZER and optimizer.Adam is not torch.optim.AdamW


__all__ = ["TESTED_VERSION", "COMMON_STATE_KEY", "TORCH_DIST_BACKEND", "GPTPostprocessHook",
           "GemmCall", "OwnGemmHook", "around_forward_backward", "around_megatron_checkpointing",
           "around_megatron_evaluate", "layer_attention",
           "layer_post_mlp", "layer_pre_mlp_norm", "megatron_has_fused_adam",
           "one_pipeline_stage", "sharded_object_entry", "torch_optimizers_of",
           "use_forward_backward_func", "use_megatron_adam", "use_prebuilt_dataset_helpers",
           "write_torch_dist_config"]
