"""What our model adds to Megatron's own logging (W&B and TensorBoard) in `pretrain.py`: each
MoE layer's expert loads and biases, and the throughput by our FLOP count, under the training
job's names.

Megatron's loop moves the routers' biases itself: its `finalize_model_grads` sums the routers'
counts over the tensor x data x context-parallel group, moves each bias and zeroes the counts,
keeping the summed loads nowhere. `PretrainLog` wraps that function; the model provider
installs it on the model's config, where Megatron keeps a finalize function it finds instead of
setting its own. On each step Megatron logs (every `--tensorboard-log-interval` iterations) it
sums a copy of the counts over the same group before Megatron's update (divided by the
tensor-parallel size: those ranks count the same tokens), reads the biases after it, gathers
the pipeline stages' layers on the last rank (which holds Megatron's W&B run and TensorBoard
writer) and logs there, at Megatron's iteration number:

  moe/L<i>/imbalance, max_over_min, bias_spread, bias_norm  (moe.balance.ExpertLoads.metrics,
                                                          the training job's names)
  moe/expert_load     the load heatmap of the last steps and each layer's imbalance over the
                      run (train.plots), every `--expert-load-image-interval` iterations (W&B)
  tokens_per_s, model_tflops_per_gpu
                      over the iterations since the previous logged step (wall time between
                      the two calls; Megatron's loop syncs with the host every step), FLOPs
                      per token from flops.py as the training job counts them (Megatron's own
                      `throughput` uses its formula)

Steps not logged cost nothing (no copy, no collective).
"""

from __future__ import annotations

import collections
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist

from .flops import training_flops_per_token
from .moe.balance import LOAD_WINDOW_STEPS, gather_expert_loads, layer_label
from .moe.router import Router



def global_routers(model_chunks) -> list[tuple[str, Router]]:
    """This rank's routers under the full model's names (decoder layers by Megatron's global
    layer number, whatever the pipeline stage; MTP layers as they are), model order."""
    from megatron.core.transformer.transformer_layer import TransformerLayer

    found = []
    for chunk in model_chunks:
        for name, layer in chunk.named_modules():
            if not isinstance(layer, TransformerLayer):
                continue
            parts = name.split(".")
            while parts and parts[0] == "module":  # DDP / Float16Module wrappers
                parts.pop(0)
            for local, module in layer.named_modules():
                if isinstance(module, Router):
                    if parts[:1] == ["mtp"]:
                        full = ".".join(parts + [local])
                    else:
                        full = f"decoder.layers.{layer.layer_number - 1}.{local}"
                    found.append((full, module))
    return found


