"""Megatron-LM's own training loop (`megatron.training.pretrain`) with our model: this package's
`pretrain_gpt.py`.

  torchrun --nproc-per-node 8 -m megatron_dsv3.pretrain --preset proxy \\
      --tokenizer-type HuggingFaceTokenizer --tokenizer-model examples/data \\
      --data-path data/plays --split 80,20,0 --seq-length 4096 \\
      --micro-batch-size 1 --global-batch-size 64 --train-iters 1000 \\
      --lr 3e-4 --min-lr 3e-5 --lr-decay-style cosine --use-distributed-optimizer \\
      --save ckpt --load ckpt --wandb-project dsv3

(`python -m megatron_dsv3.indexed_data` writes `data/plays.bin/.idx` from the bundled corpus.)

Every Megatron argument keeps its meaning; the model is built by `model.model_provider` from
Megatron's model flags. `--preset NAME` stands for a preset's flags (`megatron_cli.megatron_flags`),
put before the others so that a flag given on the command line overrides the preset's. What
this module adds to Megatron's loop:
  * the loss of a micro-batch (`loss_func`): the next-token cross-entropy over `loss_mask`
    plus lambda / D times each MTP depth's mean cross-entropy over its valid positions, lambda
    from `--mtp-loss-weights` by the tokens trained so far (DeepSeek-V3: 0.3, then 0.1 after
    10T tokens), returned as Megatron's (sum, tokens, report) so that its per-token
    normalisation gives exactly our training job's loss;
  * the expert-bias update is Megatron's own (moe/router.py: its finalize_model_grads finds our
    routers); `--bias-update-stop-tokens` freezes the biases after that many tokens;
  * the routers' balance loss scaled by 1 / micro-batches of the step (our routers inject its
    gradient themselves, as Megatron's MoE layers do through MoEAuxLossAutoScaler);
  * the batch of a micro-batch read on tensor-parallel rank 0 and broadcast to the others, on
    the first and last pipeline stages only (`get_batch`);
  * AdamW's moments in bf16 as DeepSeek-V3 keeps them (`--adam-moments-dtype`, auto: with
    --bf16), through our AdamW in place of Megatron's Adam class (optimizer.MegatronAdamW);
  * our modules compiled as the training job compiles them (`--compile`, `--compile-mode`:
    CUDA graphs on one GPU), evaluation eager while they are CUDA graphs;
  * DualPipeV as the pipeline schedule (`--pipeline-schedule dualpipev`, pretrain_dualpipe.py);
  * a digest manifest of each checkpoint, verified before a resume loads it;
  * logging (pretrain_log.py): each MTP depth's CE in the loss report, each MoE layer's load
    balance and bias, tokens/s and model TFLOP/s by our FLOP count, the load heatmap, to
    Megatron's W&B run and TensorBoard; W&B offline when WANDB_API_KEY is not set.
"""

from __future__ import annotations

import argparse
import importlib.util
from functools import partial
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from .config import DEFAULT_FP8_LAYERS, FP8_LAYERS, PRESETS, ConfigError, fp8_layers_flag, preset
from .megatron_cli import megatron_flags, take_flag

_BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")
V3_MTP_LOSS_WEIGHTS = "0:0.3,10e12:0.1"


# ----------------------------------------------------------------------------------------------
# Arguments (Megatron's extra_args_provider)
# ----------------------------------------------------------------------------------------------
def parse_mtp_loss_weights(text: str) -> tuple[tuple[int, float], ...]:
    """'0:0.3,10e12:0.1' -> ((0, 0.3), (10_000_000_000_000, 0.1)): the MTP loss weight from
    each number of trained tokens on, checked as MTPConfig checks its schedule (starts at 0,
    strictly increasing, weights >= 0)."""
    return mtp_schedule(text).loss_weight_schedule


