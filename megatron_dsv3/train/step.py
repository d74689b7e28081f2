"""One optimizer step of the training job, and evaluation.

What one optimizer step does (each rank; TP ranks of one DP replica see the same batches):
  1. for each of `--grad-accum` micro-batches m: batch = get_batch(train, step, m, dp_rank);
     loss_m = mean CE + mtp_loss(CE_k, lambda(tokens_seen)); backward(loss_m / grad_accum).
     The routers' sequence-wise balance loss enters through its own injected gradient
     (`moe.balance.set_balance_loss_scale` = 1 / grad_accum, the same normalisation).
     With a pipeline (PP > 1) this is one call of the schedule's forward_backward_func
     (pipeline.py);
  2. gradients reduced by group (`gradients.reduce_gradients`): the DP mean of the replicas'
     losses for every parameter; non-expert ones summed over DP, routed-expert shards (with
     expert parallelism, `--expert-parallel-size`) summed over the expert-data-parallel group,
     both divided by the DP size;
  3. global gradient norm (TP-split parameters' squares summed over TP, expert shards' over TP
     and EP, replicated ones counted once), clipped to `--clip-grad`;
  4. AdamW at lr(step): linear warm-up, then cosine decay to `--min-lr`;
  5. `update_expert_biases` over the DP group: aux-loss-free balancing, each router's expert
     bias moves by `bias_update_rate` up for its under-loaded experts and down for the
     over-loaded ones (moe/balance.py; the bias only chooses experts, the gate weights come
     from the raw scores). The DP group contains the EP group, so every token of the step is
     counted once.

The metrics a step returns are DP means; per MoE layer (labelled `L<i>` / `mtp<k>`) they add
the step's load imbalance and the bias spread.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from ..config import ModelConfig
from ..data import get_batch
from ..gradients import clip_gradients, reduce_gradients
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

    def autocast(self):
        if uses_bf16_autocast(self.args, self.device):
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()


def uses_bf16_autocast(args, device: torch.device) -> bool:
    return args.amp == "bf16" or (args.amp == "auto" and device.type == "cuda")


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
    """(loss to backpropagate, next-token CE, weighted MTP loss, unweighted MTP CE)."""
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


def train_step(run: Run):
    """One optimizer step (module docstring, steps 1-5): (metrics as DP means, ExpertLoads)."""
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

    # Step 1: micro-batches.  sums: loss, lm, mtp, mtp_ce, balance (per micro-batch means)
    if run.pipeline is not None:
        sums = run.pipeline.run(run, args.grad_accum, mtp_lambda, train_batch)
    else:
        sums = torch.zeros(5, device=run.device)
        for micro in range(args.grad_accum):
            loss, lm, mtp, mtp_ce = forward_losses(run, *train_batch(micro), mtp_lambda)
            (loss / args.grad_accum).backward()
            balance = sum((m.last_aux_loss for m in layers if m.last_aux_loss is not None),
                          torch.zeros((), device=run.device))
            sums += torch.stack([loss.detach() + balance, lm.detach(), mtp.detach(), mtp_ce,
                                 balance]).float()
    params = [p for p in model.parameters() if p.grad is not None]
    # Step 2: gradient reduction: DP for replicated parameters, expert-DP for expert shards.
    reduce_gradients(params, run.pg)
    # Step 3: clipping by the global norm (each pipeline stage counted once).
    norm_params = run.pipeline.norm_params() if run.pipeline is not None else None
    grad_norm = clip_gradients(params, args.clip_grad, run.pg, norm_params)
    # Step 4: AdamW.
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    run.tokens_seen += run.tokens_per_step
    # Step 5: aux-loss-free balancing, loads summed over the DP replicas (EP included) of the
    # routers' stage (and over DualPipe's two copies of it first).
    if run.pipeline is not None:
        run.pipeline.add_mirrored_router_loads()
    loads = update_expert_biases(model, group=run.pg.dp, tokens_seen=run.tokens_seen,
                                 rate=run.cfg.moe.bias_update_rate,
                                 stop_tokens=run.cfg.moe.bias_update_stop_tokens)

    means = sums / args.grad_accum
    if run.pg.dp.size() > 1:
        dist.all_reduce(means, group=run.pg.dp)
        means /= run.pg.dp.size()
    loss, lm, mtp, mtp_ce, balance = means.tolist()
    metrics = {"step": run.step, "loss": loss, "lm_loss": lm, "mtp_loss": mtp, "mtp_ce": mtp_ce,
               "mtp_lambda": mtp_lambda, "balance_loss": balance, "lr": lr,
               "grad_norm": grad_norm.item(), "tokens_seen": run.tokens_seen}
    if run.pipeline is not None:
        loads, spreads = run.pipeline.gather_expert_loads(loads)
    else:
        spreads = bias_spreads(model)
    metrics.update(expert_metrics(loads, spreads))
    return metrics, loads


def bias_spreads(model: torch.nn.Module) -> list[float]:
    """max - min of each router's expert bias, in model order."""
    from ..moe.balance import routers

    return [(r.expert_bias.max() - r.expert_bias.min()).item() for _, r in routers(model)]


def expert_metrics(loads, spreads: list[float]) -> dict:
    """Per MoE layer: load imbalance (max/mean) of this step and the bias spread (max - min)."""
    out = {}
    for name, value, spread in zip(loads.names, loads.imbalance().tolist(), spreads):
        label = layer_label(name)
        out[f"moe/{label}/imbalance"] = value
        out[f"moe/{label}/bias_spread"] = spread
    return out


def layer_label(router_name: str) -> str:
    """'decoder.layers.1.mlp.router' -> 'L1'; 'mtp.layers.0.transformer_layer...' -> 'mtp0'."""
    parts = router_name.split(".")
    if parts[0] == "decoder":
        return f"L{parts[2]}"
    if parts[0] == "mtp":
        return f"mtp{parts[2]}"
    return router_name.removesuffix(".router")


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

    if run.pipeline is not None:
        sums = run.pipeline.run(run, args.eval_batches, 0.0, val_batch, forward_only=True)[[1, 3]]
    else:
        sums = torch.zeros(2, device=run.device)
        for i in range(args.eval_batches):
            _, lm, _, mtp_ce = forward_losses(run, *val_batch(i), mtp_lambda=0.0)
            sums += torch.stack([lm, mtp_ce]).float()
    run.model.train()
    sums /= args.eval_batches
    if run.pg.dp.size() > 1:
        dist.all_reduce(sums, group=run.pg.dp)
        sums /= run.pg.dp.size()
    val_lm, val_mtp = sums.tolist()
    return {"val_loss": val_lm, "val_mtp_ce": val_mtp}
