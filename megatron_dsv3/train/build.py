"""What the job builds before its first step: the device, the data, the initial model, AdamW.

The initial weights are the same at any TP and EP size for a given seed: they are drawn on the
CPU as the full TP=1, EP=1 model and each TP/EP rank keeps its slice of every tensor. With
--init-from they are the file's full state dict instead, checked against the model (every
tensor there, none extra, each of the full model's shape) and sliced the same way. With a
pipeline every rank builds the whole model (its TP/EP shard); `pipeline.Pipeline` then keeps
this rank's stages.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.distributed as dist

from ..config import ModelConfig, to_megatron_config
from .args import TrainError, uses_bf16_autocast


def pick_device(args) -> torch.device:
    if args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def load_data(args, cfg: ModelConfig):
    """The tokenized corpus of --data-dir (a data.TokenCorpus), checked against what the run
    will draw from it before the model is built: a TrainError naming the file or the flag and
    the fix, instead of a traceback or a failure at the first step or evaluation."""
    from ..data import DataError, load_corpus

    try:
        tokenizer, corpus = load_corpus(args.data_dir, val_fraction=args.val_fraction)
    except (DataError, FileNotFoundError) as err:
        raise TrainError(f"--data-dir {args.data_dir}: {err}") from err
    if tokenizer.vocab_size > cfg.vocab_size:
        model = ("preset" if getattr(args, "init_from", None) is None
                 else f"the model of --init-from {args.init_from},")
        raise TrainError(f"--data-dir {args.data_dir}: its tokenizer has {tokenizer.vocab_size} "
                         f"tokens, more than {model} '{cfg.name}' vocab_size={cfg.vocab_size}; "
                         "use a model with a larger vocabulary or a smaller tokenizer")
    window = args.seq_len + 1  # a sequence and the label of its last token
    num_train, num_val = corpus.train.numel(), corpus.val.numel()
    total = num_train + num_val
    if num_train < window:
        raise TrainError(f"--data-dir {args.data_dir} holds {total} tokens; less the "
                         f"--val-fraction {args.val_fraction} held out, its training split has "
                         f"{num_train}, fewer than one sequence of --seq-len + 1 = {window}: "
                         "lower --seq-len or --val-fraction, or use a bigger corpus")
    if args.eval_interval and num_val < window:
        # Windows are drawn with replacement: one is all an evaluation needs.
        raise TrainError(
            f"--val-fraction {args.val_fraction} holds out {num_val} of the {total} tokens in "
            f"--data-dir {args.data_dir}, fewer than one validation sequence of --seq-len + 1 = "
            f"{window} (an evaluation draws --eval-batches {args.eval_batches} x "
            f"--micro-batch-size {args.micro_batch_size} such windows, with replacement): the "
            f"first evaluation (--eval-interval {args.eval_interval}) would fail. Raise "
            f"--val-fraction to {_fraction_for(window, total)} or more, lower --seq-len, or pass "
            "--eval-interval 0 (no validation)")
    return corpus


def _fraction_for(tokens: int, total: int) -> str:
    """A --val-fraction of 2 significant digits, near the smallest, that holds `tokens` of
    `total` (int(total * fraction) >= tokens, as data.load_corpus splits)."""
    fraction = float(f"{tokens / total:.2g}")
    while int(total * fraction) < tokens:
        fraction = float(f"{fraction * 1.1:.2g}")
    return f"{fraction:g}"


def build_initial_model(cfg: ModelConfig, pg, seed: int, device: torch.device,
                        init_state: Optional[dict] = None, init_source: str = ""):
    """The model with the same initial weights at every TP and EP size for a given seed, or
    with the weights of `init_state` (a full TP=1, EP=1 state dict; `init_source` names where it
    came from in errors, e.g. "--init-from FILE").

    Weights are drawn on the CPU (the same draw on any machine): with TP > 1 or EP > 1 each
    rank draws the full TP=1, EP=1 model (on groups of itself) and keeps its slice of every
    tensor. `init_state` is checked against the model first (`check_full_state_fits`)."""
    from ..model import build_model
    from ..parallel import load_full_state_dict, whole_model_groups

    tp, ep = pg.tp.size(), pg.ep.size()
    torch.manual_seed(seed)
    # With a pipeline, every rank builds the whole model (its TP/EP shard), cut into stages
    # later; with TP > 1 Megatron's layers skip their own draw: every weight is loaded below.
    with whole_model_groups(pg) as groups:
        model = build_model(cfg, pg_collection=groups, megatron_config=to_megatron_config(
            cfg, tensor_parallel_size=tp, expert_parallel_size=ep, use_cpu_initialization=True,
            perform_initialization=tp == 1 and init_state is None))
        full = (_full_model_state(cfg, groups, seed) if (tp > 1 or ep > 1)
                and init_state is None else None)
    if init_state is not None:
        full = check_full_state_fits(model, init_state, tp, ep, init_source)
    if full is not None:
        load_full_state_dict(model, full, pg.tp, pg.ep)
    return model.to(device)


_LISTED = 8  # tensor names listed per kind of problem


def check_full_state_fits(model: torch.nn.Module, state: dict, tp: int, ep: int,
                          source: str) -> dict:
    """The tensors of the full (TP=1, EP=1) state dict `state`, once every one the model (this
    rank's TP/EP shard of it) holds is there with the full model's shape and none is extra;
    otherwise a TrainError naming the tensors and `source`. (Megatron's `_extra_state` entries
    hold no weights and are left out on both sides.)"""
    from ..parallel import EXPERT_DIM, is_expert_parallel

    params = dict(model.named_parameters())
    expected = {}
    for name, value in model.state_dict().items():
        if name.endswith("_extra_state") or not isinstance(value, torch.Tensor):
            continue
        shape = list(value.shape)
        param = params.get(name)
        if param is not None and getattr(param, "tensor_model_parallel", False):
            shape[param.partition_dim] *= tp
        if param is not None and is_expert_parallel(param):
            shape[EXPERT_DIM] *= ep
        expected[name] = tuple(shape)
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(k for k in state if k not in expected and not k.endswith("_extra_state"))
    shapes = [f"{k} is {tuple(tensors[k].shape)} in the file, {expected[k]} in the model"
              for k in expected if k in tensors and tuple(tensors[k].shape) != expected[k]]
    problems = []
    for what, names in (("missing tensors", missing), ("tensors the model does not have",
                                                       extra), ("shapes differ", shapes)):
        if names:
            more = f" (and {len(names) - _LISTED} more)" if len(names) > _LISTED else ""
            problems.append(f"{what}: {', '.join(names[:_LISTED])}{more}")
    if problems:
        raise TrainError(f"{source} does not fit the model of its model_config: "
                         + "; ".join(problems) + ". Its weights and model_config must describe "
                         "one model: write the file again with `python -m "
                         "megatron_dsv3.checkpoint.convert hf-to-dsv3` (or pass the run's own "
                         "checkpoint)")
    return {k: tensors[k] for k in expected}


def _full_model_state(cfg: ModelConfig, pg, seed: int) -> dict:
    from ..model import build_model

    # Every rank must create every group, in the same order.
    own_groups = [dist.new_group([r]) for r in range(dist.get_world_size())]
    solo = copy.copy(pg)
    solo.tp = solo.ep = own_groups[dist.get_rank()]
    torch.manual_seed(seed)
    full = build_model(cfg, pg_collection=solo, megatron_config=to_megatron_config(
        cfg, tensor_parallel_size=1, use_cpu_initialization=True))
    return {k: v for k, v in full.state_dict().items() if isinstance(v, torch.Tensor)}


def compile_for_device(model: torch.nn.Module, args, device: torch.device) -> int:
    """`--compile` (auto: our modules on cuda, nothing on cpu) with `--compile-mode`, in place
    (state-dict names unchanged); returns how many modules were compiled."""
    from ..model import compile_model

    scope, mode = _compile_settings(args, device)
    if scope == "none":
        return 0
    return compile_model(model, scope=scope, **({} if mode == "default" else {"mode": mode}))


def compile_mode(args, device: torch.device) -> str:
    """--compile-mode, auto resolved (model.resolve_compile)."""
    return _compile_settings(args, device)[1]


def _compile_settings(args, device: torch.device) -> tuple[str, str]:
    from ..model import resolve_compile

    parallel = any(getattr(args, f"{kind}_parallel_size", 1) > 1  # read for auto only
                   for kind in ("tensor", "expert", "pipeline"))
    return resolve_compile(args.compile, args.compile_mode, on_cuda=device.type == "cuda",
                           parallel=parallel)


def uses_cuda_graphs(args, device: torch.device) -> bool:
    """Whether the compiled modules run as CUDA graphs (reduce-overhead on cuda)."""
    return (device.type == "cuda" and args.compile != "none"
            and "reduce-overhead" in compile_mode(args, device))


def expert_wgrad_mode(args, cfg: ModelConfig, dtype: torch.dtype,
                      device: torch.device) -> str:
    """--expert-wgrad, auto resolved: in-gemm (the sums added inside the grouped GEMM, the
    fastest measured on one H200: RESULTS.md 2026-12-03) where the parameters are bf16 with
    fp32 masters on cuda without a pipeline and the experts run as grouped GEMMs, micro-batch
    otherwise."""
    from ..moe.experts import GROUPED_IMPLS, resolve_experts_impl

    if args.expert_wgrad != "auto":
        return args.expert_wgrad
    fast = (device.type == "cuda" and dtype != torch.float32
            and args.pipeline_parallel_size == 1
            and resolve_experts_impl(cfg.moe.experts_impl, device) in GROUPED_IMPLS)
    return "in-gemm" if fast else "micro-batch"


def params_dtype(args, device: torch.device) -> torch.dtype:
    """--params-dtype, auto resolved: bfloat16 (fp32 masters) where bf16 autocast runs on cuda
    without a pipeline, float32 otherwise."""
    if args.params_dtype == "auto":
        fast = (device.type == "cuda" and uses_bf16_autocast(args, device)
                and args.pipeline_parallel_size == 1)
        return torch.bfloat16 if fast else torch.float32
    return getattr(torch, args.params_dtype)


def sum_expert_grads_in_gemm_if_asked(model: torch.nn.Module, args, masters,
                                      device: torch.device) -> bool:
    """--expert-wgrad in-gemm: each backward adds the routed experts' weight gradients into
    the masters' fp32 sums inside the grouped GEMM (moe/experts.py, kernels/grouped_wgrad.py)
    instead of a bf16 gradient and a pass adding it in. Returns whether it does; a TrainError
    where the run has no fp32 sums on a GPU (--device auto found no GPU, or fp32 parameters)."""
    from ..moe.experts import sum_expert_grads_in_gemm

    if args.expert_wgrad != "in-gemm":
        return False
    if masters is None or device.type != "cuda":
        raise TrainError(
            f"--expert-wgrad in-gemm adds into the fp32 sums of bf16 parameters on a GPU; this "
            f"run has {'no GPU' if device.type != 'cuda' else 'fp32 parameters'}: pass "
            "--expert-wgrad micro-batch")
    sum_expert_grads_in_gemm(model)
    return True


def expert_grad_merger(model: torch.nn.Module, args, cfg, masters=None):
    """--expert-wgrad step: an ExpertGradMerger attached to the model's routed experts (buffers
    for --grad-accum micro-batches of micro-batch x seq-len x top-k rows, in the GEMMs' dtype),
    storing into the masters' fp32 sums where they hold nothing of the step yet; otherwise
    None."""
    from ..moe.expert_wgrad import ExpertGradMerger

    if args.expert_wgrad != "step":
        return None
    bf16 = masters is not None or uses_bf16_autocast(args, next(model.parameters()).device)
    merger = ExpertGradMerger(args.grad_accum, args.micro_batch_size * args.seq_len
                              * cfg.moe.top_k, dtype=torch.bfloat16 if bf16 else torch.float32,
                              stores_first=None if masters is None else masters.claims_sum)
    merger.attach(model)
    return merger


def build_optimizer(params: list[torch.Tensor], args, masters=None) -> torch.optim.AdamW:
    """AdamW (DeepSeek-V3's betas) over `params` (fp32: the model's parameters or the masters
    of `masters`, a MasterWeights) with weight decay on matrices, none on norms. With masters,
    MasterAdamW (its step also publishes the masters into the model and zeroes their gradient
    sums; one Triton kernel per tensor on a GPU) with --adam-moments-dtype's moments (auto:
    bf16, DeepSeek-V3's); without, torch's, fused on a GPU."""
    from .master_weights import MasterAdamW

    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    hyper = {"lr": args.lr, "betas": (0.9, 0.95), "eps": 1e-8}
    if masters is not None:
        moments = torch.float32 if args.adam_moments_dtype == "float32" else torch.bfloat16
        return MasterAdamW(groups, masters, moments_dtype=moments, **hyper)
    if args.adam_moments_dtype == "bfloat16":
        raise TrainError("--adam-moments-dtype bfloat16 needs bf16 parameters with fp32 masters; "
                         "this run has fp32 parameters (--params-dtype auto found no GPU, or a "
                         "pipeline): pass --adam-moments-dtype auto")
    fused = bool(params) and params[0].device.type == "cuda"
    return torch.optim.AdamW(groups, fused=fused, **hyper)