def mtp_schedule(text: str):
    """--mtp-loss-weights as an MTPConfig holding the schedule; ConfigError naming the flag."""
    from .config import MTPConfig

    try:
        pairs = [part.split(":") for part in text.split(",")]
        schedule = tuple((int(float(start)), float(weight)) for start, weight in pairs)
    except ValueError as err:
        raise ConfigError(f"--mtp-loss-weights {text!r} is invalid: write TOKENS:WEIGHT pairs "
                          f"separated by commas, e.g. {V3_MTP_LOSS_WEIGHTS}") from err
    try:
        return MTPConfig(loss_weight_schedule=schedule)
    except ConfigError as err:
        raise ConfigError(f"--mtp-loss-weights {text!r} is invalid ({err}); e.g. "
                          f"{V3_MTP_LOSS_WEIGHTS}") from err


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Our arguments, as Megatron's `extra_args_provider` adds them to its parser."""
    group = parser.add_argument_group("megatron_dsv3")
    group.add_argument("--preset", default=None, choices=list(PRESETS),
                       help="the model flags of one of our presets (python -m "
                            "megatron_dsv3.megatron_cli NAME prints them); flags given on the "
                            "command line override them")
    group.add_argument("--mtp-loss-weights", default=V3_MTP_LOSS_WEIGHTS,
                       help="MTP loss weight lambda by trained tokens, TOKENS:WEIGHT pairs "
                            "(DeepSeek-V3's 0.3 for the first 10T tokens, then 0.1); "
                            "Megatron's --mtp-loss-scaling-factor is not used")
    group.add_argument("--bias-update-stop-tokens", type=float, default=None,
                       help="freeze the routers' expert biases after this many trained tokens "
                            "(DeepSeek-V3: 14.3e12); default: never")
    group.add_argument("--adam-moments-dtype", default="auto",
                       choices=("auto", "float32", "bfloat16"),
                       help="AdamW's two moments. bfloat16 (DeepSeek-V3's): our AdamW "
                            "(optimizer.MegatronAdamW, a Triton kernel per tensor) in place of "
                            "Megatron's Adam class, since Megatron keeps bf16 moments only "
                            "with Transformer Engine; float32: Megatron's own optimizer (ours "
                            "with fp32 moments without TE and apex); "
                            "auto: bfloat16 with --bf16, else float32")
    group.add_argument("--pipeline-schedule", default="1f1b", choices=("1f1b", "dualpipev"),
                       help="with --pipeline-model-parallel-size > 1: Megatron's own 1F1B, or "
                            "DualPipeV (pretrain_dualpipe.py: 2 stages per rank, rank r "
                            "holding stages r and 2PP-1-r; --num-layers a multiple of 2PP)")
    group.add_argument("--dsv3-fp8", default="none", choices=("none", "deepseek"),
                       help="FP8 training, DeepSeek-V3's recipe (ModelConfig.fp8): the "
                            "precision map's linears with E4M3 GEMMs, 1x128 / 128x128 scales "
                            "and FP32 promotion. Without Transformer Engine, Megatron's "
                            "--fp8-format e4m3 --fp8-recipe blockwise means this")
    group.add_argument("--dsv3-fp8-layers", default=",".join(DEFAULT_FP8_LAYERS),
                       help="with --dsv3-fp8 deepseek: the parts of the precision map in FP8, "
                            f"comma-separated, among {','.join(FP8_LAYERS)} "
                            "(ModelConfig.fp8_layers); the others stay BF16")
    group.add_argument("--compile", default="auto", choices=("auto", "none", "modules", "layers"),
                       help="torch.compile our attention/MoE modules or whole transformer "
                            "layers (model.compile_model), as the training job does; auto: "
                            "modules on cuda, none on cpu")
    group.add_argument("--compile-mode", default="auto",
                       help="torch.compile mode for --compile: default, reduce-overhead (CUDA "
                            "graphs) or any mode torch.compile takes; auto: reduce-overhead on "
                            "cuda without tensor, expert or pipeline parallelism, else default")
    group.add_argument("--expert-wgrad", default="auto", choices=("auto", "in-gemm", "micro-batch"),
                       help="the routed experts' weight gradients: in-gemm adds them into "
                            "Megatron's fp32 gradient buffer (main_grad) inside the grouped "
                            "GEMM (kernels/grouped_wgrad.py), with no bf16 gradient for DDP's "
                            "hook to add; micro-batch hands autograd a bf16 gradient as usual; "
                            "auto: in-gemm where it holds (GPU, --bf16 with fp32 gradient "
                            "accumulation, no --overlap-grad-reduce)")
    group.add_argument("--expert-load-image-interval", type=int, default=100,
                       help="log the expert-load heatmap to W&B every this many iterations "
                            "(0: never); the per-layer load and bias metrics follow "
                            "--tensorboard-log-interval")
    return parser


def expand_preset(argv: list[str]) -> list[str]:
    """`argv` with the model flags of its `--preset NAME` put in front (argparse keeps the last
    value of a flag given twice, so the user's own flags win)."""
    names = [name for name in take_flag(argv, "--preset")[0] if name is not None]
    if not names:
        return list(argv)
    if len(set(names)) > 1 or names[-1] not in PRESETS:
        raise ConfigError(f"--preset {' '.join(names)} is invalid: give one of "
                          f"{', '.join(PRESETS)}, once")
    return [*megatron_flags(preset(names[-1])), *argv]


def without_missing_kernels(argv: list[str]) -> list[str]:
    """`argv` with Megatron's fused-kernel defaults turned off where their kernels are missing
    (on the command line: Megatron's pretrain parses it again), each measured failing at build
    time otherwise:
      * --no-persist-layer-norm without TE: the torch norm our specs use refuses it
        ("persist_layer_norm not supported by torch LayerNorm");
      * --no-gradient-accumulation-fusion without apex's fused_weight_gradient_mlp_cuda:
        Megatron's ColumnParallelLinear refuses it.
    A flag already given is kept as given."""
    from .megatron_compat import transformer_engine_available

    missing = []
    if not transformer_engine_available():
        missing.append("--no-persist-layer-norm")
    if importlib.util.find_spec("fused_weight_gradient_mlp_cuda") is None:
        missing.append("--no-gradient-accumulation-fusion")
    return [*argv, *(flag for flag in missing if flag not in argv)]


