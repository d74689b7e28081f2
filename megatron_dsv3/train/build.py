"""What the job builds before its first step: the device, the initial model, AdamW.

The initial weights are the same at any TP and EP size for a given seed: they are drawn on the
CPU as the full TP=1, EP=1 model and each TP/EP rank keeps its slice of every tensor. With a
pipeline every rank builds the whole model (its TP/EP shard); `pipeline.Pipeline` then keeps
this rank's stages.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist

from ..config import ModelConfig, to_megatron_config


def pick_device(args) -> torch.device:
    if args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def build_initial_model(cfg: ModelConfig, pg, seed: int, device: torch.device):
    """The model with the same initial weights at every TP and EP size for a given seed.

    Weights are drawn on the CPU (the same draw on any machine): with TP > 1 or EP > 1 each
    rank draws the full TP=1, EP=1 model (on groups of itself) and keeps its slice of every
    tensor."""
    from ..model import build_model
    from ..parallel import load_full_state_dict, whole_model_groups

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
        load_full_state_dict(model, full, pg.tp, pg.ep)
    return model.to(device)


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

    scope = args.compile
    if scope == "auto":
        scope = "modules" if device.type == "cuda" else "none"
    if scope == "none":
        return 0
    mode = {} if args.compile_mode == "default" else {"mode": args.compile_mode}
    return compile_model(model, scope=scope, **mode)


def build_optimizer(model: torch.nn.Module, args) -> torch.optim.AdamW:
    """AdamW (DeepSeek-V3's betas) with weight decay on matrices, none on norms; the fused
    kernel when the parameters are on a GPU (one launch for all tensors)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    fused = bool(params) and params[0].device.type == "cuda"
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=fused)
