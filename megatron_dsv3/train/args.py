"""The command line of the training job: the flags, their checks, the model config to train.

`parse_args` reports every problem at once, each naming the flag and what to change, and exits
through argparse (status 2).

Which model. `--preset` (default tiny) names one; `--init-from FILE` builds the model of FILE's
model_config instead (a file of `convert hf-to-dsv3`, or a step folder / rank file of this job
without TP, EP or PP: `checkpoint.state_file`), `--preset` then left out or naming exactly that
architecture (whose training settings, which a converted Hugging Face config.json lacks, are then
the preset's); `--resume` with `--preset` left out takes the model config (and the --preset)
of the checkpoint's run, so that a run started with `--init-from` resumes without it.

`TrainError` is the job's error for what the run was asked to do (a checkpoint, the data):
`main` prints it without a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path
from typing import Optional

import torch

from ..config import (DEFAULT_FP8_LAYERS, FP8_LAYERS, PRESETS, ConfigError, ModelConfig,
                      fp8_layers_flag, preset)
from ..data import DEFAULT_DATA_DIR

# How long a collective waits for its peers (--dist-timeout-s): 10 minutes, torch's NCCL default
# and Megatron-LM's --distributed-timeout-minutes default. Legitimate waits here are far shorter
# (the tiny preset's checkpoint or evaluation takes seconds); a 671B checkpoint write to a shared
# file system can take minutes: raise it there rather than lower it.
DIST_TIMEOUT_S = 600.0


class TrainError(ValueError):
    """A problem with what the run was asked to do (a checkpoint, the data); the message says
    what to change. The command line prints it without a traceback."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m megatron_dsv3.train",
        description="Train a DeepSeek-V3 preset (MLA, DeepSeekMoE, MTP) on the bundled corpus. "
                    "Defaults: the tiny preset, a few minutes on 2 CPU cores.",
        epilog="Stopping: the first SIGTERM (SLURM preemption, torchrun's shutdown) or SIGINT "
               "(Ctrl-C) on any rank lets every rank finish the step in flight, save a "
               "checkpoint of it (even with --save-interval 0) and exit with status 128 + the "
               "signal (143 for SIGTERM, 130 for SIGINT); continue with --resume auto. Repeated "
               "signals are ignored meanwhile (torchrun forwards the one its workers already "
               "got); SIGKILL or SIGQUIT (Ctrl-\\) stops at once. A non-finite loss or gradient "
               "norm stops the job before that step is applied (status 2), naming the checkpoint "
               "to resume from.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = p.add_argument
    add("--preset", default=None, choices=sorted(PRESETS),
        help="model preset (default: tiny). With --init-from leave it out (or name the file's "
             "architecture exactly); with --resume leave it out to take the checkpoint's")
    add("--init-from", type=Path, default=None,
        help="start from these weights: a torch file of `python -m "
             "megatron_dsv3.checkpoint.convert hf-to-dsv3`, or a step folder / rank file of "
             "a run of this job without TP, EP or PP. The model is built from the file's "
             "model_config (its architecture; the training flags are this command's; with a "
             "--preset of the same architecture, that preset's balance-loss, bias-update and "
             "MTP-weight settings, which a converted Hugging Face file lacks), its "
             "weights are loaded (each TP/EP rank taking its slice) before the first step; "
             "AdamW starts fresh at step 0. Checkpoints of the run record the config: continue "
             "it with --resume, without --init-from")
    add("--steps", type=int, default=300, help="optimizer steps in total")
    add("--micro-batch-size", type=int, default=16, help="sequences per micro-batch per DP rank")
    add("--grad-accum", type=int, default=2, help="micro-batches per optimizer step")
    add("--seq-len", type=int, default=None, help="tokens per sequence (default: the model's "
                                                  "max_seq_len; on a resume the checkpoint's)")
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
    add("--pipeline-schedule", default=None, type=str.lower,
        help="bidirectional pipeline schedule for PP > 1: dualpipev (2 stages per rank, any "
             "PP >= 2) or dualpipe (PP stages, each held twice; PP even)")
    add("--num-layers", type=int, default=None,
        help="decoder layers (default: the preset's), e.g. to split evenly over pipeline stages")
    add("--seed", type=int, default=1234, help="seed of the initial weights and of the batches")
    add("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="tokenizer.json + *.txt")
    add("--val-fraction", type=float, default=0.05, help="tail of the corpus held out")
    add("--out-dir", type=Path, default=None, help="run folder (default: runs/<preset>-<time>)")
    add("--resume", default=None, help="checkpoint folder (step_<N>, or a checkpoints/ or run "
                                       "folder: its newest intact checkpoint, no newer than "
                                       "'latest'), or 'auto': the same in --out-dir if it holds "
                                       "a run, a fresh start if it does not")
    add("--save-interval", type=int, default=100, help="checkpoint every N steps and at the "
                                                       "end (0: no checkpoints)")
    add("--eval-interval", type=int, default=50, help="validate every N steps and at the end "
                                                      "(0: never)")
    add("--eval-batches", type=int, default=8, help="validation micro-batches per DP rank")
    add("--wandb-project", default="megatron-dsv3", help="Weights & Biases project")
    add("--no-wandb", action="store_true", help="do not log to Weights & Biases")
    add("--dist-timeout-s", type=float, default=DIST_TIMEOUT_S,
        help="seconds a collective waits for the other ranks before this rank fails, on every "
             "process group: a hung peer becomes an error instead of a 30-minute wait. It must "
             "exceed the longest legitimate wait between ranks (a checkpoint write, an "
             "evaluation, a slow first step); the default is torch's NCCL default and "
             "Megatron-LM's --distributed-timeout-minutes")
    add("--device", default="auto", choices=("auto", "cpu", "cuda"),
        help="auto: cuda when available")
    add("--amp", default="auto", choices=("auto", "off", "bf16"),
        help="autocast of the forward; auto: bf16 on cuda, off on cpu")
    add("--params-dtype", default="auto", choices=("auto", "float32", "bfloat16"),
        help="dtype of the model's parameters. bfloat16: the GEMMs read them directly, AdamW "
             "updates fp32 master copies and each micro-batch's gradient is summed into an "
             "fp32 buffer (DeepSeek-V3's precision map); float32: AdamW on the parameters, "
             "bf16 casts under autocast. Checkpoints hold the fp32 weights either way. auto: "
             "bfloat16 with bf16 autocast on cuda and no pipeline, float32 otherwise")
    add("--adam-moments-dtype", default="auto", choices=("auto", "float32", "bfloat16"),
        help="dtype of AdamW's two moments. bfloat16: as DeepSeek-V3 keeps them (the update "
             "still computed in fp32; 4 bytes less memory per parameter and moment, a faster "
             "step); needs bf16 parameters with fp32 masters (--params-dtype). auto: bfloat16 "
             "where the parameters are bf16, float32 otherwise")
    add("--expert-wgrad", default="auto", choices=("auto", "micro-batch", "in-gemm", "step"),
        help="when and how the routed experts' weight gradients are computed. micro-batch: in "
             "each backward, as autograd does (a bf16 gradient, then added into the fp32 sum). "
             "in-gemm: in each backward, by a Triton grouped GEMM that adds them into the fp32 "
             "sums itself (kernels/grouped_wgrad.py; bf16 parameters with fp32 masters on a "
             "GPU). step: once per optimizer step, one grouped GEMM per projection over all "
             "its micro-batches' rows, the fp32 sum written once (moe/expert_wgrad.py), keeping "
             "a copy of each micro-batch's expert inputs and output gradients until then "
             "(proxy: ~0.4 GB per MoE layer and micro-batch). auto: in-gemm with bf16 "
             "parameters on a GPU without a pipeline (on one H200, proxy, 8 x 4096 tokens: "
             "513 ms per step against 530 for step and 567 for micro-batch, and the least "
             "memory, benchmarks/RESULTS.md), micro-batch otherwise")
    add("--fp8", default="none", choices=("none", "deepseek"),
        help="FP8 training: deepseek runs the precision map's linears (MLA projections but the "
             "KV down- and output projections, dense FFNs, shared and routed experts) with E4M3 "
             "GEMMs, "
             "1x128 / 128x128 scales and FP32 promotion (ModelConfig.fp8); their widths must "
             "be multiples of 128")
    add("--fp8-layers", default=",".join(DEFAULT_FP8_LAYERS),
        help="with --fp8 deepseek: the parts of the precision map in FP8, comma-separated, "
             f"among {','.join(FP8_LAYERS)} (ModelConfig.fp8_layers); the others stay BF16 "
             "(e.g. proxy's 10944-wide dense FFN: --fp8-layers attention,shared_experts,"
             "routed_experts,dispatch)")
    add("--compile", default="auto", choices=("auto", "none", "modules", "layers"),
        help="torch.compile our attention/MoE modules or whole transformer layers "
             "(model.compile_model); auto: modules on cuda, none on cpu")
    add("--compile-mode", default="auto",
        help="torch.compile mode for --compile: default, reduce-overhead (CUDA graphs), or any "
             "mode torch.compile takes. auto: reduce-overhead on cuda without tensor, expert or "
             "pipeline parallelism (whose collectives and micro-batches in flight CUDA graphs "
             "do not take here), default otherwise")
    return p


def _arg_error(flag: str, value, fix: str) -> str:
    return f"{flag} {value} is invalid: {fix}"


def model_words(args, cfg: ModelConfig) -> tuple[str, str]:
    """Where the model config came from, for messages: ("preset 'tiny'", "the preset's"), or
    ("the model of --init-from FILE", "the --init-from model's")."""
    if getattr(args, "init_from", None) is not None:
        return f"the model of --init-from {args.init_from}", "the --init-from model's"
    return f"preset '{cfg.name}'", "the preset's"


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
    model, models = model_words(args, cfg)
    need(args.seq_len <= cfg.max_seq_len, "--seq-len", args.seq_len,
         f"{model} has max_seq_len={cfg.max_seq_len}: pass --seq-len "
         f"{cfg.max_seq_len} or less")
    need(args.seq_len > cfg.mtp.num_layers + 1, "--seq-len", args.seq_len,
         f"must exceed MTP depth + 1 = {cfg.mtp.num_layers + 1} so every depth has a target")
    need(args.lr > 0, "--lr", args.lr, "must be > 0")
    need(0 <= args.min_lr <= args.lr, "--min-lr", args.min_lr, f"must lie in [0, --lr={args.lr}]")
    need(args.warmup_steps <= args.steps, "--warmup-steps", args.warmup_steps,
         f"must not exceed --steps={args.steps}")
    need(args.weight_decay >= 0, "--weight-decay", args.weight_decay, "must be >= 0")
    need(args.dist_timeout_s > 0, "--dist-timeout-s", args.dist_timeout_s,
         "must be > 0 seconds (how long a collective waits for the other ranks)")
    need(args.clip_grad >= 0, "--clip-grad", args.clip_grad, "must be >= 0 (0 disables it)")
    need(0 < args.val_fraction < 1, "--val-fraction", args.val_fraction,
         "must lie strictly between 0 and 1")
    need(args.device != "cuda" or torch.cuda.is_available(), "--device", args.device,
         "no CUDA device is visible here: use --device cpu or auto")
    need(not (args.amp == "bf16" and args.device == "cpu"), "--amp", args.amp,
         "bf16 autocast is for cuda; use --amp off (or auto) on cpu")
    need(args.params_dtype != "bfloat16" or args.pipeline_parallel_size == 1, "--params-dtype",
         args.params_dtype, "is not supported with --pipeline-parallel-size > 1 yet (the "
         "pipeline's stages keep fp32 parameters): pass --params-dtype float32 or auto")
    need(args.adam_moments_dtype != "bfloat16" or args.params_dtype != "float32",
         "--adam-moments-dtype", args.adam_moments_dtype, "needs bf16 parameters with fp32 "
         "masters (MasterAdamW), but --params-dtype is float32 (torch's AdamW keeps its "
         "moments in the parameters' dtype): pass --params-dtype auto or bfloat16, or "
         "--adam-moments-dtype auto")
    need(args.expert_wgrad != "step" or args.pipeline_parallel_size == 1, "--expert-wgrad",
         args.expert_wgrad, "step is not supported with --pipeline-parallel-size > 1 (the "
         "schedules run the weight gradients themselves): pass micro-batch")
    need(args.expert_wgrad != "step" or args.expert_parallel_size == 1, "--expert-wgrad",
         args.expert_wgrad, "step is not supported with --expert-parallel-size > 1 (its "
         "buffers hold a fixed row count per micro-batch; with expert parallelism the rows a "
         "rank receives vary): pass micro-batch")
    need(args.expert_wgrad != "in-gemm" or (args.device != "cpu"
                                            and args.params_dtype != "float32"
                                            and args.pipeline_parallel_size == 1),
         "--expert-wgrad", args.expert_wgrad, "in-gemm adds into the fp32 sums of bf16 "
         "parameters on a GPU: it needs --device cuda (or auto on a GPU), --params-dtype auto "
         "or bfloat16 and no pipeline; pass micro-batch")
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
                 f"must divide {models} {field}={width}; pick a divisor of it")
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
             f"must divide {models} moe.num_experts={cfg.moe.num_experts} (each EP rank "
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
    from ..pipeline.schedules import schedule_class

    try:
        rules = schedule_class(schedule)  # each schedule's own checks, with their fixes
    except ValueError as err:
        return problems + [_arg_error("--pipeline-schedule", schedule, str(err))]
    try:
        rules.validate(pp)
    except ValueError as err:
        return problems + [_arg_error("--pipeline-parallel-size", pp, str(err))]
    stages = rules.num_stages(pp)
    need(cfg.num_layers % stages == 0, "--num-layers", cfg.num_layers,
         f"{schedule} with PP={pp} cuts the decoder into {stages} stages: pass --num-layers "
         f"a multiple of {stages}")
    batches = [("--grad-accum", args.grad_accum)]
    if args.eval_interval:
        batches.append(("--eval-batches", args.eval_batches))
    for flag, value in batches:
        try:
            rules.validate(pp, value)
        except ValueError as err:
            problems.append(_arg_error(flag, value, str(err)))
    return problems