def nan_stops_the_run(argv: list[str]) -> list[str]:
    """`argv` with `--rerun-mode disabled` unless a rerun mode is given: a NaN/Inf loss or
    gradient then stops the run at once with Megatron's RuntimeError naming the iteration and
    the rank, before the optimizer step (nothing NaN is saved). Megatron's default,
    validate_results, re-runs the iteration and then exits through a checkpoint save for a
    re-run on another GPU; without --save that save failed with a bare TypeError (measured on
    the GPU with --lr 1e6), so that mode asks for --save."""
    modes, _ = take_flag(argv, "--rerun-mode")
    if not modes:
        return [*argv, "--rerun-mode", "disabled"]
    if modes[-1] == "validate_results" and not take_flag(argv, "--save")[0]:
        raise ConfigError("--rerun-mode validate_results without --save is invalid: on a NaN "
                          "Megatron saves a checkpoint to re-run the iteration on another GPU; "
                          "give --save DIR, or drop --rerun-mode (a NaN then stops the run)")
    return list(argv)


def fp8_without_te(argv: list[str]) -> list[str]:
    """Megatron's FP8 flags run Transformer Engine's recipes; without TE, `argv` with
    `--fp8-format e4m3 --fp8-recipe blockwise` (TE's DeepSeek-style block scaling) turned into
    our `--dsv3-fp8 deepseek`, and any other FP8 recipe refused naming the flags (on the
    command line: Megatron's pretrain parses it again)."""
    from .megatron_compat import transformer_engine_available

    formats, rest = take_flag(argv, "--fp8-format")
    recipes, rest = take_flag(rest, "--fp8-recipe")
    if not formats or transformer_engine_available():
        return list(argv)
    fmt, recipe = formats[-1] or "", (recipes[-1] or "") if recipes else "delayed"
    if (fmt, recipe) != ("e4m3", "blockwise"):
        raise ConfigError(f"--fp8-format {fmt} --fp8-recipe {recipe} is invalid here: those "
                          "recipes are Transformer Engine's, which is not installed; FP8 "
                          "without it is DeepSeek-V3's: --fp8-format e4m3 --fp8-recipe "
                          "blockwise (or --dsv3-fp8 deepseek)")
    return [*rest, "--dsv3-fp8", "deepseek"]


def check_fp8_model(args) -> None:
    """With --dsv3-fp8 deepseek: the model these arguments describe has every FP8 width a
    multiple of 128, else ConfigError naming the field, before anything is built."""
    if args.dsv3_fp8 == "none":
        return
    from megatron.core.transformer.transformer_config import MLATransformerConfig
    from megatron.training.arguments import core_transformer_config_from_args

    from .config import from_megatron_config

    config = core_transformer_config_from_args(args, MLATransformerConfig)
    from_megatron_config(config, vocab_size=args.padded_vocab_size,
                         max_seq_len=args.max_position_embeddings).replace(
        fp8=args.dsv3_fp8, fp8_layers=fp8_layers_flag(args.dsv3_fp8_layers))


# Megatron's arguments that decide the model's tensors: a resume with any of them changed is
# refused before the model is built (Megatron itself compares only num_layers, hidden_size and
# num_attention_heads, and a changed expert count fails deep in the loader)
MODEL_ARGS = ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size",
              "kv_channels", "multi_latent_attention", "q_lora_rank", "kv_lora_rank",
              "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim", "num_experts",
              "moe_layer_freq", "moe_ffn_hidden_size", "moe_router_topk",
              "moe_shared_expert_intermediate_size", "moe_router_num_groups",
              "moe_router_group_topk", "mtp_num_layers", "untie_embeddings_and_output_weights",
              "padded_vocab_size")


def megatron_checkpoint_folder(root: str, args) -> Optional[Path]:
    """The folder Megatron's load reads under `root`: iter_<--ckpt-step> if given, else what
    its tracker file names (an iteration or 'release'); None without a tracker."""
    if getattr(args, "ckpt_step", None):  # as Megatron reads it (0: the tracker's)
        return Path(root) / f"iter_{int(args.ckpt_step):07d}"
    tracker = Path(root) / "latest_checkpointed_iteration.txt"
    if not tracker.is_file():
        return None
    named = tracker.read_text().strip()
    return Path(root) / ("release" if named == "release" else f"iter_{int(named):07d}")


