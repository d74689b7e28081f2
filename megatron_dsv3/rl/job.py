"""The GRPO run: set-up (policy, reference, AdamW, resume), the loop, its outputs.

`setup` initialises the process groups (TP x DP), reads the --init-from weights (a
training-job step folder or a converted file, through train/job.py's `init_weights`: digests
verified, NaN refused) into the policy, each TP rank taking its slice, and into the frozen
reference when beta > 0 (none otherwise), builds AdamW (train/build.py's, DeepSeek-V3's
betas, no decay on norms), a TP = 1 rollout replica when TP > 1, and resumes from the
checkpoint --resume names (rl/state.py). `run` takes the GRPO steps, logs each on rank 0
(metrics.jsonl through train/metrics_log.py's MetricsLog, W&B through its start_wandb) and
checkpoints every --save-interval steps and at the end.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import torch
import torch.distributed as dist

from ..parallel import from_rank0
from ..train.args import TrainError
from . import state
from .objective import GRPOLossConfig
from .rewards import ArithmeticTask, load_reward
from .trainer import GRPOConfig, GRPOTrainer, RolloutReplica, full_state_dict


def grpo_config(args) -> GRPOConfig:
    """The trainer's config from the command line (ValueError naming the field)."""
    loss = GRPOLossConfig(epsilon_low=args.epsilon,
                          epsilon_high=args.epsilon if args.epsilon_high is None
                          else args.epsilon_high,
                          beta=args.beta, loss_type=args.loss_type)
    return GRPOConfig(prompts_per_step=args.prompts_per_step, group_size=args.group_size,
                      max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                      top_p=args.top_p, num_iterations=args.num_iterations,
                      micro_batch_size=args.micro_batch_size, clip_grad=args.clip_grad,
                      seed=args.seed, loss=loss)


def default_tokenizer(init_from: Path) -> Optional[Path]:
    """The tokenizer the --init-from checkpoint was trained with: a GRPO run's --tokenizer, a
    training-job run's --data-dir/tokenizer.json; None (examples/data's) when the file
    records neither (a converted file)."""
    path = Path(init_from)
    try:
        recorded = torch.load(path / "rank_00000.pt" if path.is_dir() else path,
                              map_location="cpu", weights_only=False,
                              mmap=True).get("train_args") or {}
    except Exception:  # noqa: BLE001 -- init_weights reports an unreadable file properly
        return None
    candidates = [recorded.get("tokenizer")]
    if recorded.get("data_dir"):
        candidates.append(Path(recorded["data_dir"]) / "tokenizer.json")
    return next((Path(c) for c in candidates if c and Path(c).is_file()), None)


def stop_tokens(tokenizer, stop_text: str) -> list[int]:
    """End-of-text and, when given, the one token `stop_text` encodes to."""
    tokens = [tokenizer.eos_id]
    if stop_text:
        ids = tokenizer.encode(stop_text)
        if len(ids) != 1:
            raise TrainError(f"--stop-text {stop_text!r} encodes to {len(ids)} tokens {ids}: a "
                             "stop must be one token of the tokenizer (e.g. '\\n'), or '' for "
                             "end-of-text only")
        tokens.append(ids[0])
    return tokens


@dataclasses.dataclass
class Job:
    """What `run` needs: the arguments, the model config, the groups, the trainer, and the
    counters a checkpoint carries (completed steps, completion tokens trained on, W&B id)."""

    args: object
    cfg: object
    pg: object
    device: torch.device
    trainer: GRPOTrainer
    out_dir: Path
    step: int = 0
    tokens_seen: int = 0
    wandb_id: Optional[str] = None


