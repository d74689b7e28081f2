"""One optimizer step of the training job, and evaluation.

What one optimizer step does (each rank; TP ranks of one DP replica see the same batches):
  1. for each of `--grad-accum` micro-batches m: batch = get_batch(train, step, m, dp_rank);
     loss_m = mean CE + mtp_loss(CE_k, lambda(tokens_seen)); backward(loss_m / grad_accum).
     The routers' sequence-wise balance loss enters through its own injected gradient
     (`moe.balance.set_balance_loss_scale` = 1 / grad_accum, the same normalisation).
     With a pipeline (PP > 1) this is one call of the schedule's forward_backward_func
     (pipeline.py). With `--expert-wgrad step` the routed experts' weight gradients of all
     micro-batches are computed after the last one, one grouped GEMM per projection
     (moe/expert_wgrad.py);
  2. gradients reduced by group (`gradients.reduce_gradients`): the DP mean of the replicas'
     losses for every parameter; non-expert ones summed over DP, routed-expert shards (with
     expert parallelism, `--expert-parallel-size`) summed over the expert-data-parallel group,
     both divided by the DP size;
  3. global gradient norm (TP-split parameters' squares summed over TP, expert shards' over TP
     and EP, replicated ones counted once), clipped to `--clip-grad` (with the fused AdamW of
     a GPU, inside its step: gradients.clip_gradients);
  4. the step's one host sync, before anything is applied: the losses (DP means), the norm
     (already global) and two flags max-reduced over every rank (a non-finite loss on this
     rank; the signal that asked this rank to stop, `stop_signal`). A non-finite loss or norm
     raises `NonFiniteStep` on every rank alike: no optimizer step, no bias update;
  5. AdamW at lr(step): linear warm-up, then cosine decay to `--min-lr`;
  6. `update_expert_biases` over the DP group: aux-loss-free balancing, each router's expert
     bias moves by `bias_update_rate` up for its under-loaded experts and down for the
     over-loaded ones (moe/balance.py; the bias only chooses experts, the gate weights come
     from the raw scores). The DP group contains the EP group, so every token of the step is
     counted once.

The metrics a step returns are DP means, and each MTP depth's CE; per MoE layer (labelled
`L<i>` / `mtp<k>`) they add the step's load imbalance (max / mean), max / min load, and the
bias's spread and norm (`ExpertLoads.metrics`). With the metrics comes the stop request every
rank agreed on (`StepOutcome.stop_signal`): one rank's signal reaches all of them at the same
step, so all save the same step.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import torch
import torch.distributed as dist

from ..config import ModelConfig
from ..data import get_batch
from ..fp8.weight_cache import weights_fixed
from ..gradients import clip_gradients, reduce_gradients
from ..moe.expert_wgrad import ExpertGradMerger
from .args import TrainError, uses_bf16_autocast
from .losses import LOSS_LABELS, LOSS_NAMES, depth_ce_names, step_sums
from .master_weights import MasterWeights
from .pipeline import Pipeline

@dataclasses.dataclass
class Run:
    """Everything a step needs; `step` and `tokens_seen` count completed optimizer steps."""

    args: argparse.Namespace
    cfg: ModelConfig
    pg: object
    device: torch.device
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    corpus: object
    out_dir: Optional[Path] = None
    pipeline: Optional[Pipeline] = None  # PP > 1: the stages and their schedule
    masters: Optional[MasterWeights] = None  # bf16 parameters: their fp32 masters
    expert_grads: Optional[ExpertGradMerger] = None  # --expert-wgrad step
    step: int = 0
    tokens_seen: int = 0
    wandb_id: Optional[str] = None

    @property
    def dp_rank(self) -> int:
        return self.pg.dp.rank()

    @property
    def tokens_per_step(self) -> int:
        a = self.args
        return a.micro_batch_size * a.seq_len * a.grad_accum * self.pg.dp.size()

    def trained_params(self) -> list[torch.Tensor]:
        """The fp32 tensors AdamW updates, whose `.grad` is the step's gradient: the masters
        of bf16 parameters, or the fp32 parameters that received a gradient."""
        if self.masters is not None:
            return self.masters.params
        return [p for p in self.model.parameters() if p.grad is not None]

    def zero_grad(self) -> None:
        """After the optimizer step: the fp32 parameters' gradients dropped (with masters,
        MasterAdamW's step has already put them into the model and zeroed their sums)."""
        if self.masters is None:
            self.optimizer.zero_grad(set_to_none=True)

    def model_state_dict(self) -> dict:
        """The model's state with fp32 weights (the masters when the parameters are bf16)."""
        return (self.masters.state_dict() if self.masters is not None
                else self.model.state_dict())

    def load_model_state_dict(self, state: dict) -> None:
        if self.masters is not None:
            self.masters.load_state_dict(state)
        else:
            self.model.load_state_dict(state)

    def autocast(self):
        if uses_bf16_autocast(self.args, self.device):
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()