def check_resume_matches(args) -> None:
    """When --load holds a distributed checkpoint: its saved arguments give the same model as
    these (MODEL_ARGS), else ConfigError naming each flag with both values, before anything is
    built. Reads only the checkpoint's common state (no tensors)."""
    from megatron.core import dist_checkpointing

    load = getattr(args, "load", None)
    folder = megatron_checkpoint_folder(load, args) if load else None
    if folder is None or not (folder / "metadata.json").is_file():
        return  # none, or not a distributed checkpoint: Megatron's own checks
    saved = dist_checkpointing.load_common_state_dict(str(folder)).get("args")
    if saved is None:
        return
    changed = [(name, getattr(saved, name), getattr(args, name)) for name in MODEL_ARGS
               if hasattr(saved, name) and hasattr(args, name)
               and getattr(saved, name) != getattr(args, name)]
    if changed:
        raise ConfigError(
            f"--load {load}: {folder.name} was saved by another model: "
            + "; ".join(f"--{name.replace('_', '-')} {new} here, {old} in the checkpoint"
                        for name, old, new in changed)
            + ". Pass the checkpoint's values (the --preset it was trained with), or another "
              "--load / --save folder")


def adam_moments_dtype(args) -> str:
    """--adam-moments-dtype resolved: auto is bfloat16 with --bf16, else float32."""
    if args.adam_moments_dtype != "auto":
        return args.adam_moments_dtype
    return "bfloat16" if getattr(args, "bf16", False) else "float32"


def use_our_adamw(args) -> None:
    """Our AdamW in place of Megatron's Adam class where Megatron's falls short: for bf16
    moments (Megatron keeps them only with TE), and without TE and apex at all (Megatron's
    torch AdamW cannot resume from a distributed-optimizer checkpoint: optimizer.MegatronAdamW).
    """
    from .megatron_compat import megatron_has_fused_adam, use_megatron_adam
    from .optimizer import MegatronAdamW, MegatronAdamWFP32

    bf16_moments = adam_moments_dtype(args) == "bfloat16"
    if args.optimizer != "adam":
        if bf16_moments:
            raise ConfigError(f"--adam-moments-dtype bfloat16 is for --optimizer adam (given "
                              f"{args.optimizer}): pass --adam-moments-dtype float32")
        return
    if bf16_moments:
        use_megatron_adam(MegatronAdamW)
    elif not megatron_has_fused_adam():
        use_megatron_adam(MegatronAdamWFP32)


def expert_wgrad_in_gemm(args) -> bool:
    """--expert-wgrad resolved: whether the routed experts add their weight gradients into
    main_grad inside the grouped GEMM. That needs an fp32 main_grad (--bf16, whose gradients
    Megatron accumulates in fp32) and no --overlap-grad-reduce (DDP's per-parameter hook, which
    marks a bucket ready, never runs for a gradient autograd does not see: with the reduction
    after the backward, as Megatron does by default, every bucket is reduced anyway), on a GPU.
    auto: in-gemm where these hold; in-gemm where one fails: a ConfigError naming it."""
    problems = []
    if not torch.cuda.is_available():
        problems.append("no GPU (the grouped GEMM's weight gradient runs on one)")
    if not getattr(args, "bf16", False):
        problems.append("no --bf16 (main_grad is then the parameters' own dtype)")
    elif not getattr(args, "accumulate_allreduce_grads_in_fp32", True):
        problems.append("gradients accumulated in bf16 (--accumulate-allreduce-grads-in-fp32 "
                        "off)")
    if getattr(args, "overlap_grad_reduce", False):
        problems.append("--overlap-grad-reduce (its per-parameter hook would wait for a bf16 "
                        "gradient that never comes)")
    if args.expert_wgrad == "in-gemm" and problems:
        raise ConfigError(f"--expert-wgrad in-gemm cannot run here: {'; '.join(problems)}. "
                          "Pass --expert-wgrad micro-batch (or auto)")
    return args.expert_wgrad != "micro-batch" and not problems


def compile_settings(args) -> tuple[str, str]:
    """(--compile scope, --compile-mode) with auto resolved as the training job does."""
    from .model import resolve_compile

    parallel = (args.tensor_model_parallel_size > 1 or args.expert_model_parallel_size > 1
                or args.pipeline_model_parallel_size > 1)
    return resolve_compile(args.compile, args.compile_mode, on_cuda=torch.cuda.is_available(),
                           parallel=parallel)


def eager_while_graphed(args):
    """The context of Megatron's evaluations: eager when the compiled modules are CUDA graphs
    (graphs recorded for training, replayed without grad, overwrote outputs still in use at
    the training job's first evaluation on an H200), else nothing."""
    from contextlib import nullcontext

    scope, mode = compile_settings(args)
    if scope != "none" and "reduce-overhead" in mode:
        return torch.compiler.set_stance("force_eager")
    return nullcontext()


def tokens_trained(args) -> int:
    """Tokens of the optimizer steps done so far (Megatron counts samples)."""
    return int(args.consumed_train_samples) * int(args.seq_length)


def mtp_weight(args) -> float:
    """lambda in force after the tokens trained so far."""
    return mtp_schedule(args.mtp_loss_weights).loss_weight(tokens_trained(args))