def setup(args) -> Job:
    from ..checkpoint.hf_files import model_config_from_dict
    from ..checkpoint.state_file import read_state_file
    from ..inference.cli import load_tokenizer
    from ..parallel import init_distributed
    from ..train.build import build_initial_model, build_optimizer
    from ..train.checkpoint import find_checkpoint
    from ..train.job import init_weights

    cfg_grpo = grpo_config(args)
    device = torch.device("cuda" if args.device == "cuda" or (
        args.device == "auto" and torch.cuda.is_available()) else "cpu")
    pg = init_distributed(args.tensor_parallel_size, backend="gloo" if device.type == "cpu"
                          else None, seed=args.seed, timeout_s=args.dist_timeout_s)
    if device.type == "cpu":
        torch._dynamo.config.disable = True  # as the training job: no C++ compile on CPU
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    out_dir = args.out_dir
    step_dir = find_checkpoint(args.resume, out_dir)
    saved = state.load(step_dir, args) if step_dir is not None else None

    _, config = read_state_file(args.init_from, flag="--init-from", mmap=True)
    cfg = model_config_from_dict(config)
    init_state = init_weights(args)
    policy = build_initial_model(cfg, pg, args.seed, device, init_state,
                                 f"--init-from {args.init_from}").eval()
    reference = None
    if cfg_grpo.loss.beta > 0:
        reference = build_initial_model(cfg, pg, args.seed, device, init_state,
                                        f"--init-from {args.init_from}")
    del init_state
    optimizer = build_optimizer([p for p in policy.parameters() if p.requires_grad],
                                SimpleNamespace(lr=args.lr, weight_decay=args.weight_decay,
                                                adam_moments_dtype="auto"))
    replica = None
    if pg.tp.size() > 1:
        replica = RolloutReplica(lambda groups: _whole_model(cfg, groups, device), pg)

    args.tokenizer = args.tokenizer or default_tokenizer(args.init_from)  # recorded
    tokenizer = load_tokenizer(args.tokenizer, cfg.vocab_size)
    task = ArithmeticTask(max_operand=args.max_operand, operators=args.operators,
                          seed=args.seed, style=args.problem_style)
    trainer = GRPOTrainer(policy, reference, optimizer, pg, cfg_grpo, task,
                          load_reward(args.reward), tokenizer,
                          stop_tokens(tokenizer, args.stop_text), rollout_replica=replica)
    job = Job(args, cfg, pg, device, trainer, out_dir)
    if saved is not None:
        state.restore(saved, policy, optimizer, pg)
        job.step, job.tokens_seen, job.wandb_id = (saved["step"], saved["tokens_seen"],
                                                   saved["wandb_id"])
    return job


def _whole_model(cfg, groups, device):
    from ..config import to_megatron_config
    from ..model import build_model

    return build_model(cfg, pg_collection=groups, megatron_config=to_megatron_config(
        cfg, use_cpu_initialization=True, perform_initialization=False)).to(device)


def run(job: Job) -> dict:
    """The GRPO steps up to --steps; returns the summary (each step's metrics)."""
    from ..train.metrics_log import MetricsLog, start_wandb

    args, out_dir = job.args, job.out_dir
    is_main = dist.get_rank() == 0
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    log = MetricsLog(out_dir, job.step, None) if is_main else None
    wandb_run = None
    if is_main:
        # start_wandb reads what the training job's Run holds: the arguments, model config,
        # groups, device, step and W&B id (pipeline_parallel_size: GRPO runs without one)
        view = SimpleNamespace(args=SimpleNamespace(**vars(args), pipeline_parallel_size=1),
                               cfg=job.cfg, pg=job.pg, device=job.device, step=job.step,
                               wandb_id=job.wandb_id)
        wandb_run = start_wandb(view, out_dir)
        job.wandb_id = view.wandb_id
    job.wandb_id = from_rank0(job.wandb_id)
    summary = {"out_dir": str(out_dir), "records": []}
    while job.step < args.steps:
        metrics = job.trainer.step(job.step)
        job.step += 1
        record = {"step": job.step, **metrics.as_dict()}
        job.tokens_seen += int(round(metrics.response_length * args.prompts_per_step
                                     * args.group_size))
        record["tokens_seen"] = job.tokens_seen
        summary["records"].append(record)
        if is_main:
            log.append(record)
            if wandb_run is not None:
                wandb_run.log(record, step=job.step)
            print(f"step {job.step}/{args.steps}: reward {metrics.reward_mean:.3f} "
                  f"(std {metrics.reward_std:.3f}), kl {metrics.kl:.4f}, "
                  f"clip {metrics.clip_fraction:.3f}, length {metrics.response_length:.2f}, "
                  f"{metrics.tokens_per_s:.0f} tok/s, {metrics.step_s:.2f} s", flush=True)
        last = job.step == args.steps
        if args.save_interval and (job.step % args.save_interval == 0 or last):
            state.save(out_dir, job.step, policy_state=full_state_dict(job.trainer.policy,
                                                                       job.pg),
                       optimizer=job.trainer.optimizer, cfg=job.cfg, args=args,
                       tokens_seen=job.tokens_seen, wandb_id=job.wandb_id)
    if wandb_run is not None:
        summary["wandb_dir"] = str(Path(wandb_run.dir).parent)
        wandb_run.finish()
    return summary