def uses_bf16_autocast(args, device: torch.device) -> bool:
    """--amp resolved on `device`: auto is bf16 on cuda, off on cpu."""
    return args.amp == "bf16" or (args.amp == "auto" and device.type == "cuda")


def parse_args(argv: Optional[list[str]] = None) -> tuple[argparse.Namespace, ModelConfig]:
    """Parsed and validated arguments and the model config to train (fp32 parameters): the
    preset's, the --init-from file's or the resumed run's (the module's "Which model").

    Invalid arguments exit through argparse (status 2) with every problem listed."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = _model_config(args)
        cfg = cfg.replace(params_dtype="float32",  # AdamW on fp32 masters
                          fp8="none", fp8_layers=DEFAULT_FP8_LAYERS)  # how: this run's flags
        if args.fp8 != "none":
            cfg = cfg.replace(fp8=args.fp8, fp8_layers=fp8_layers_flag(args.fp8_layers))
    except (ConfigError, TrainError) as err:
        parser.error(str(err))
    if args.seq_len is None:
        args.seq_len = cfg.max_seq_len
    problems = validate_args(args, cfg, int(os.environ.get("WORLD_SIZE", "1")))
    if problems:
        parser.error("\n  " + "\n  ".join(problems))
    return args, cfg


def _model_config(args) -> ModelConfig:
    """The architecture to train: --init-from's, a resumed run's (--preset left out), or
    --preset's (tiny when left out); --num-layers applied where it may be. Sets args.preset
    (None for a model of --init-from without --preset)."""
    if args.init_from is not None:
        if args.resume not in (None, "auto"):
            raise TrainError(
                f"--init-from {args.init_from} and --resume {args.resume} exclude each other: "
                "--init-from starts a new run from the file's weights (fresh AdamW, step 0), "
                "--resume continues a run of this job from its checkpoint. Drop --init-from to "
                "continue the run (its checkpoints hold the model config), or --resume to "
                "start from the file")
        return _init_from_config(args)
    saved = _saved_run_meta(args) if args.preset is None and args.resume is not None else None
    if saved is None:
        args.preset = args.preset or "tiny"
        cfg = preset(args.preset)
    else:
        try:
            from ..checkpoint.hf_files import model_config_from_dict

            cfg = model_config_from_dict(saved["model_config"])
        except (ConfigError, TypeError, KeyError, ValueError) as err:
            raise TrainError(f"--resume {args.resume}: the checkpoint's model_config cannot be "
                             f"read ({type(err).__name__}: {err}); pass the run's --preset "
                             "(and --num-layers)") from err
        args.preset = saved["train_args"].get("preset")
        if args.seq_len is None:  # a resume must keep it: the run's by default
            args.seq_len = saved["train_args"].get("seq_len")
    if args.num_layers is not None:
        cfg = cfg.replace(num_layers=args.num_layers)
    return cfg


# A checkpoint's step folder holds the run's model config and flags in this file
# (train/checkpoint.py's META; that module imports this one, hence the name repeated here).
_META = "meta.json"


def _saved_run_meta(args) -> Optional[dict]:
    """meta.json of a checkpoint of the run --resume names (an explicit step folder, else the
    newest step folder that has a readable one), or None where there is none: a fresh start of
    --resume auto, or a --resume path the resume itself then reports. Any checkpoint of a run
    gives its model config (a resume refuses another); which one to resume from is decided,
    verified, at set-up."""
    if args.resume == "auto":
        if args.out_dir is None:
            return None
        path = args.out_dir / "checkpoints"
    else:
        path = Path(args.resume)
    folders = [path]
    for root in (path, path / "checkpoints"):
        if root.is_dir():
            steps = [p for p in root.iterdir()
                     if p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit()]
            folders += sorted(steps, key=lambda p: int(p.name[5:]), reverse=True)
    for folder in folders:
        try:
            meta = json.loads((folder / _META).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(meta, dict) and "model_config" in meta and "train_args" in meta:
            return meta
    return None


# How a model is computed (every *_impl field too): the same weights in other GEMMs, free to
# differ between a checkpoint and its resume (train/checkpoint.py)
IMPLEMENTATION_CHOICES = ("linear_backend", "fp8", "fp8_layers")
# Not the architecture, free to differ between a preset and an --init-from file: the
# implementation choices, how the model is stored, and the training settings a Hugging Face
# config.json does not carry (a converted file has ModelConfig's defaults there; the preset's
# are used, test_hf_files: V3's release)
_NOT_ARCHITECTURE = IMPLEMENTATION_CHOICES + (
    "name", "params_dtype", "init_std", "seq_aux_loss_coeff", "bias_update_rate",
    "bias_update_stop_tokens", "loss_weight_schedule")


def config_without(config: dict, skip: tuple[str, ...]) -> dict:
    """A model config as dataclasses.asdict gives it, without the fields named in `skip` and
    every *_impl, at any depth."""
    return {key: config_without(value, skip) if isinstance(value, dict) else value
            for key, value in config.items() if key not in skip and not key.endswith("_impl")}


def architecture_differences(expected: ModelConfig, actual: ModelConfig) -> list[str]:
    """The fields in which two configs describe different models ("moe.top_k: 2 and 3"),
    leaving out the name, the parameters' dtype, the implementation choices and the training
    settings (init_std, the balance-loss coefficient, the bias update's rate and stop, the MTP
    loss weights)."""
    def flat(config: dict, prefix: str = "") -> dict:
        out = {}
        for key, value in config.items():
            if isinstance(value, dict):
                out.update(flat(value, f"{prefix}{key}."))
            else:
                out[prefix + key] = value
        return out

    a, b = (flat(config_without(dataclasses.asdict(cfg), _NOT_ARCHITECTURE))
            for cfg in (expected, actual))
    return [f"{key}: {a.get(key)!r} and {b.get(key)!r}" for key in sorted(set(a) | set(b))
            if json.dumps(a.get(key), default=str) != json.dumps(b.get(key), default=str)]


def _init_from_config(args) -> ModelConfig:
    """The model config of the --init-from file (read through its index only: mmap), after
    refusing a --preset or --num-layers that describe another model; with --preset, the
    preset's config (the same architecture, the preset's training settings: a converted Hugging
    Face file has ModelConfig's defaults for those, e.g. no balance loss)."""
    from ..checkpoint.hf import ConversionError
    from ..checkpoint.hf_files import model_config_from_dict
    from ..checkpoint.state_file import read_state_file

    path = args.init_from
    try:
        _, saved = read_state_file(path, flag="--init-from", mmap=True)
    except ConversionError as err:
        raise TrainError(f"{err}. --init-from takes the torch file written by `python -m "
                         "megatron_dsv3.checkpoint.convert hf-to-dsv3 --out FILE`, or a step "
                         "folder / rank file of a run of this job without TP, EP or PP") from err
    try:
        cfg = model_config_from_dict(saved)
    except ConfigError as err:
        raise TrainError(f"--init-from {path}: its model_config is invalid: {err}") from err
    except (TypeError, KeyError, ValueError, AttributeError) as err:
        raise TrainError(f"--init-from {path}: its model_config is not a ModelConfig "
                         f"({type(err).__name__}: {err}); write the file again with `python -m "
                         "megatron_dsv3.checkpoint.convert hf-to-dsv3`") from err
    if args.num_layers is not None and args.num_layers != cfg.num_layers:
        raise TrainError(f"--num-layers {args.num_layers} differs from --init-from {path}, "
                         f"whose model has num_layers={cfg.num_layers} (its weights are those "
                         "of its layers): leave --num-layers out")
    if args.preset is not None:
        named = preset(args.preset)
        if args.num_layers is not None:
            named = named.replace(num_layers=args.num_layers)
        differences = architecture_differences(named, cfg)
        if differences:
            raise TrainError(
                f"--preset {args.preset} is not the model of --init-from {path} (preset and "
                "file): " + "; ".join(differences) + ". Leave --preset out: with --init-from "
                "the model is built from the file's model_config")
        return named
    return cfg