def lr_at(step: int, args) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warm-up, then cosine."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = min(1.0, (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps))
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * progress))


def moe_layers(model: torch.nn.Module) -> list:
    from ..moe.layer import DeepSeekMoE

    return [m for m in model.modules() if isinstance(m, DeepSeekMoE)]


def forward_losses(run: Run, input_ids: torch.Tensor, labels: torch.Tensor, mtp_lambda: float):
    """(loss to backpropagate, next-token CE, weighted MTP loss, each depth's MTP CE [D])."""
    from ..mtp import weighted_lm_loss

    with run.autocast():
        out = run.model(input_ids, None, None, labels=labels)
    return weighted_lm_loss(out, mtp_lambda)


def to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU batch onto `device` without a host sync on GPU: a copy from pageable memory waits
    for everything queued on the stream, one from pinned memory is queued behind it."""
    if device.type != "cuda":
        return batch.to(device)
    return batch.pin_memory().to(device, non_blocking=True)


class StepOutcome(NamedTuple):
    metrics: dict      # DP means of the losses, the norm, lr, tokens seen, per-layer MoE stats
    loads: object      # moe.balance.ExpertLoads of the step
    stop_signal: int   # the largest signal number any rank passed in (0: none): stop after it


class NonFiniteStep(TrainError):
    """A step whose loss or gradient norm is NaN or infinite, raised on every rank before the
    step is applied (no optimizer step, no bias update). `step` is its 1-based number."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


def _micro_batches(run: Run, layers: list, mtp_lambda: float,
                   train_batch: Callable[[int], tuple]) -> torch.Tensor:
    """Step 1: forward and backward of the step's micro-batches (through the pipeline's
    schedule with PP > 1); the `step_sums` of each, summed."""
    args = run.args
    if run.pipeline is not None:
        return run.pipeline.run(run, args.grad_accum, mtp_lambda, train_batch)
    sums = 0
    for micro in range(args.grad_accum):
        if run.expert_grads is not None:  # its backward stashes into the next segment
            run.expert_grads.begin_micro_batch()
        loss, lm, mtp, depth_ce = forward_losses(run, *train_batch(micro), mtp_lambda)
        (loss / args.grad_accum).backward()
        balance = sum((m.last_aux_loss for m in layers if m.last_aux_loss is not None),
                      torch.zeros((), device=run.device))
        sums = sums + step_sums(loss.detach() + balance, lm.detach(), mtp.detach(),
                                depth_ce, balance)
    if run.expert_grads is not None:  # the routed experts' weight gradients of the step
        run.expert_grads.flush()
    return sums