# ----------------------------------------------------------------------------------------------
# One micro-batch (Megatron's forward_step_func)
# ----------------------------------------------------------------------------------------------
def loss_func(loss_mask: torch.Tensor, mtp_lambda: float, output):
    """Megatron's (loss sum, tokens, report) for our model's LMOutput; sum / tokens is
    mean CE over loss_mask + (lambda / D) sum_k mean CE_k over depth k's valid positions.
    The report (Megatron logs each entry, W&B included): "lm loss", "mtp ce" (the depths'
    mean) and "mtp ce depth k" for each depth k = 1..D."""
    from .mtp import mtp_depth_ce

    mask = loss_mask.reshape(output.lm_loss.shape).float()
    num_tokens = mask.sum()
    lm_sum = (output.lm_loss.float() * mask).sum()
    loss = lm_sum
    report = {"lm loss": torch.stack([lm_sum.detach(), num_tokens])}
    if output.mtp_losses is not None:
        depth_ce = mtp_depth_ce(output.mtp_losses.float(), output.mtp_valid)
        loss = loss + mtp_lambda * depth_ce.mean() * num_tokens
        depth_ce = depth_ce.detach()
        report["mtp ce"] = torch.stack([depth_ce.mean() * num_tokens, num_tokens])
        for k, ce in enumerate(depth_ce, 1):
            report[f"mtp ce depth {k}"] = torch.stack([ce * num_tokens, num_tokens])
    return loss, num_tokens.to(torch.int), report


def stage_loss_func(stage, tokens: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor,
                    position_ids: torch.Tensor, mtp_lambda: float, hidden: torch.Tensor):
    """loss_func for the last pipeline stage's final-norm hidden states: the output head, the
    MTP and the cross-entropies (the stage's lm_output), then the same (sum, tokens, report)."""
    return loss_func(loss_mask, mtp_lambda, stage.lm_output(
        hidden, tokens, labels, position_ids=position_ids, loss_mask=loss_mask))


def get_batch(data_iterator: Optional[Iterator], model_device: torch.device, args,
              tp_group=None, is_first_stage: bool = True, is_last_stage: bool = True):
    """(tokens, labels, loss_mask, position_ids) of the next micro-batch on `model_device`:
    read on tensor-parallel rank 0 of `tp_group` and broadcast to the others; None on a
    pipeline stage that is neither first nor last (it gets hidden states instead)."""
    if not (is_first_stage or is_last_stage):
        return None
    tp_size = tp_group.size() if tp_group is not None else 1
    if tp_size == 1 or tp_group.rank() == 0:
        batch = next(data_iterator)
        tensors = [batch[key].to(model_device, non_blocking=True) for key in _BATCH_KEYS]
    else:
        shape = (args.micro_batch_size, args.seq_length)
        tensors = [torch.empty(shape, dtype=dtype, device=model_device)
                   for dtype in (torch.int64, torch.int64, torch.float32, torch.int64)]
    if tp_size > 1:
        source = dist.get_global_rank(tp_group, 0)
        for tensor in tensors:
            dist.broadcast(tensor, source, group=tp_group)
    tokens, labels, loss_mask, position_ids = tensors
    return tokens.long(), labels.long(), loss_mask.float(), position_ids.long()


def forward_step(data_iterator, model, *, args=None, tp_group=None):
    """Megatron's forward_step_func: the next micro-batch through `model` (a chunk of our
    model, wrapped or not), and the loss function of its output on the last stage."""
    from megatron.core import parallel_state
    from megatron.core.num_microbatches_calculator import get_num_microbatches
    from megatron.core.utils import get_attr_wrapped_model

    from .moe.balance import set_balance_loss_scale
    from .pipeline.megatron_adapter import find_stage

    if args is None:
        from megatron.training import get_args

        args = get_args()
    if tp_group is None:
        tp_group = parallel_state.get_tensor_model_parallel_group()
    pre_process = get_attr_wrapped_model(model, "pre_process")
    post_process = get_attr_wrapped_model(model, "post_process")
    set_balance_loss_scale(model, 1.0 / get_num_microbatches())
    freeze_biases_after(model, args)
    check_loaded_weights(model, args)
    device = next(model.parameters()).device
    batch = get_batch(data_iterator, device, args, tp_group, pre_process, post_process)
    tokens, labels, loss_mask, position_ids = batch if batch is not None else (None,) * 4
    stage = find_stage(model)
    if stage is not None:  # a DualPipeV chunk (pretrain_dualpipe.py); called unwrapped: the
        # hidden states it passes on stay bf16 (Float16Module would make the last rank's fp32)
        hidden = stage(tokens if stage.is_first else None)  # else what the schedule set
        if not stage.is_last:
            return hidden, None
        return hidden, partial(stage_loss_func, stage, tokens, labels, loss_mask,
                               position_ids, mtp_weight(args))
    output = model(tokens, position_ids, None, labels=labels, loss_mask=loss_mask)
    if not post_process:
        return output, None
    return output, partial(loss_func, loss_mask, mtp_weight(args))


