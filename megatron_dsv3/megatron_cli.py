"""A model config as Megatron-LM's command-line flags, for Megatron's own training loop.

Megatron's `pretrain` reads the model from its arguments (`--num-layers`, `--multi-latent-
attention`, `--num-experts`, ...); `model.model_provider` reads them back through
`config.from_megatron_config`. `megatron_flags(cfg)` writes a ModelConfig (a preset) as those
flags (`python -m megatron_dsv3.pretrain --preset proxy ...` puts them in front of its
command line), so that it trains exactly the preset. For one's own `pretrain_gpt.py` the flags
are printed shell-quoted (one of them holds brackets and stars), to be read back by the shell:

    eval "python pretrain_gpt.py $(python -m megatron_dsv3.megatron_cli proxy) ..."

`from_megatron_config` of the parsed flags gives the preset back in every field Megatron's
arguments carry (tested). Not carried, and set by our own arguments instead: the vocabulary
(Megatron takes it from the tokenizer), the MTP weight's schedule after its first value, the
step at which the bias update stops, and the implementations our modules choose at run time
(attention, experts, linear backend).
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

import torch

from .config import ConfigError, ModelConfig, preset

# YaRN settings Megatron-LM's arguments have no flag for: its MLATransformerConfig's values
_YARN_FIXED = {"original_max_position_embeddings": 4096, "beta_fast": 32.0, "beta_slow": 1.0}
_DTYPE_FLAGS = {torch.bfloat16: ["--bf16"], torch.float16: ["--fp16"], torch.float32: []}


def _number(value: float) -> str:
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


def megatron_flags(cfg: ModelConfig) -> list[str]:
    """Megatron-LM flags describing `cfg` (module docstring)."""
    mla, moe, mtp = cfg.mla, cfg.moe, cfg.mtp
    dense_layers = moe.first_k_dense
    flags = [
        "--num-layers", str(cfg.num_layers), "--hidden-size", str(cfg.hidden_size),
        "--num-attention-heads", str(mla.num_heads),
        "--ffn-hidden-size", str(moe.dense_ffn_size if dense_layers else moe.expert_ffn_size),
        "--kv-channels", str(mla.v_head_dim),
        "--normalization", "RMSNorm", "--norm-epsilon", _number(cfg.norm_eps), "--swiglu",
        "--disable-bias-linear", "--hidden-dropout", "0", "--attention-dropout", "0",
        "--init-method-std", _number(cfg.init_std), *_DTYPE_FLAGS[cfg.torch_dtype],
        "--untie-embeddings-and-output-weights",
        "--position-embedding-type", "none", "--max-position-embeddings", str(cfg.max_seq_len),
        # MLA
        "--multi-latent-attention", "--kv-lora-rank", str(mla.kv_lora_rank),
        "--qk-head-dim", str(mla.qk_nope_head_dim),
        "--qk-pos-emb-head-dim", str(mla.qk_rope_head_dim), "--v-head-dim", str(mla.v_head_dim),
        "--rotary-base", _number(mla.rope_theta),
        # MoE
        "--num-experts", str(moe.num_experts),
        "--moe-layer-freq", f"[0]*{dense_layers}+[1]*{cfg.num_layers - dense_layers}",
        "--moe-ffn-hidden-size", str(moe.expert_ffn_size),
        "--moe-router-topk", str(moe.top_k), "--moe-router-score-function", "sigmoid",
        "--moe-router-topk-scaling-factor", _number(moe.route_scale),
        "--moe-router-dtype", "fp32", "--moe-token-dispatcher-type", "alltoall",
    ]
    if mla.q_lora_rank > 0:
        flags += ["--q-lora-rank", str(mla.q_lora_rank)]
    if mla.yarn is not None:
        yarn = mla.yarn
        fixed = {name: (getattr(yarn, name), value) for name, value in _YARN_FIXED.items()
                 if getattr(yarn, name) != value}
        if fixed:
            raise ConfigError(
                f"{cfg.name}: YaRN {', '.join(f'{k}={v[0]}' for k, v in fixed.items())} cannot be "
                "given to Megatron-LM's arguments (it has no flag for them and uses "
                f"{', '.join(f'{k}={v[1]}' for k, v in fixed.items())}): use those values, or "
                "build the model with megatron_dsv3.config.to_megatron_config instead")
        flags += ["--rope-type", "yarn", "--rotary-scaling-factor", _number(yarn.factor),
                  "--mscale", _number(yarn.mscale),
                  "--mscale-all-dim", _number(yarn.mscale_all_dim)]
    else:  # Megatron's RoPE fusion for MLA exists only for YaRN
        flags += ["--rope-type", "rope", "--no-rope-fusion"]
    if moe.num_shared_experts:
        flags += ["--moe-shared-expert-intermediate-size", str(moe.shared_ffn_size)]
    if moe.num_groups > 1:
        flags += ["--moe-router-num-groups", str(moe.num_groups),
                  "--moe-router-group-topk", str(moe.topk_groups)]
    if moe.bias_update_rate > 0:
        flags += ["--moe-router-enable-expert-bias",
                  "--moe-router-bias-update-rate", _number(moe.bias_update_rate)]
    if moe.seq_aux_loss_coeff > 0:
        flags += ["--moe-router-load-balancing-type", "seq_aux_loss",
                  "--moe-aux-loss-coeff", _number(moe.seq_aux_loss_coeff)]
    else:
        flags += ["--moe-router-load-balancing-type", "none", "--moe-aux-loss-coeff", "0"]
    if mtp.num_layers:
        flags += ["--mtp-num-layers", str(mtp.num_layers),
                  "--mtp-loss-scaling-factor", _number(mtp.loss_weight(0))]
    return flags


def take_flag(argv: list[str], flag: str) -> tuple[list[Optional[str]], list[str]]:
    """The values given to `flag` on a command line, in order (`--flag VALUE` or
    `--flag=VALUE`; None for a `--flag` with nothing after it), and the command line without
    them (argparse keeps the last value of a flag given twice)."""
    values: list[Optional[str]] = []
    rest: list[str] = []
    i = 0
    while i < len(argv):
        name, equals, inline = argv[i].partition("=")
        if name != flag:
            rest.append(argv[i])
        elif equals:
            values.append(inline)
        elif i + 1 < len(argv):
            values.append(argv[i + 1])
            i += 1
        else:
            values.append(None)
        i += 1
    return values, rest


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_dsv3.megatron_cli",
        description="Print a preset as Megatron-LM's model flags (one line, shell-quoted).")
    parser.add_argument("preset", help="tiny, proxy, v2-lite or v3-671b")
    args = parser.parse_args(argv)
    import shlex

    print(shlex.join(megatron_flags(preset(args.preset))))


if __name__ == "__main__":
    main(sys.argv[1:])