def train_step(run: Run, stop_signal: Optional[Callable[[], int]] = None) -> StepOutcome:
    """One optimizer step (module docstring, steps 1-6). `stop_signal()`, asked in step 4 (after
    the backward, so that a signal received during the step counts): the number of the signal
    that asked this rank to stop, 0 for none; agreed over every rank and returned."""
    from ..moe.balance import update_expert_biases

    args, model = run.args, run.model
    mtp_lambda = run.cfg.mtp.loss_weight(run.tokens_seen)
    lr = lr_at(run.step, args)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    layers = moe_layers(model)

    def train_batch(micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        input_ids, labels = get_batch(run.corpus.train, batch_size=args.micro_batch_size,
                                      seq_len=args.seq_len, seed=args.seed, step=run.step,
                                      micro_batch=micro, rank=run.dp_rank)
        return to_device(input_ids, run.device), to_device(labels, run.device)

    # Step 1: micro-batches.  sums: `step_sums` of each (per micro-batch means); no weight
    # changes before the optimizer step, so FP8 weights are quantized once (fp8/weight_cache.py)
    with weights_fixed():
        sums = _micro_batches(run, layers, mtp_lambda, train_batch)
    if run.masters is not None:
        run.masters.finish_accumulation()
    params = run.trained_params()
    # Step 2: gradient reduction: DP for replicated parameters, expert-DP for expert shards.
    reduce_gradients(params, run.pg)
    # Step 3: clipping by the global norm (each pipeline stage counted once).
    norm_params = run.pipeline.norm_params() if run.pipeline is not None else None
    grad_norm = clip_gradients(params, args.clip_grad, run.pg, norm_params, run.optimizer)
    # Step 4: the one host sync; every rank agrees whether to go on (module docstring).
    loss_names = LOSS_NAMES + depth_ce_names(run.cfg.mtp.num_layers)
    values = dict(zip(loss_names + ("grad_norm", "non_finite_loss", "stop_signal"),
                      _agreed_step_values(run, sums, grad_norm,
                                          stop_signal() if stop_signal is not None else 0)))
    if not all(math.isfinite(values[name]) for name in loss_names + ("grad_norm",)) \
            or values["non_finite_loss"]:
        raise NonFiniteStep(_non_finite_message(run, values, lr), run.step + 1)
    # Step 5: AdamW.
    run.optimizer.step()
    run.zero_grad()
    run.step += 1
    run.tokens_seen += run.tokens_per_step
    # Step 6: aux-loss-free balancing, loads summed over the DP replicas (EP included) of the
    # routers' stage (and over DualPipe's two copies of it first).
    if run.pipeline is not None:
        run.pipeline.add_mirrored_router_loads()
    loads = update_expert_biases(model, group=run.pg.dp, tokens_seen=run.tokens_seen,
                                 rate=run.cfg.moe.bias_update_rate,
                                 stop_tokens=run.cfg.moe.bias_update_stop_tokens)

    metrics = {"step": run.step, **{name: values[name] for name in loss_names},
               "mtp_lambda": mtp_lambda, "lr": lr, "grad_norm": values["grad_norm"],
               "tokens_seen": run.tokens_seen}
    if run.pipeline is not None:
        loads = run.pipeline.gather_expert_loads(loads)
    metrics.update(loads.metrics())
    return StepOutcome(metrics, loads, int(values["stop_signal"]))


def _agreed_step_values(run: Run, sums: torch.Tensor, grad_norm: torch.Tensor,
                        stop_signal: int) -> list[float]:
    """Step 4's values (the losses as DP means, grad_norm, non_finite_loss, stop_signal), the
    same on every rank, through one host sync. The losses are DP means (a pipeline has summed
    them over its ranks), the norm is global; the two flags are max-reduced over the world, so
    that a rank whose own loss is not finite, or which received a signal, tells every other."""
    means = sums / run.args.grad_accum
    if run.pg.dp.size() > 1:
        dist.all_reduce(means, group=run.pg.dp)
        means /= run.pg.dp.size()
    flags = torch.stack([(~torch.isfinite(sums)).any().float(),
                         torch.full((), float(stop_signal), device=sums.device)])
    if dist.get_world_size() > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return torch.cat([means, grad_norm.float().view(1), flags]).tolist()


def _non_finite_message(run: Run, values: dict, lr: float) -> str:
    """What was not finite in the step after run.step, what was, and the parameters' state
    (collective: every rank calls it, as every rank raises NonFiniteStep together)."""
    step = run.step + 1
    shown = {name: f"{LOSS_LABELS[name]} {values[name]:.6g}" for name in LOSS_NAMES}
    shown["grad_norm"] = f"gradient norm {values['grad_norm']:.6g}"
    bad = [text for name, text in shown.items() if not math.isfinite(values[name])]
    finite = [text for name, text in shown.items() if math.isfinite(values[name])]
    if all(math.isfinite(values[name]) for name in LOSS_NAMES) and not values["non_finite_loss"]:
        cause = "the losses are finite: it arose in the backward pass"
    else:
        cause = "it arose in the forward pass"
    if not bad:  # finite means, yet a rank's own loss was not (its DP group's mean hides it)
        bad = ["one rank's own loss"]
    nan_params, (largest, largest_name) = _parameter_health(run)
    if nan_params:
        weights = (f"parameters holding NaN/Inf: {', '.join(nan_params[:5])}"
                   + (f" and {len(nan_params) - 5} more" if len(nan_params) > 5 else ""))
    else:
        weights = f"every parameter is finite, the largest |weight| {largest:.3g} ({largest_name})"
    return (f"step {step} is not finite: {', '.join(bad)} ({cause}; "
            f"{', '.join(finite) if finite else 'nothing is finite'}); {weights}. Nothing of step "
            f"{step} was applied: no optimizer step, no expert-bias update, no checkpoint. Lower "
            f"--lr (now {run.args.lr:g}; step {step} ran at {lr:.3g}), raise --warmup-steps (now "
            f"{run.args.warmup_steps}), keep --clip-grad on (now {run.args.clip_grad:g}), or "
            f"check the data (--data-dir {run.args.data_dir})")


def _parameter_health(run: Run) -> tuple[list[str], tuple[float, str]]:
    """Over every rank: the names of the parameters holding a NaN/Inf value, and the largest
    finite |weight| with its parameter's name (each prefixed "rank r: " when there are several
    ranks). Collective over the world group."""
    nan_params, largest = [], (0.0, "")
    prefix = f"rank {dist.get_rank()}: " if dist.get_world_size() > 1 else ""
    with torch.no_grad():
        for name, param in run.model.named_parameters():
            if not torch.isfinite(param).all():
                nan_params.append(prefix + name)
            elif param.numel() and (biggest := param.abs().max().item()) > largest[0]:
                largest = (biggest, prefix + name)
    if dist.get_world_size() == 1:
        return nan_params, largest
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (nan_params, largest))
    return ([name for names, _ in everyone for name in names],
            max((big for _, big in everyone), key=lambda big: big[0]))