class PretrainLog:
    """Megatron's finalize function (`finalize`), with the expert loads, biases and throughput
    logged on the steps Megatron logs (module docstring). `args`: Megatron's parsed arguments
    (read at each call: curr_iteration, tensorboard_log_interval, expert_load_image_interval,
    global_batch_size, seq_length, world_size); `cfg`: our ModelConfig (the FLOPs per token);
    the writers default to Megatron's (None on every rank but the last)."""

    def __init__(self, finalize: Callable, args, cfg, *, wandb_writer=None,
                 tensorboard_writer=None, tp_dp_cp_group=None, tp_group=None, pp_group=None,
                 clock: Callable[[], float] = time.perf_counter):
        self.finalize, self.args, self.clock = finalize, args, clock
        self.flops_per_token = training_flops_per_token(cfg, args.seq_length)
        self._writers = (wandb_writer, tensorboard_writer)
        self._groups = (tp_dp_cp_group, tp_group, pp_group)
        self.records: list[dict] = []  # the logged metrics, for the imbalance curves
        self.recent: collections.deque = collections.deque(maxlen=LOAD_WINDOW_STEPS)
        self._last: Optional[tuple[int, float]] = None  # (iteration, time) of the last log
        self._image_dir: Optional[Path] = None

    @classmethod
    def install(cls, config, args) -> None:
        """Wrap Megatron's finalize_model_grads on `config` (a model's TransformerConfig, our
        ModelConfig as its `dsv3`), once; Megatron's `train` then uses it."""
        if isinstance(config.finalize_model_grads_func, cls):
            return
        from megatron.core.distributed import finalize_model_grads

        config.finalize_model_grads_func = cls(config.finalize_model_grads_func
                                               or finalize_model_grads, args, config.dsv3)

    def __call__(self, model_chunks, *args, **kwargs):
        iteration = self.args.curr_iteration + 1  # what Megatron logs this step as
        logged = iteration % max(1, self.args.tensorboard_log_interval) == 0
        named = global_routers(model_chunks) if logged else []
        counts = (torch.stack([r.local_tokens_per_expert for _, r in named]).clone()
                  if named else None)
        result = self.finalize(model_chunks, *args, **kwargs)
        if logged:
            self._log(iteration, named, counts)
        return result

    # ------------------------------------------------------------------------------------------
    def _groups_or_megatrons(self):
        from megatron.core import parallel_state

        tp_dp_cp, tp, pp = self._groups
        return (tp_dp_cp or parallel_state.get_tensor_and_data_parallel_group(
                    with_context_parallel=True),
                tp or parallel_state.get_tensor_model_parallel_group(),
                pp or parallel_state.get_pipeline_model_parallel_group())

    def _writers_or_megatrons(self):
        wandb_writer, tensorboard_writer = self._writers
        if wandb_writer is None and tensorboard_writer is None:
            from megatron.training.global_vars import get_tensorboard_writer, get_wandb_writer

            return get_wandb_writer(), get_tensorboard_writer()
        return wandb_writer, tensorboard_writer

    def _log(self, iteration: int, named: list, counts: Optional[torch.Tensor]) -> None:
        tp_dp_cp, tp, pp = self._groups_or_megatrons()
        rows = []
        if counts is not None:
            dist.all_reduce(counts, group=tp_dp_cp)
            counts = counts // tp.size()
            biases = torch.stack([r.expert_bias for _, r in named]).float().cpu()
            rows = [(name, load, bias) for (name, _), load, bias
                    in zip(named, counts.cpu(), biases)]
        loads = gather_expert_loads(rows, True, pp)
        now, last = self.clock(), self._last
        self._last = (iteration, now)
        wandb_writer, tensorboard_writer = self._writers_or_megatrons()
        if wandb_writer is None and tensorboard_writer is None:
            return
        metrics = {}
        if last is not None:
            tokens = (iteration - last[0]) * self.args.global_batch_size * self.args.seq_length
            metrics["tokens_per_s"] = tokens / (now - last[1])
            metrics["model_tflops_per_gpu"] = (metrics["tokens_per_s"] * self.flops_per_token
                                               / self.args.world_size / 1e12)
        if loads.names:
            metrics.update(loads.metrics())
            self.records.append({"step": iteration, **metrics})
            self.recent.append(loads.loads)
        if tensorboard_writer is not None:
            for key, value in metrics.items():
                tensorboard_writer.add_scalar(key, value, iteration)
        if wandb_writer is None:
            return
        interval = getattr(self.args, "expert_load_image_interval", 0)
        if loads.names and interval and iteration % interval == 0:
            metrics["moe/expert_load"] = self._image(loads.names, wandb_writer)
        wandb_writer.log(metrics, iteration)

    def _image(self, names: list[str], wandb_writer):
        from .train.plots import plot_expert_load

        if self._image_dir is None:
            self._image_dir = Path(tempfile.mkdtemp(prefix="expert_load_"))
        path = self._image_dir / "expert_load.png"  # W&B copies it when it is logged
        plot_expert_load([layer_label(n) for n in names],
                         torch.stack(list(self.recent)).sum(0).numpy(), self.records, path,
                         window_steps=len(self.recent))
        return wandb_writer.Image(str(path))
