"""The main job: train a preset end to end on the bundled corpus (`python -m megatron_dsv3.train`).

What one optimizer step does (each rank; TP ranks of one DP replica see the same batches):
  1. for each of `--grad-accum` micro-batches m: batch = get_batch(train, step, m, dp_rank);
     loss_m = mean CE + mtp_loss(CE_k, lambda(tokens_seen)); backward(loss_m / grad_accum).
     The routers' sequence-wise balance loss enters through its own injected gradient
     (`DeepSeekMoE.aux_loss_scale` = 1 / grad_accum, the same normalisation).
  2. gradients reduced by group (`reduce_gradients`): the DP mean of the replicas' losses for
     every parameter; non-expert ones summed over DP, routed-expert shards (with expert
     parallelism, `--expert-parallel-size`) summed over the expert-data-parallel group, both
     divided by the DP size;
  3. global gradient norm (TP-split parameters' squares summed over TP, expert shards' over TP
     and EP, replicated ones counted once), clipped to `--clip-grad`;
  4. AdamW at lr(step): linear warm-up, then cosine decay to `--min-lr`;
  5. `update_expert_biases` over the DP group (aux-loss-free balancing, DESIGN.md section 2;
     the DP group contains the EP group, so every token of the step is counted once).

Pipeline parallelism (`--pipeline-parallel-size PP --pipeline-schedule dualpipev|dualpipe`,
pipeline/model_stages.py), composed with TP and EP: WORLD = PP x DP x TP in Megatron's own
layout (`parallel.init_distributed`: rank = tp_rank + TP * (dp_rank + DP * pp_rank), EP carved
out of each stage's DP ranks). Every rank builds the full model from the seed (its TP/EP shard
of it) and keeps the two stages its schedule places there; step 1 is one call of the
schedule's Megatron-style `forward_backward_func` (pipeline/megatron_adapter.py) over the
`--grad-accum` micro-batches, the MoE all-to-alls over the stage's EP group (DualPipe then adds
its mirrored copies' gradients and router loads); steps 2 and 5 use the groups of the ranks
holding the same stages (`dp`, `expt_dp`); the gradient norm sums every stage once over the
pipeline; losses are summed over the pipeline ranks. `--num-layers` makes a preset's layers
split evenly.

Reproducibility. Every random draw after initialisation is keyed or checkpointed: batches are a
pure function of (seed, step, micro-batch, dp_rank); the checkpoint holds the weights (with the
routers' `expert_bias`), the AdamW state, step, tokens seen and every RNG state. A resumed run
therefore repeats an uninterrupted one bit for bit on CPU. The initial weights are drawn as the
full TP=1 model and each TP/EP rank keeps its slice, so a seed gives the same model at any TP
and EP size.

Deviations from Megatron's own `pretrain()`: no Megatron DDP or distributed optimizer (they
assume CUDA streams; DP here is a plain all-reduce of the gradients, and each rank keeps a full
AdamW state for its TP/EP slice); parameters and AdamW stay fp32 (on GPU the forward runs under
bf16 autocast); pipeline parallelism only through DualPipe/DualPipeV. Checkpoints are per-rank
torch files written to a temporary folder and renamed, then a `latest` marker is replaced
atomically (with PP each rank's file holds its two stages).

Outputs in --out-dir: checkpoints/step_<N>/, metrics.jsonl, loss_curve.png, expert_load.png,
expert_load.json and (unless --no-wandb) the W&B run under wandb/ (offline without an API key).
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    # Megatron's jit_fuser is torch.compile: on CPU it compiles C++ for ~15 s and gains nothing.
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import argparse  # noqa: E402
import collections  # noqa: E402
import copy  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from contextlib import nullcontext  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Optional  # noqa: E402

import numpy as np  # noqa: E402
import torch.distributed as dist  # noqa: E402

from .config import PRESETS, ConfigError, ModelConfig, preset, to_megatron_config  # noqa: E402
from .data import DEFAULT_DATA_DIR, get_batch, load_corpus  # noqa: E402

CHECKPOINT_FORMAT = 1
LOAD_WINDOW_STEPS = 20  # expert_load.png shows the loads summed over the last this many steps
# Arguments that fix the data stream and the model: a resume must keep them.
RESUME_INVARIANT_ARGS = ("preset", "micro_batch_size", "grad_accum", "seq_len", "seed",
                         "tensor_parallel_size", "expert_parallel_size",
                         "pipeline_parallel_size", "pipeline_schedule")
PIPELINE_SCHEDULES = ("dualpipev", "dualpipe")


class TrainError(ValueError):
    """A problem with what the run was asked to do (a checkpoint, the data); the message says
    what to change. The command line prints it without a traceback."""


# ----------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m megatron_dsv3.train",
        description="Train a DeepSeek-V3 preset (MLA, DeepSeekMoE, MTP) on the bundled corpus. "
                    "Defaults: the tiny preset, a few minutes on 2 CPU cores.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = p.add_argument
    add("--preset", default="tiny", choices=sorted(PRESETS), help="model preset")
    add("--steps", type=int, default=300, help="optimizer steps in total")
    add("--micro-batch-size", type=int, default=16, help="sequences per micro-batch per DP rank")
    add("--grad-accum", type=int, default=2, help="micro-batches per optimizer step")
    add("--seq-len", type=int, default=None, help="tokens per sequence (default: the preset's "
                                                  "max_seq_len)")
    add("--lr", type=float, default=3e-3, help="peak learning rate")
    add("--min-lr", type=float, default=3e-4, help="learning rate at the end of the cosine")
    add("--warmup-steps", type=int, default=30, help="linear warm-up steps (then cosine decay)")
    add("--weight-decay", type=float, default=0.1, help="AdamW decoupled weight decay "
                                                        "(matrices only)")
    add("--clip-grad", type=float, default=1.0, help="max global gradient norm (0: no clipping)")
    add("--tensor-parallel-size", type=int, default=1, help="TP size; data parallelism is "
                                                            "WORLD_SIZE / TP")
    add("--expert-parallel-size", type=int, default=1,
        help="EP size: routed experts sharded over EP data-parallel ranks (must divide "
             "WORLD_SIZE / TP and the preset's number of experts)")
    add("--pipeline-parallel-size", type=int, default=1,
        help="PP size: the decoder layers cut into stages over PP ranks (DP = WORLD_SIZE / PP); "
             "needs --pipeline-schedule")
    add("--pipeline-schedule", default=None, choices=PIPELINE_SCHEDULES,
        help="bidirectional pipeline schedule for PP > 1: dualpipev (2 stages per rank, any "
             "PP >= 2) or dualpipe (PP stages, each held twice; PP even)")
    add("--num-layers", type=int, default=None,
        help="decoder layers (default: the preset's), e.g. to split evenly over pipeline stages")
    add("--seed", type=int, default=1234, help="seed of the initial weights and of the batches")
    add("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="tokenizer.json + *.txt")
    add("--val-fraction", type=float, default=0.05, help="tail of the corpus held out")
    add("--out-dir", type=Path, default=None, help="run folder (default: runs/<preset>-<time>)")
    add("--resume", default=None, help="checkpoint folder (step_<N>, or a checkpoints/ or run "
                                       "folder: its latest), or 'auto': the latest in --out-dir "
                                       "if there is one")
    add("--save-interval", type=int, default=100, help="checkpoint every N steps and at the "
                                                       "end (0: no checkpoints)")
    add("--eval-interval", type=int, default=50, help="validate every N steps and at the end "
                                                      "(0: never)")
    add("--eval-batches", type=int, default=8, help="validation micro-batches per DP rank")
    add("--wandb-project", default="megatron-dsv3", help="Weights & Biases project")
    add("--no-wandb", action="store_true", help="do not log to Weights & Biases")
    add("--device", default="auto", choices=("auto", "cpu", "cuda"),
        help="auto: cuda when available")
    add("--amp", default="auto", choices=("auto", "off", "bf16"),
        help="autocast of the forward; auto: bf16 on cuda, off on cpu")
    return p


def _arg_error(flag: str, value, fix: str) -> str:
    return f"{flag} {value} is invalid: {fix}"


def validate_args(args: argparse.Namespace, cfg: ModelConfig, world_size: int) -> list[str]:
    """Every problem with the arguments, each naming the flag and what to change."""
    problems = []

    def need(ok: bool, flag: str, value, fix: str) -> None:
        if not ok:
            problems.append(_arg_error(flag, value, fix))

    for flag in ("steps", "micro_batch_size", "grad_accum", "eval_batches",
                 "tensor_parallel_size", "expert_parallel_size", "pipeline_parallel_size"):
        value = getattr(args, flag)
        need(value > 0, "--" + flag.replace("_", "-"), value, "must be a positive integer")
    for flag in ("save_interval", "eval_interval", "warmup_steps"):
        value = getattr(args, flag)
        need(value >= 0, "--" + flag.replace("_", "-"), value, "must be >= 0")
    need(args.seq_len <= cfg.max_seq_len, "--seq-len", args.seq_len,
         f"preset '{cfg.name}' has max_seq_len={cfg.max_seq_len}: pass --seq-len "
         f"{cfg.max_seq_len} or less")
    need(args.seq_len > cfg.mtp.num_layers + 1, "--seq-len", args.seq_len,
         f"must exceed MTP depth + 1 = {cfg.mtp.num_layers + 1} so every depth has a target")
    need(args.lr > 0, "--lr", args.lr, "must be > 0")
    need(0 <= args.min_lr <= args.lr, "--min-lr", args.min_lr, f"must lie in [0, --lr={args.lr}]")
    need(args.warmup_steps <= args.steps, "--warmup-steps", args.warmup_steps,
         f"must not exceed --steps={args.steps}")
    need(args.weight_decay >= 0, "--weight-decay", args.weight_decay, "must be >= 0")
    need(args.clip_grad >= 0, "--clip-grad", args.clip_grad, "must be >= 0 (0 disables it)")
    need(0 < args.val_fraction < 1, "--val-fraction", args.val_fraction,
         "must lie strictly between 0 and 1")
    need(args.device != "cuda" or torch.cuda.is_available(), "--device", args.device,
         "no CUDA device is visible here: use --device cpu or auto")
    need(not (args.amp == "bf16" and args.device == "cpu"), "--amp", args.amp,
         "bf16 autocast is for cuda; use --amp off (or auto) on cpu")
    need(args.resume != "auto" or args.out_dir is not None, "--resume", args.resume,
         "'auto' looks in --out-dir, whose default is a new timestamped folder: pass --out-dir "
         "of the run to continue")
    tp, pp = args.tensor_parallel_size, args.pipeline_parallel_size
    if tp > 0:
        need(world_size % tp == 0, "--tensor-parallel-size", tp,
             f"must divide the number of processes ({world_size}); launch NPROC = a multiple "
             "of TP")
        for field, width in (("mla.num_heads", cfg.mla.num_heads),
                             ("moe.expert_ffn_size", cfg.moe.expert_ffn_size),
                             ("moe.dense_ffn_size", cfg.moe.dense_ffn_size),
                             ("vocab_size", cfg.vocab_size)):
            need(width % tp == 0, "--tensor-parallel-size", tp,
                 f"must divide the preset's {field}={width}; pick a divisor of it")
    ep = args.expert_parallel_size
    if ep > 0 and tp > 0 and pp > 0 and world_size % (tp * pp) == 0:
        dp = world_size // (tp * pp)
        if pp == 1:
            size = f"WORLD_SIZE / TP = {world_size} / {tp} = {dp} (EP groups are carved out of DP)"
        else:
            size = (f"of a pipeline stage WORLD_SIZE / (TP * PP) = {world_size} / ({tp} * {pp}) "
                    f"= {dp} (EP groups are carved out of the DP ranks holding the same stages)")
        need(dp % ep == 0, "--expert-parallel-size", ep,
             f"must divide the data-parallel size {size}; launch NPROC = a multiple of TP * "
             + ("EP" if pp == 1 else "PP * EP"))
    if ep > 0:
        need(cfg.moe.num_experts % ep == 0, "--expert-parallel-size", ep,
             f"must divide the preset's moe.num_experts={cfg.moe.num_experts} (each EP rank "
             "holds whole experts); pick a divisor of it")
    problems += _pipeline_problems(args, cfg, world_size)
    return problems


def _pipeline_problems(args, cfg: ModelConfig, world_size: int) -> list[str]:
    """What is wrong with the pipeline flags, each naming the flag and the fix."""
    pp, schedule = args.pipeline_parallel_size, args.pipeline_schedule
    if pp == 1 and schedule is not None:
        return [_arg_error("--pipeline-schedule", schedule, "needs --pipeline-parallel-size >= 2 "
                           "(with one pipeline rank nothing is pipelined): drop the flag")]
    if pp <= 1:
        return []
    if schedule is None:
        return [_arg_error("--pipeline-parallel-size", pp, "needs a schedule: add "
                           "--pipeline-schedule dualpipev (or dualpipe)")]
    problems = []

    def need(ok: bool, flag: str, value, fix: str) -> None:
        if not ok:
            problems.append(_arg_error(flag, value, fix))

    tp = args.tensor_parallel_size
    need(world_size % pp == 0, "--pipeline-parallel-size", pp,
         f"must divide the number of processes ({world_size}); launch NPROC = a multiple of PP")
    need(tp < 1 or world_size % pp or world_size % (tp * pp) == 0, "--tensor-parallel-size", tp,
         f"times --pipeline-parallel-size {pp} must divide the number of processes "
         f"({world_size}): WORLD = PP x DP x TP; launch NPROC = a multiple of TP * PP = "
         f"{tp * pp}")
    need(schedule != "dualpipe" or pp % 2 == 0, "--pipeline-parallel-size", pp,
         "dualpipe needs an even pipeline size: use an even PP or --pipeline-schedule dualpipev")
    stages = 2 * pp if schedule == "dualpipev" else pp
    need(cfg.num_layers % stages == 0, "--num-layers", cfg.num_layers,
         f"{schedule} with PP={pp} cuts the decoder into {stages} stages: pass --num-layers "
         f"a multiple of {stages}")
    batches = [("--grad-accum", args.grad_accum)]
    if args.eval_interval:
        batches.append(("--eval-batches", args.eval_batches))
    for flag, value in batches:
        need(value >= 2 * pp, flag, value, f"{schedule} needs at least 2 * PP = {2 * pp} "
             "micro-batches per pipeline step")
        need(schedule != "dualpipe" or value % 2 == 0, flag, value,
             "dualpipe feeds half the micro-batches from each end: pass an even number")
    return problems


def parse_args(argv: Optional[list[str]] = None) -> tuple[argparse.Namespace, ModelConfig]:
    """Parsed and validated arguments and the model config to train (fp32 parameters).

    Invalid arguments exit through argparse (status 2) with every problem listed."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = preset(args.preset).replace(params_dtype="float32")  # AdamW on fp32 masters
        if args.num_layers is not None:
            cfg = cfg.replace(num_layers=args.num_layers)
    except ConfigError as err:
        parser.error(str(err))
    if args.seq_len is None:
        args.seq_len = cfg.max_seq_len
    problems = validate_args(args, cfg, int(os.environ.get("WORLD_SIZE", "1")))
    if problems:
        parser.error("\n  " + "\n  ".join(problems))
    return args, cfg