class CorruptCheckpoint(RuntimeError):
    """A checkpoint Megatron would load whose files changed since the save, or whose weights
    are not finite: the run stops before training on them."""


class ResumeMismatch(RuntimeError):
    """The optimizer state Megatron's loader restored differs from the state it saved: the
    resumed run would not continue the saved one."""


def manifest_after_save(args, iteration: int, non_persistent: bool, optimizer=None) -> None:
    """After Megatron's save of `iteration`: this rank's fingerprint of its optimizer state
    (checkpoint.state_fingerprint, checked after a resume), then a digest manifest of the folder
    (checkpoint.digest), every rank hashing a share. Megatron's loader checks no checksum, and
    random bytes written into a saved tensor load as plausible weights. Not for non-persistent
    (local) checkpoints, nor with --async-save (the files are still being written here)."""
    from .checkpoint.digest import write_folder_manifest
    from .checkpoint.state_fingerprint import write_fingerprint
    from .megatron_compat import torch_optimizers_of

    if non_persistent or not args.save:
        return
    if getattr(args, "async_save", False):
        if not getattr(args, "_warned_async_manifest", False):
            args._warned_async_manifest = True
            _print_rank0(f"WARNING: --async-save: the checkpoints in {args.save} get no digest "
                         "manifest, so a resume cannot verify them")
        return
    folder = Path(args.save) / f"iter_{iteration:07d}"
    if folder.is_dir():
        if optimizer is not None:
            write_fingerprint(folder, _rank(), torch_optimizers_of(optimizer),
                              parallel_layout(args))
        if dist.is_initialized():
            dist.barrier()  # every rank's fingerprint is in the folder the manifest covers
        write_folder_manifest(folder)


def check_resumed_optimizer(args, load_arg: str, optimizer) -> None:
    """After Megatron has resumed from --load with its optimizer state: that state equals the
    fingerprint this rank wrote at the save (checkpoint.state_fingerprint); ResumeMismatch
    naming what differs otherwise. Skipped without a fingerprint (a checkpoint saved before
    them), under another parallel layout than at the save (the state was resharded), and where
    no optimizer state is loaded (--no-load-optim, --finetune)."""
    from .checkpoint.state_fingerprint import (fingerprint, fingerprint_differences,
                                               read_fingerprint)
    from .megatron_compat import torch_optimizers_of

    # not args.iteration: Megatron's loop sets it from load_checkpoint's return, after this
    if (load_arg != "load" or optimizer is None or not getattr(args, "load", None)
            or getattr(args, "no_load_optim", False) or getattr(args, "finetune", False)):
        return
    folder = megatron_checkpoint_folder(args.load, args)
    saved = (read_fingerprint(folder, _rank(), parallel_layout(args))
             if folder is not None else None)
    if saved is None:
        return
    problems = fingerprint_differences(saved, fingerprint(torch_optimizers_of(optimizer)))
    if problems:
        shown = _first_of(problems, 6)
        raise ResumeMismatch(
            f"--load {args.load}: the optimizer state restored from {folder.name} on rank "
            f"{_rank()} differs from the state saved there: {shown}. The resumed run would not "
            "continue the saved one; report it with the Megatron-Core version and the "
            "optimizer flags, and resume with --no-load-optim only if a fresh optimizer state "
            "is acceptable")


# Megatron's arguments that decide which parameters, and which shards of them, a rank's
# optimizer holds
_LAYOUT_ARGS = ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                "expert_model_parallel_size", "expert_tensor_parallel_size",
                "context_parallel_size", "virtual_pipeline_model_parallel_size",
                "num_layers_per_virtual_pipeline_stage", "use_distributed_optimizer")


def parallel_layout(args) -> dict:
    """The world size and Megatron's layout arguments of this run (missing ones as None)."""
    layout = {name: getattr(args, name, None) for name in _LAYOUT_ARGS}
    layout["world_size"] = dist.get_world_size() if dist.is_initialized() else 1
    return layout


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _first_of(problems: list[str], limit: int) -> str:
    """The first `limit` problems joined, and how many more there are."""
    more = len(problems) - limit
    return "; ".join(problems[:limit]) + (f"; and {more} more" if more > 0 else "")


def verify_before_load(args, load_arg: str) -> None:
    """Before Megatron loads from --load (or `load_arg`): the checkpoint folder it will read
    against its digest manifest, on every rank together; CorruptCheckpoint naming the files
    and the way back. A folder without a manifest (saved before them, or with --async-save)
    loads with a warning."""
    from .checkpoint.digest import verify_folder_manifest

    root = getattr(args, load_arg, None)
    folder = megatron_checkpoint_folder(root, args) if root else None
    if folder is None or not folder.is_dir():
        return  # Megatron reports a missing checkpoint itself
    problems = verify_folder_manifest(folder)
    if problems is None:
        _print_rank0(f"WARNING: {folder} has no digest manifest: loading it unverified")
    elif problems:
        shown = _first_of(problems, 5)
        raise CorruptCheckpoint(
            f"--{load_arg.replace('_', '-')} {root}: {folder.name} does not match the digest "
            f"manifest written when it was saved: {shown}. Resume from an earlier checkpoint "
            "with --ckpt-step ITERATION (its iter_* folder), or restore the folder")