def eval_stance(run: Run):
    """The validation forwards run eager when the training modules are CUDA graphs: graphs
    recorded for training replayed without grad overwrote outputs still in use (measured on an
    H200: "accessing tensor output of CUDAGraphs that has been overwritten" at the first
    evaluation of the proxy job); validation is a few forwards per eval interval."""
    from .build import uses_cuda_graphs

    if uses_cuda_graphs(run.args, run.device):
        return torch.compiler.set_stance("force_eager")
    return nullcontext()


@torch.no_grad()
def evaluate(run: Run) -> dict:
    """Mean next-token and MTP CE over `--eval-batches` fixed validation batches (DP mean)."""
    args = run.args
    run.model.eval()

    def val_batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        input_ids, labels = get_batch(run.corpus.val, batch_size=args.micro_batch_size,
                                      seq_len=args.seq_len, seed=args.seed, step=i,
                                      rank=run.dp_rank)
        return to_device(input_ids, run.device), to_device(labels, run.device)

    with eval_stance(run):
        if run.pipeline is not None:
            sums = run.pipeline.run(run, args.eval_batches, 0.0, val_batch,
                                    forward_only=True)[[1, 3]]
        else:
            sums = 0
            for i in range(args.eval_batches):
                parts = forward_losses(run, *val_batch(i), mtp_lambda=0.0)
                sums = sums + step_sums(*parts, torch.zeros_like(parts[1]))[[1, 3]]
    run.model.train()
    sums /= args.eval_batches
    if run.pg.dp.size() > 1:
        dist.all_reduce(sums, group=run.pg.dp)
        sums /= run.pg.dp.size()
    val_lm, val_mtp = sums.tolist()
    return {"val_loss": val_lm, "val_mtp_ce": val_mtp}