# ----------------------------------------------------------------------------------------------
# Set-up: processes, device, model, optimizer
# ----------------------------------------------------------------------------------------------
def pick_device(args) -> torch.device:
    if args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def build_initial_model(cfg: ModelConfig, pg, seed: int, device: torch.device):
    """The model with the same initial weights at every TP and EP size for a given seed.

    Weights are drawn on the CPU (the same draw on any machine): with TP > 1 or EP > 1 each
    rank draws the full TP=1, EP=1 model (on groups of itself) and keeps its slice of every
    tensor."""
    from .model import build_model
    from .parallel import shard_state_dict, whole_model_groups

    tp, ep = pg.tp.size(), pg.ep.size()
    torch.manual_seed(seed)
    # With a pipeline, every rank builds the whole model (its TP/EP shard), cut into stages
    # later; with TP > 1 Megatron's layers skip their own draw: every weight is loaded below.
    with whole_model_groups(pg) as groups:
        model = build_model(cfg, pg_collection=groups, megatron_config=to_megatron_config(
            cfg, tensor_parallel_size=tp, expert_parallel_size=ep, use_cpu_initialization=True,
            perform_initialization=tp == 1))
        full = _full_model_state(cfg, groups, seed) if tp > 1 or ep > 1 else None
    if full is not None:
        missing, unexpected = model.load_state_dict(shard_state_dict(full, model, pg.tp, pg.ep),
                                                    strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        assert not missing and not unexpected, f"{missing=}, {unexpected=}"
    return model.to(device)


def _full_model_state(cfg: ModelConfig, pg, seed: int) -> dict:
    from .model import build_model

    # Every rank must create every group, in the same order.
    own_groups = [dist.new_group([r]) for r in range(dist.get_world_size())]
    solo = copy.copy(pg)
    solo.tp = solo.ep = own_groups[dist.get_rank()]
    torch.manual_seed(seed)
    full = build_model(cfg, pg_collection=solo, megatron_config=to_megatron_config(
        cfg, tensor_parallel_size=1, use_cpu_initialization=True))
    return {k: v for k, v in full.state_dict().items() if isinstance(v, torch.Tensor)}


def build_optimizer(model: torch.nn.Module, args) -> torch.optim.AdamW:
    """AdamW (DeepSeek-V3's betas) with weight decay on matrices, none on norms."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8)


def lr_at(step: int, args) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warm-up, then cosine."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = min(1.0, (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps))
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * progress))


def moe_layers(model: torch.nn.Module) -> list:
    from .moe.layer import DeepSeekMoE

    return [m for m in model.modules() if isinstance(m, DeepSeekMoE)]


def layer_label(router_name: str) -> str:
    """'decoder.layers.1.mlp.router' -> 'L1'; 'mtp.layers.0.transformer_layer...' -> 'mtp0'."""
    parts = router_name.split(".")
    if parts[0] == "decoder":
        return f"L{parts[2]}"
    if parts[0] == "mtp":
        return f"mtp{parts[2]}"
    return router_name.removesuffix(".router")


# ----------------------------------------------------------------------------------------------
# One optimizer step
# ----------------------------------------------------------------------------------------------
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
    pipeline: Optional["Pipeline"] = None  # PP > 1: the stages and their schedule
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


def forward_losses(run: Run, input_ids: torch.Tensor, labels: torch.Tensor, mtp_lambda: float):
    """(loss to backpropagate, next-token CE, weighted MTP loss, unweighted MTP CE)."""
    from .pipeline.model_stages import weighted_lm_loss

    with run.autocast():
        out = run.model(input_ids, None, None, labels=labels)
    return weighted_lm_loss(out, mtp_lambda)


def _all_reduce_sum(grads: list[torch.Tensor], group, scale: float) -> None:
    """grad <- scale * sum over `group` of grad, in one flat buffer."""
    if not grads:
        return
    if group.size() == 1:
        if scale != 1.0:
            torch._foreach_mul_(grads, scale)
        return
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat, group=group)
    flat *= scale
    for grad, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        grad.copy_(synced)


def reduce_gradients(params: list[torch.Tensor], pg) -> None:
    """Each gradient becomes that of the DP mean of the replicas' losses, L = 1/DP sum_r L_r.
    With a pipeline, `pg.dp` and `pg.expt_dp` are those of the ranks holding the same stages
    (Megatron's groups), so each stage's parameters are reduced over their own replicas.

    A non-expert parameter is replicated on every DP rank r, whose gradient is dL_r/dtheta:
    sum over DP, divide by DP. A routed expert lives on one rank of each EP group; the
    all-to-all backward has already summed into it the gradients of the EP group's EP losses
    (dispatch sent it their tokens), so summing over its replicas, the expert-data-parallel
    group (DP / EP ranks), gives sum_r dL_r/dW over all DP ranks: divide by DP too, not by
    the expt_dp size (Megatron's DDP: pre-scale edp/dp, then average over edp). With EP = 1
    expt_dp is the DP group and both rules coincide."""
    from .parallel import is_expert_parallel

    dp = pg.dp.size()
    _all_reduce_sum([p.grad for p in params if not is_expert_parallel(p)], pg.dp, 1.0 / dp)
    _all_reduce_sum([p.grad for p in params if is_expert_parallel(p)], pg.expt_dp, 1.0 / dp)


def global_grad_norm(params: list[torch.Tensor], pg) -> torch.Tensor:
    """L2 norm of the whole model's gradient, each distinct shard counted once: squares of
    TP-split parameters summed over the TP group, those of routed-expert shards over TP and
    then EP (expert TP = TP), replicated parameters (identical on every TP rank) once; with a
    pipeline (`pg.pp` larger than 1) the stages' squares are summed over it, so `params` must
    hold each stage once (not DualPipe's mirror copies).
    Accumulated in float64: an fp32 norm of the 262k-element tiny embedding is off by ~1e-5
    relative, and differently for each shard shape, which would blur TP/EP parity."""
    from .parallel import is_expert_parallel

    def sum_of_squares(grads):
        if not grads:
            return torch.zeros((), dtype=torch.float64, device=params[0].device)
        return torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float64)).pow(2).sum()

    def squares(expert: bool, tp_split: bool):
        return sum_of_squares([p.grad for p in params if is_expert_parallel(p) == expert
                               and getattr(p, "tensor_model_parallel", False) == tp_split])

    tp_split_sq = torch.stack([squares(expert=False, tp_split=True),
                               squares(expert=True, tp_split=True)])
    if pg.tp.size() > 1:
        dist.all_reduce(tp_split_sq, group=pg.tp)
    expert_sq = tp_split_sq[1] + squares(expert=True, tp_split=False)
    if pg.ep.size() > 1:
        dist.all_reduce(expert_sq, group=pg.ep)
    total_sq = tp_split_sq[0] + squares(expert=False, tp_split=False) + expert_sq
    pp = getattr(pg, "pp", None)
    if pp is not None and pp.size() > 1:
        dist.all_reduce(total_sq, group=pp)
    return total_sq.sqrt().float()


def clip_gradients(params: list[torch.Tensor], max_norm: float, pg,
                   norm_params: Optional[list[torch.Tensor]] = None) -> torch.Tensor:
    """Scale gradients so their global norm is at most max_norm (0: no clipping); returns the
    norm before clipping. The norm is over `norm_params` (default: `params`), the scaling
    applies to `params` (DualPipe: the norm counts each stage once, both copies are scaled)."""
    norm = global_grad_norm(params if norm_params is None else norm_params, pg)
    if max_norm > 0:
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_([p.grad for p in params], scale)
    return norm


def train_step(run: Run):
    """One optimizer step (module docstring, steps 1-5): (metrics as DP means, ExpertLoads)."""
    from .moe.balance import update_expert_biases

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
        return input_ids.to(run.device), labels.to(run.device)

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
    from .moe.balance import routers

    return [(r.expert_bias.max() - r.expert_bias.min()).item() for _, r in routers(model)]


def expert_metrics(loads, spreads: list[float]) -> dict:
    """Per MoE layer: load imbalance (max/mean) of this step and the bias spread (max - min)."""
    out = {}
    for name, value, spread in zip(loads.names, loads.imbalance().tolist(), spreads):
        label = layer_label(name)
        out[f"moe/{label}/imbalance"] = value
        out[f"moe/{label}/bias_spread"] = spread
    return out


@torch.no_grad()
def evaluate(run: Run) -> dict:
    """Mean next-token and MTP CE over `--eval-batches` fixed validation batches (DP mean)."""
    args = run.args
    run.model.eval()

    def val_batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        input_ids, labels = get_batch(run.corpus.val, batch_size=args.micro_batch_size,
                                      seq_len=args.seq_len, seed=args.seed, step=i,
                                      rank=run.dp_rank)
        return input_ids.to(run.device), labels.to(run.device)

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


# ----------------------------------------------------------------------------------------------
# Pipeline parallelism (DualPipe / DualPipeV)
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Pipeline:
    """This rank's two stages and the schedule's Megatron-style forward_backward_func."""

    plan: object                 # model_stages.StagePlan
    stages: tuple                # (chunk 0, chunk 1) DeepSeekV3Stage
    forward_backward: object     # megatron_adapter.DualPipeForwardBackward
    group: object                # the pipeline process group

    @classmethod
    def create(cls, model: torch.nn.Module, args, pg) -> "Pipeline":
        from .pipeline.megatron_adapter import PipelineConfig, get_forward_backward_func
        from .pipeline.model_stages import StagePlan, stages_from_model

        plan = StagePlan(args.pipeline_schedule, args.pipeline_parallel_size,
                         len(model.decoder.layers))
        stages = stages_from_model(model, plan, pg.pp.rank())
        config = PipelineConfig(args.pipeline_schedule, args.pipeline_parallel_size)
        return cls(plan, stages, get_forward_backward_func(config, group=pg.pp), pg.pp)

    def run(self, run: Run, num_microbatches: int, mtp_lambda: float, batch_of,
            forward_only: bool = False) -> torch.Tensor:
        """One schedule step over micro-batches batch_of(0..M-1). Returns the sums over the
        micro-batches of [loss, lm, mtp, mtp_ce, balance], summed over the pipeline."""
        from .pipeline.megatron_adapter import forward_step

        iterators = []
        for chunk, stage in enumerate(self.stages):
            stage.mtp_lambda = mtp_lambda
            stage.pop_balance_loss()  # start the step's sum from zero
            needs_data = stage.is_first or stage.is_last
            microbatches = self.plan.microbatches_of_chunk(chunk, num_microbatches)
            iterators.append((batch_of(m) for m in microbatches) if needs_data else None)
        with run.autocast():
            loss_dicts = self.forward_backward(
                forward_step_func=forward_step, data_iterator=iterators, model=list(self.stages),
                num_microbatches=num_microbatches, seq_length=run.args.seq_len,
                micro_batch_size=run.args.micro_batch_size, forward_only=forward_only)
        sums = torch.zeros(5, device=run.device)
        for losses in loss_dicts:  # the micro-batches whose loss this rank computed
            lm, mtp = losses["lm loss"], losses["mtp loss"]
            sums += torch.stack([lm + mtp, lm, mtp, losses["mtp ce"],
                                 torch.zeros_like(lm)]).float()
        balance = sum(stage.pop_balance_loss().to(run.device) for stage in self.stages)
        sums[0] += balance
        sums[4] += balance
        dist.all_reduce(sums, group=self.group)
        return sums

    def norm_params(self) -> list[torch.Tensor]:
        """The gradients the norm counts: every stage once (not DualPipe's mirror copies)."""
        return [p for stage in self.stages if not stage.is_mirror for p in stage.parameters()
                if p.grad is not None]

    def add_mirrored_router_loads(self) -> None:
        from .pipeline.model_stages import reduce_mirrored_router_loads

        if self.plan.schedule == "dualpipe":
            reduce_mirrored_router_loads(self.forward_backward.pipe, self.stages)

    def gather_expert_loads(self, loads):
        """Every stage's routers (full-model names, model order) with their loads and bias
        spreads, on every pipeline rank: (ExpertLoads, spreads)."""
        from .moe.balance import ExpertLoads, routers

        rows = []
        container = torch.nn.ModuleList(self.stages)
        for (name, router), load in zip(routers(container), loads.loads):
            chunk, _, local = name.partition(".")
            stage = self.stages[int(chunk)]
            if not stage.is_mirror:
                spread = (router.expert_bias.max() - router.expert_bias.min()).item()
                rows.append((stage.full_name(local), load, spread))
        parts: list = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(parts, rows, group=self.group)
        rows = sorted((row for part in parts for row in part),
                      key=lambda row: (row[0].startswith("mtp"), int(row[0].split(".")[2])))
        if not rows:
            return ExpertLoads([], torch.zeros(0, 0, dtype=torch.int64), loads.updated), []
        return (ExpertLoads([r[0] for r in rows], torch.stack([r[1] for r in rows]),
                            loads.updated), [r[2] for r in rows])


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------
def _rank_file(step_dir: Path, rank: int) -> Path:
    return step_dir / f"rank_{rank:05d}.pt"


def _rng_states(device: torch.device) -> dict:
    states = {"torch": torch.get_rng_state(), "python": random.getstate(),
              "numpy": np.random.get_state()}
    if device.type == "cuda":
        from megatron.core.tensor_parallel import get_cuda_rng_tracker

        states["cuda"] = torch.cuda.get_rng_state(device)
        states["megatron_cuda_tracker"] = get_cuda_rng_tracker().get_states()
    return states


def _set_rng_states(states: dict, device: torch.device) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    if device.type == "cuda" and "cuda" in states:
        from megatron.core.tensor_parallel import get_cuda_rng_tracker

        torch.cuda.set_rng_state(states["cuda"], device)
        get_cuda_rng_tracker().set_states(states["megatron_cuda_tracker"])


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def checkpoint_payload(run: Run) -> dict:
    return {
        "format": CHECKPOINT_FORMAT,
        "step": run.step,
        "tokens_seen": run.tokens_seen,
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "rng": _rng_states(run.device),
        "model_config": dataclasses.asdict(run.cfg),
        "train_args": {k: (str(v) if isinstance(v, Path) else v)
                       for k, v in vars(run.args).items()},
        "world_size": dist.get_world_size() if dist.is_initialized() else 1,
        "wandb_id": run.wandb_id,
    }


def save_checkpoint(checkpoint_dir: Path, step: int, payload: dict, *, rank: int = 0) -> Path:
    """Write `step_<step>/` with one file per rank, then point `latest` at it.

    Atomic: files are written under `step_<step>.tmp/` (each as `.partial`, then renamed), the
    folder is renamed to `step_<step>` once every rank is done, and `latest` is replaced by a
    rename; a crash at any point leaves `latest` on the previous complete checkpoint."""
    final, tmp = checkpoint_dir / f"step_{step}", checkpoint_dir / f"step_{step}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    partial = _rank_file(tmp, rank).with_suffix(".partial")
    torch.save(payload, partial)
    os.replace(partial, _rank_file(tmp, rank))
    _barrier()
    if rank == 0:
        meta = {k: payload[k] for k in ("step", "tokens_seen", "model_config", "train_args",
                                        "world_size")}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        marker = checkpoint_dir / "latest.tmp"
        marker.write_text(final.name + "\n")
        os.replace(marker, checkpoint_dir / "latest")
    _barrier()
    return final


def find_checkpoint(resume: Optional[str], out_dir: Optional[Path]) -> Optional[Path]:
    """The step folder to resume from, or None to start fresh ('auto' with no checkpoint)."""
    if resume is None:
        return None
    if resume == "auto":
        marker = out_dir / "checkpoints" / "latest"
        return out_dir / "checkpoints" / marker.read_text().strip() if marker.exists() else None
    path = Path(resume)
    for root in (path, path / "checkpoints"):
        if (root / "latest").is_file():
            return root / (root / "latest").read_text().strip()
    if _rank_file(path, 0).is_file():
        return path
    raise TrainError(f"--resume {resume} is invalid: it is neither a checkpoint folder "
                            "(step_<N>/ with rank_*.pt files) nor a run or checkpoints/ folder "
                            "with a 'latest' marker")


def check_resumable(saved: dict, run: Run, step_dir: Path) -> None:
    """Refuse a checkpoint of another model, TP/world size or data stream, saying what differs."""
    problems = []
    current_cfg = _without_implementation_choices(dataclasses.asdict(run.cfg))
    saved_cfg = _without_implementation_choices(saved["model_config"])
    for key in sorted(set(current_cfg) | set(saved_cfg)):
        if json.dumps(current_cfg.get(key), default=str) != json.dumps(saved_cfg.get(key),
                                                                        default=str):
            problems.append(f"model config '{key}': checkpoint {saved_cfg.get(key)!r}, "
                            f"now {current_cfg.get(key)!r}")
    world = dist.get_world_size() if dist.is_initialized() else 1
    if saved["world_size"] != world:
        problems.append(f"number of processes: checkpoint {saved['world_size']}, now {world} "
                        "(launch with the checkpoint's NPROC)")
    defaults = build_parser()
    for key in RESUME_INVARIANT_ARGS:
        # A flag added after the checkpoint was written had its default value then.
        was = saved["train_args"].get(key, defaults.get_default(key))
        now = getattr(run.args, key)
        if was != now:
            problems.append(f"--{key.replace('_', '-')}: checkpoint {was!r}, now {now!r}")
    if problems:
        raise TrainError(f"cannot resume from {step_dir}: it was written by a different run.\n  "
                         + "\n  ".join(problems)
                         + "\nPass the checkpoint's values, or start a new --out-dir without "
                           "--resume.")


def _without_implementation_choices(cfg_dict: dict) -> dict:
    """The model config minus how it is computed (experts_impl, attention_impl,
    linear_backend), which may differ between machines resuming the same run."""
    out = {}
    for key, value in cfg_dict.items():
        if key.endswith("_impl") or key == "linear_backend":
            continue
        out[key] = _without_implementation_choices(value) if isinstance(value, dict) else value
    return out


def load_checkpoint(run: Run, step_dir: Path) -> None:
    rank = dist.get_rank() if dist.is_initialized() else 0
    path = _rank_file(step_dir, rank)
    if not path.is_file():
        raise TrainError(f"--resume: {path} is missing; was {step_dir} written with as "
                                "many processes as this run has?")
    saved = torch.load(path, map_location=run.device, weights_only=False)
    if saved.get("format") != CHECKPOINT_FORMAT:
        raise TrainError(f"{path} has checkpoint format {saved.get('format')}, this code reads "
                         f"{CHECKPOINT_FORMAT}")
    check_resumable(saved, run, step_dir)
    run.model.load_state_dict(saved["model"])
    run.optimizer.load_state_dict(saved["optimizer"])
    _set_rng_states(saved["rng"], run.device)
    run.step, run.tokens_seen = saved["step"], saved["tokens_seen"]
    run.wandb_id = saved["wandb_id"]


# ----------------------------------------------------------------------------------------------
# Logging (rank 0): metrics.jsonl, Weights & Biases, progress bar, plots
# ----------------------------------------------------------------------------------------------
class MetricsLog:
    """Appends one JSON line per step; on resume keeps the history up to the resumed step."""

    def __init__(self, out_dir: Path, start_step: int, history_from: Optional[Path]):
        self.path = out_dir / "metrics.jsonl"
        source = history_from if history_from is not None else self.path
        kept = [r for r in _read_jsonl(source) if r["step"] <= start_step] if start_step else []
        self.records = kept
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def append(self, record: dict) -> None:
        self.records.append(record)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def merge_into_last(self, extra: dict) -> None:
        """Add eval results to the last step's record (rewrites the file's last line)."""
        self.records[-1].update(extra)
        self.path.write_text("".join(json.dumps(r) + "\n" for r in self.records))


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def start_wandb(run: Run, out_dir: Path):
    if run.args.no_wandb:
        return None
    if "WANDB_API_KEY" not in os.environ:
        os.environ.setdefault("WANDB_MODE", "offline")
    import wandb

    run.wandb_id = run.wandb_id or uuid.uuid4().hex[:8]
    config = {"model": dataclasses.asdict(run.cfg),
              "train": {k: (str(v) if isinstance(v, Path) else v)
                        for k, v in vars(run.args).items()},
              "world_size": dist.get_world_size(), "tensor_parallel": run.pg.tp.size(),
              "expert_parallel": run.pg.ep.size(), "data_parallel": run.pg.dp.size(),
              "pipeline_parallel": run.args.pipeline_parallel_size,
              "device": str(run.device)}
    return wandb.init(project=run.args.wandb_project, name=out_dir.name, dir=str(out_dir),
                      id=run.wandb_id, resume="allow", config=config)


def write_plots(out_dir: Path, records: list[dict], names: list[str],
                recent_loads: collections.deque) -> None:
    from .plots import plot_expert_load, plot_loss_curve

    plot_loss_curve(records, out_dir / "loss_curve.png")
    loads = (torch.stack(list(recent_loads)).sum(0).numpy() if recent_loads
             else np.zeros((0, 0)))
    labels = [layer_label(n) for n in names]
    (out_dir / "expert_load.json").write_text(json.dumps(
        {"layers": labels, "window_steps": len(recent_loads), "loads": loads.tolist()}))
    plot_expert_load(labels, loads, records, out_dir / "expert_load.png",
                     window_steps=len(recent_loads))


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------
def resolve_out_dir(args) -> Path:
    """--out-dir, the run folder of a --resume path, or runs/<preset>-<time> (rank 0's time)."""
    if args.out_dir is not None:
        return args.out_dir
    if args.resume not in (None, "auto"):
        step_dir = find_checkpoint(args.resume, None)
        return step_dir.parent.parent
    stamp = [time.strftime("%Y%m%d-%H%M%S")]
    if dist.is_initialized():
        dist.broadcast_object_list(stamp, src=0)
    return Path("runs") / f"{args.preset}-{stamp[0]}"


def setup(args, cfg) -> tuple[Run, Optional[Path]]:
    from .parallel import init_distributed

    backend = "gloo" if args.device == "cpu" else None
    # Megatron's groups with the pipeline (parallel.py has the layout): `pp` is one pipeline,
    # `dp` / `ep` / `expt_dp` are among the ranks holding the same stages.
    pg = init_distributed(args.tensor_parallel_size, args.expert_parallel_size,
                          pipeline_parallel_size=args.pipeline_parallel_size,
                          backend=backend, seed=args.seed)
    device = pick_device(args)
    if device.type == "cpu" and int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1)
                                  // int(os.environ["LOCAL_WORLD_SIZE"])))
    out_dir = resolve_out_dir(args)
    step_dir = find_checkpoint(args.resume, out_dir)  # before the slow part: fail early
    tokenizer, corpus = load_corpus(args.data_dir, val_fraction=args.val_fraction)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise TrainError(f"--data-dir {args.data_dir}: its tokenizer has {tokenizer.vocab_size} "
                         f"tokens, more than preset '{cfg.name}' vocab_size={cfg.vocab_size}; "
                         "use a preset with a larger vocabulary or a smaller tokenizer")
    model = build_initial_model(cfg, pg, args.seed, device)
    pipeline = None
    if args.pipeline_parallel_size > 1:
        pipeline = Pipeline.create(model, args, pg)
        model = torch.nn.ModuleList(pipeline.stages)  # parameters, state dict, routers
    for layer in moe_layers(model):
        layer.aux_loss_scale = 1.0 / args.grad_accum
    run = Run(args, cfg, pg, device, model, build_optimizer(model, args), corpus,
              out_dir=out_dir, pipeline=pipeline)
    if step_dir is not None:
        load_checkpoint(run, step_dir)
    elif args.resume == "auto" and dist.get_rank() == 0:
        print(f"--resume auto: no checkpoint in {run.out_dir / 'checkpoints'}, starting fresh",
              file=sys.stderr)
    return run, step_dir


def train(run: Run, step_dir: Optional[Path]) -> dict:
    """The loop: step, log, evaluate, checkpoint; plots at the end. Returns a summary."""
    from tqdm import tqdm

    args, out_dir = run.args, run.out_dir
    is_main = dist.get_rank() == 0
    start_step = run.step
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    _barrier()
    history_from = None
    if step_dir is not None and step_dir.parent.parent.resolve() != out_dir.resolve():
        history_from = step_dir.parent.parent / "metrics.jsonl"
    log = MetricsLog(out_dir, start_step, history_from) if is_main else None
    wandb_run = start_wandb(run, out_dir) if is_main else None
    recent_loads: collections.deque = collections.deque(maxlen=LOAD_WINDOW_STEPS)
    names: list[str] = []
    progress = tqdm(total=args.steps, initial=start_step, disable=not is_main,
                    desc=f"{run.cfg.name} tp={run.pg.tp.size()} ep={run.pg.ep.size()} "
                         f"pp={args.pipeline_parallel_size} dp={run.pg.dp.size()}",
                    dynamic_ncols=True, mininterval=1.0)
    summary = {"out_dir": str(out_dir), "steps": [], "losses": [], "grad_norms": []}
    while run.step < args.steps:
        start = time.perf_counter()
        metrics, loads = train_step(run)
        elapsed = time.perf_counter() - start
        metrics["step_time_s"] = elapsed
        metrics["tokens_per_s"] = run.tokens_per_step / elapsed
        recent_loads.append(loads.loads)
        names = loads.names
        last = run.step == args.steps
        if args.eval_interval and (run.step % args.eval_interval == 0 or last):
            metrics.update(evaluate(run))
            if is_main:
                progress.write(f"step {run.step}: val loss {metrics['val_loss']:.4f}, "
                               f"train loss {metrics['loss']:.4f}")
        if is_main:
            log.append(metrics)
            if wandb_run is not None:
                wandb_run.log(metrics, step=run.step)
        summary["steps"].append(run.step)
        summary["losses"].append(metrics["loss"])
        summary["grad_norms"].append(metrics["grad_norm"])
        summary.update(val_loss=metrics.get("val_loss", summary.get("val_loss")))
        progress.set_postfix(loss=f"{metrics['loss']:.3f}",
                             tok_s=f"{metrics['tokens_per_s']:.0f}")
        progress.update(1)
        if args.save_interval and (run.step % args.save_interval == 0 or last):
            save_checkpoint(out_dir / "checkpoints", run.step, checkpoint_payload(run),
                            rank=dist.get_rank())
    progress.close()
    if is_main:
        if log.records:
            write_plots(out_dir, log.records, names, recent_loads)
        summary["wandb_dir"] = None
        if wandb_run is not None:
            summary["wandb_dir"] = str(Path(wandb_run.dir).parent)
            wandb_run.finish()
        print(f"run folder: {out_dir}" + (f"\nW&B run folder: {summary['wandb_dir']}"
                                          if summary["wandb_dir"] else ""))
    return summary


def main(argv: Optional[list[str]] = None) -> dict:
    from .parallel import shutdown_distributed

    args, cfg = parse_args(argv)
    try:
        run, step_dir = setup(args, cfg)
        return train(run, step_dir)
    except TrainError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from err
    finally:
        shutdown_distributed()


if __name__ == "__main__":
    main()