def _print_rank0(message: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(message, flush=True)


_checked_models: set[int] = set()


def check_loaded_weights(model: torch.nn.Module, args) -> None:
    """Once per model chunk, when Megatron has resumed from `--load` (args.iteration > 0): every
    floating-point parameter and buffer finite, in one host sync. Megatron's loader checks
    neither checksums nor values, so a checkpoint with corrupted bytes (or one saved after a
    diverged step) would otherwise train on silently; CorruptCheckpoint names the tensors and
    the way back to an earlier checkpoint."""
    if id(model) in _checked_models:
        return
    _checked_models.add(id(model))
    if not getattr(args, "load", None) or not getattr(args, "iteration", 0):
        return
    named = [(name, tensor) for source in (model.named_parameters(), model.named_buffers())
             for name, tensor in source if tensor.is_floating_point() and tensor.numel()]
    finite = torch.stack([torch.isfinite(tensor).all() for _, tensor in named]).tolist()
    bad = [name for (name, _), ok in zip(named, finite) if not ok]
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise CorruptCheckpoint(
            f"--load {args.load}: the checkpoint of iteration {args.iteration} holds NaN or "
            f"Inf in {len(bad)} of {len(named)} tensors ({shown}); its files are corrupted or "
            "it was saved after a diverged step. Resume from an earlier one with --ckpt-step "
            "ITERATION (its iter_* folder in --load), or restore the folder")


def freeze_biases_after(model: torch.nn.Module, args) -> None:
    """--bias-update-stop-tokens: Megatron's update skips routers with frozen_expert_bias."""
    from .moe.router import Router

    stop = args.bias_update_stop_tokens
    frozen = stop is not None and tokens_trained(args) >= stop
    for module in model.modules():
        if isinstance(module, Router):
            module.frozen_expert_bias = frozen


# ----------------------------------------------------------------------------------------------
# Data (Megatron's train_valid_test_datasets_provider)
# ----------------------------------------------------------------------------------------------
def gpt_dataset_config(args, tokenizer):
    """Megatron's GPTDatasetConfig for `--data-path` / `--split` (its indexed datasets)."""
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig
    from megatron.training.utils import get_blend_and_blend_per_split

    blend, blend_per_split = get_blend_and_blend_per_split(args)
    return GPTDatasetConfig(
        random_seed=args.seed, sequence_length=args.seq_length, blend=blend,
        blend_per_split=blend_per_split, split=args.split, path_to_cache=args.data_cache_path,
        mmap_bin_files=args.mmap_bin_files, tokenizer=tokenizer,
        reset_position_ids=args.reset_position_ids,
        reset_attention_mask=args.reset_attention_mask, eod_mask_loss=args.eod_mask_loss,
        create_attention_mask=False)


def check_splits_have_data(config, num_samples) -> None:
    """Refuse a `--split` that leaves a split which must give samples without a sequence:
    Megatron's GPTDataset then loops forever building its index (measured on the GPU: the
    bundled corpus's 15 sequences under --split 98,2,0 give the validation split none).
    The bounds are Megatron's: round(share * sequences) of each indexed dataset in the blend."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    if config.blend is None or config.split_matrix is None:
        return  # per-split files (--train-data-path ...) or mock data: nothing split here
    names = ("training", "validation", "test")
    for prefix in config.blend[0]:
        sequences = len(IndexedDataset(prefix, mmap=config.mmap_bin_files).sequence_lengths)
        for name, bounds, wanted in zip(names, config.split_matrix, num_samples):
            if bounds is None or not wanted:
                continue
            begin, end = (int(round(share * float(sequences))) for share in bounds)
            if end <= begin:
                raise ConfigError(
                    f"--split {config.split} gives the {name} split no sequence of {prefix} "
                    f"({sequences} sequences in all) but {wanted} samples are asked of it; "
                    "Megatron's dataset would loop forever: give that split a larger share "
                    "(each share * sequences must round to at least one), or more documents")


def train_valid_test_datasets_provider(train_val_test_num_samples, vp_stage=None):
    """Megatron's indexed GPT datasets, built on the ranks that read data (tensor-parallel
    rank 0 of the first and last pipeline stages)."""
    from megatron.core import parallel_state
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset
    from megatron.training import get_args, get_tokenizer
    from megatron.training.utils import is_first_or_last_pipeline_stage

    from . import pretrain_dualpipe as dualpipe

    args = get_args()

    def built_here():
        if parallel_state.get_tensor_model_parallel_rank() != 0:
            return False
        if args.pipeline_schedule == dualpipe.SCHEDULE:  # the V: rank 0 holds both ends
            return dualpipe.reads_data(dualpipe.stage_plan(args),
                                       parallel_state.get_pipeline_model_parallel_rank(),
                                       vp_stage)
        return is_first_or_last_pipeline_stage(vp_stage)

    config = gpt_dataset_config(args, get_tokenizer())
    check_splits_have_data(config, train_val_test_num_samples)
    return BlendedMegatronDatasetBuilder(GPTDataset, train_val_test_num_samples, built_here,
                                         config).build()


train_valid_test_datasets_provider.is_distributed = True


def megatron_config_container(args):
    """Megatron's run configuration from its parsed arguments, without a model config.

    Given one (`gpt_config_from_args`), Megatron 0.19's setup builds its own `GPTModel` from
    that config's layer spec and never calls the model provider; without, it calls ours
    (measured on the GPU: Megatron's MLA was built instead of ours and failed).
    """
    import warnings

    from megatron.training.argument_utils import pretrain_cfg_container_from_args

    with warnings.catch_warnings():  # "a ModelConfig is recommended over a model provider"
        warnings.filterwarnings("ignore", message=r"\s*It is recommended to use a ModelConfig")
        return pretrain_cfg_container_from_args(args, None)


# ----------------------------------------------------------------------------------------------
# The entry point
# ----------------------------------------------------------------------------------------------
def main(argv: Optional[list[str]] = None) -> None:
    import sys

    from megatron.core.enums import ModelType
    from megatron.training import pretrain
    from megatron.training.arguments import parse_and_validate_args

    import os

    from . import pretrain_dualpipe as dualpipe
    from .fp8.weight_cache import weights_fixed
    from .megatron_compat import (around_forward_backward, around_megatron_checkpointing,
                                  around_megatron_evaluate, use_prebuilt_dataset_helpers)
    from .model import compile_model, model_provider
    from .moe.experts import sum_expert_grads_in_gemm
    from .pretrain_log import PretrainLog

    sys.argv = [sys.argv[0], *nan_stops_the_run(fp8_without_te(dualpipe.with_two_chunks_per_rank(
        without_missing_kernels(expand_preset(sys.argv[1:] if argv is None else argv)))))]
    args = parse_and_validate_args(extra_args_provider=add_arguments)
    check_fp8_model(args)
    if args.pipeline_schedule == dualpipe.SCHEDULE:
        dualpipe.check_microbatches(dualpipe.stage_plan(args), args.global_batch_size // (
            args.micro_batch_size * args.data_parallel_size))
        dualpipe.install()
    parse_mtp_loss_weights(args.mtp_loss_weights)  # a clear error before anything is built
    check_resume_matches(args)
    if args.expert_load_image_interval < 0:
        raise ConfigError(f"--expert-load-image-interval {args.expert_load_image_interval} is "
                          "invalid: give a number of iterations, or 0 for no image")
    if args.wandb_project and "WANDB_API_KEY" not in os.environ:
        os.environ.setdefault("WANDB_MODE", "offline")  # before Megatron's wandb.init

    use_our_adamw(args)

    fp8 = {"fp8": args.dsv3_fp8, "fp8_layers": fp8_layers_flag(args.dsv3_fp8_layers)}
    in_gemm = expert_wgrad_in_gemm(args)

    def provide_model(pre_process=True, post_process=True, vp_stage=None, config=None,
                      pg_collection=None):
        if args.pipeline_schedule == dualpipe.SCHEDULE:
            model = dualpipe.provide_stage(
                args, lambda whole, groups: model_provider(config=whole, pg_collection=groups,
                                                           **fp8),
                vp_stage=vp_stage, pg_collection=pg_collection, config=config)
        else:
            model = model_provider(pre_process, post_process, vp_stage=vp_stage, config=config,
                                   pg_collection=pg_collection, **fp8)
        PretrainLog.install(model.config, args)
        if in_gemm:  # before compiling: the flag is read when the modules are traced
            sum_expert_grads_in_gemm(model)
        scope, mode = compile_settings(args)
        if scope != "none":
            compile_model(model, scope=scope, **({} if mode == "default" else {"mode": mode}))
        return model
    cfg = megatron_config_container(args)
    use_prebuilt_dataset_helpers()  # the wheel's pretrain() would run `make` and exit
    around_megatron_checkpointing(partial(manifest_after_save, args),
                                  partial(verify_before_load, args),
                                  partial(check_resumed_optimizer, args))
    around_megatron_evaluate(partial(eager_while_graphed, args))
    around_forward_backward(weights_fixed)  # FP8 weights quantized once per iteration
    pretrain(cfg, train_valid_test_datasets_provider, ModelType.encoder_or_decoder,
             forward_step, model_provider=provide_model)


if __name__ == "__main__":
    main()
