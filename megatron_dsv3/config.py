"""Configuration: one small frozen dataclass per mechanism, presets, and the Megatron adapter.

What lives here
  MLAConfig    multi-head latent attention (docs/architecture.md 3.1)
  MoEConfig    DeepSeekMoE and its router (section 2)
  MTPConfig    multi-token prediction and its loss-weight schedule (section 3)
  ModelConfig  the whole model: widths, depth, vocabulary, the three above, numerics
  PRESETS      tiny / proxy / v2-lite / v3-671b, as functions (no copied code)
  to_megatron_config / from_megatron_config   the one mapping onto Megatron-Core's
               MLATransformerConfig and back (for `--spec MODULE FUNCTION`)

Every config validates itself at construction; an error names the field, the bad value
and what to change. Parallel sizes (TP, PP, DP) are not part of the model config: the same
model runs at any size; they enter through `to_megatron_config` and the process groups.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch


class ConfigError(ValueError):
    """A configuration value is invalid. The message names the field and the fix."""


def _check(condition: bool, field_name: str, value, fix: str) -> None:
    if not condition:
        raise ConfigError(f"{field_name}={value!r} is invalid: {fix}")


def _positive(obj, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        _check(isinstance(value, int) and value > 0, f"{type(obj).__name__}.{name}", value,
               "must be a positive integer")


# ----------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class YarnConfig:
    """YaRN context extension of the rope part (DeepSeek-V2/V3 settings by default).

    The rope frequencies are interpolated between `beta_slow` and `beta_fast` rotations over
    `original_max_position_embeddings`, and the softmax scale is multiplied by mscale**2 with
    mscale = 0.1 * mscale * ln(factor) + 1 (cos/sin are left unscaled, as in DeepSeek's code;
    Hugging Face matches this only when mscale_all_dim == mscale).
    """

    factor: float = 40.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0

    def __post_init__(self):
        _check(self.factor >= 1.0, "YarnConfig.factor", self.factor,
               "must be >= 1 (1 means no extension; drop the YaRN config instead)")
        _positive(self, "original_max_position_embeddings")
        _check(self.beta_fast > self.beta_slow > 0, "YarnConfig.beta_fast/beta_slow",
               (self.beta_fast, self.beta_slow), "need beta_fast > beta_slow > 0 (V3: 32, 1)")
        _check(self.mscale_all_dim == self.mscale, "YarnConfig.mscale_all_dim",
               self.mscale_all_dim,
               f"must equal mscale={self.mscale}: DeepSeek scales the softmax by mscale**2 and "
               "leaves cos/sin alone, which is the mscale_all_dim == mscale case")

    @property
    def softmax_mscale(self) -> float:
        if self.factor <= 1.0:
            return 1.0
        return 0.1 * self.mscale * math.log(self.factor) + 1.0


@dataclass(frozen=True)
class MLAConfig:
    """Multi-head latent attention widths (docs/architecture.md 3.1).

    q_lora_rank = 0 means no query compression (DeepSeek-V2-Lite): q = W^Q h directly.
    """

    num_heads: int
    q_lora_rank: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rope_theta: float = 10000.0
    yarn: Optional[YarnConfig] = None
    # "auto": fused SDPA on GPU, the plain reference on CPU (where SDPA gains nothing and the
    # reference is exact); "sdpa" / "reference" force one.
    attention_impl: Literal["auto", "sdpa", "reference"] = "auto"

    def __post_init__(self):
        _positive(self, "num_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                  "v_head_dim")
        _check(isinstance(self.q_lora_rank, int) and self.q_lora_rank >= 0,
               "MLAConfig.q_lora_rank", self.q_lora_rank,
               "must be >= 0 (0 disables query compression, as in DeepSeek-V2-Lite)")
        _check(self.qk_rope_head_dim % 2 == 0, "MLAConfig.qk_rope_head_dim",
               self.qk_rope_head_dim, "must be even: RoPE rotates pairs of channels")
        _check(self.rope_theta > 0, "MLAConfig.rope_theta", self.rope_theta, "must be > 0")
        _check(self.attention_impl in ("auto", "sdpa", "reference"), "MLAConfig.attention_impl",
               self.attention_impl, "choose 'auto', 'sdpa' or 'reference'")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        scale = self.qk_head_dim ** -0.5
        if self.yarn is not None:
            scale *= self.yarn.softmax_mscale ** 2
        return scale

    @property
    def kv_cache_values_per_token(self) -> int:
        """What MLA caches per token per layer at inference: the latent and the rope key."""
        return self.kv_lora_rank + self.qk_rope_head_dim


# ----------------------------------------------------------------------------------------------
# Mixture of experts
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MoEConfig:
    """DeepSeekMoE: shared + fine-grained routed experts, sigmoid router with a selection bias.

    first_k_dense layers use a dense SwiGLU FFN of width dense_ffn_size; the rest are MoE.
    Router (docs/architecture.md 3.2): scores s = sigmoid(u e_i); selection by top-k of s + b within
    the top `topk_groups` of `num_groups` expert groups; gates = s over the selection,
    normalised, times route_scale. The bias b moves by bias_update_rate * sign(mean - load)
    once per optimizer step until bias_update_stop_tokens tokens have been trained.
    """

    num_experts: int
    top_k: int
    expert_ffn_size: int
    num_shared_experts: int
    first_k_dense: int
    dense_ffn_size: int
    num_groups: int = 1
    topk_groups: int = 1
    route_scale: float = 1.0
    normalize_gates: bool = True
    seq_aux_loss_coeff: float = 0.0
    bias_update_rate: float = 1e-3
    bias_update_stop_tokens: Optional[int] = None  # None: never stop
    # "auto": torch._grouped_mm on GPU, the per-expert loop on CPU. "triton" (opt-in): the
    # forward and input-gradient GEMMs by kernels/grouped_gemm.py, dW by torch._grouped_mm.
    experts_impl: Literal["auto", "grouped_mm", "loop", "triton"] = "auto"

    def __post_init__(self):
        _positive(self, "num_experts", "top_k", "expert_ffn_size", "num_groups", "topk_groups")
        _check(isinstance(self.num_shared_experts, int) and self.num_shared_experts >= 0,
               "MoEConfig.num_shared_experts", self.num_shared_experts, "must be >= 0")
        _check(isinstance(self.first_k_dense, int) and self.first_k_dense >= 0,
               "MoEConfig.first_k_dense", self.first_k_dense, "must be >= 0")
        _check(self.first_k_dense == 0 or self.dense_ffn_size > 0, "MoEConfig.dense_ffn_size",
               self.dense_ffn_size, "must be > 0 when first_k_dense > 0")
        _check(self.top_k <= self.num_experts, "MoEConfig.top_k", self.top_k,
               f"cannot exceed num_experts={self.num_experts}")
        _check(self.num_experts % self.num_groups == 0, "MoEConfig.num_groups", self.num_groups,
               f"must divide num_experts={self.num_experts} (V3: 256 experts in 8 groups)")
        _check(self.topk_groups <= self.num_groups, "MoEConfig.topk_groups", self.topk_groups,
               f"cannot exceed num_groups={self.num_groups}")
        experts_per_group = self.num_experts // self.num_groups
        _check(self.num_groups == 1 or experts_per_group >= 2, "MoEConfig.num_groups",
               self.num_groups, "groups are ranked by their top-2 scores, so each group needs "
               "at least 2 experts; use fewer groups")
        _check(self.top_k <= self.topk_groups * experts_per_group, "MoEConfig.top_k", self.top_k,
               f"cannot exceed topk_groups * experts_per_group = "
               f"{self.topk_groups * experts_per_group}; raise topk_groups or lower top_k")
        _check(self.route_scale > 0, "MoEConfig.route_scale", self.route_scale, "must be > 0")
        _check(self.seq_aux_loss_coeff >= 0, "MoEConfig.seq_aux_loss_coeff",
               self.seq_aux_loss_coeff, "must be >= 0 (0 disables the balance loss)")
        _check(self.bias_update_rate >= 0, "MoEConfig.bias_update_rate", self.bias_update_rate,
               "must be >= 0 (0 freezes the routing bias)")
        _check(self.bias_update_stop_tokens is None or self.bias_update_stop_tokens >= 0,
               "MoEConfig.bias_update_stop_tokens", self.bias_update_stop_tokens,
               "must be None (never stop) or a token count >= 0")
        _check(self.experts_impl in ("auto", "grouped_mm", "loop", "triton"),
               "MoEConfig.experts_impl", self.experts_impl,
               "choose 'auto', 'grouped_mm', 'loop' or 'triton'")

    @property
    def shared_ffn_size(self) -> int:
        return self.num_shared_experts * self.expert_ffn_size


# ----------------------------------------------------------------------------------------------
# Multi-token prediction
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MTPConfig:
    """D sequential MTP modules and the weight lambda of their loss (docs/architecture.md 3.3).

    loss_weight_schedule is piecewise constant: ((start_tokens, lambda), ...) sorted by
    start_tokens, the first at 0. V3: lambda = 0.3 for the first 10T tokens, then 0.1.
    """

    num_layers: int = 1
    loss_weight_schedule: tuple[tuple[int, float], ...] = ((0, 0.3), (10_000_000_000_000, 0.1))

    def __post_init__(self):
        _check(isinstance(self.num_layers, int) and self.num_layers >= 0, "MTPConfig.num_layers",
               self.num_layers, "must be >= 0 (0 disables MTP)")
        schedule = self.loss_weight_schedule
        _check(len(schedule) > 0 and schedule[0][0] == 0, "MTPConfig.loss_weight_schedule",
               schedule, "must be a non-empty tuple of (start_tokens, lambda) whose first entry "
               "starts at 0, e.g. ((0, 0.3), (10_000_000_000_000, 0.1))")
        starts = [start for start, _ in schedule]
        _check(all(a < b for a, b in zip(starts, starts[1:])), "MTPConfig.loss_weight_schedule",
               schedule, "start_tokens must be strictly increasing")
        _check(all(weight >= 0 for _, weight in schedule), "MTPConfig.loss_weight_schedule",
               schedule, "every lambda must be >= 0")

    def loss_weight(self, tokens_seen: int) -> float:
        """lambda in force after `tokens_seen` training tokens."""
        weight = self.loss_weight_schedule[0][1]
        for start, value in self.loss_weight_schedule:
            if tokens_seen >= start:
                weight = value
        return weight


# ----------------------------------------------------------------------------------------------
# Whole model
# ----------------------------------------------------------------------------------------------
# ModelConfig.params_dtype names -> torch dtypes (checkpoint/hf_files.py reads config.json's
# torch_dtype with it too)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# The parts of DeepSeek-V3's FP8 precision map that ModelConfig.fp8_layers can select:
# "routed_experts" the experts' forward and input-gradient GEMMs, "routed_experts_wgrad" their
# weight gradients too (opt-in, not in DEFAULT_FP8_LAYERS: its grouped FP8 kernel measured far
# slower than BF16 on an H200, benchmarks/RESULTS.md 2026-12-03)
FP8_LAYERS = ("attention", "dense_ffn", "shared_experts", "routed_experts", "dispatch",
              "routed_experts_wgrad")
DEFAULT_FP8_LAYERS = tuple(part for part in FP8_LAYERS if part != "routed_experts_wgrad")


@dataclass(frozen=True)
class ModelConfig:
    """A DeepSeek-V3-style decoder. Widths here, mechanisms in the nested configs."""

    name: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    max_seq_len: int
    mla: MLAConfig
    moe: MoEConfig
    mtp: MTPConfig = field(default_factory=MTPConfig)
    norm_eps: float = 1e-6
    init_std: float = 0.006
    params_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # Which implementation of the parallel linears and norms: "local" (Megatron-Core's own
    # tensor-parallel layers), "te" (Transformer Engine's), "auto" (TE when it imports).
    linear_backend: Literal["auto", "local", "te"] = "auto"
    # FP8 training: "none", or "deepseek" (DeepSeek-V3's recipe: E4M3 with 1x128 / 128x128
    # scales computed online, FP32 promotion; the layers in FP8 are `fp8_linear_widths`'s).
    # On the TE backend it is Transformer Engine's Float8BlockScaling recipe (the same tiles),
    # which Megatron enters around each layer (`to_megatron_config`).
    fp8: Literal["none", "deepseek"] = "none"
    # The precision map's parts in FP8 with fp8="deepseek" (FP8_LAYERS: the MLA projections,
    # the dense FFNs, the shared and the routed experts, the dispatch all-to-all); a part left
    # out stays BF16
    fp8_layers: tuple[str, ...] = DEFAULT_FP8_LAYERS

    def __post_init__(self):
        _positive(self, "vocab_size", "hidden_size", "num_layers", "max_seq_len")
        _check(self.moe.first_k_dense <= self.num_layers, "MoEConfig.first_k_dense",
               self.moe.first_k_dense, f"cannot exceed num_layers={self.num_layers}")
        _check(self.norm_eps > 0, "ModelConfig.norm_eps", self.norm_eps, "must be > 0")
        _check(self.init_std > 0, "ModelConfig.init_std", self.init_std, "must be > 0")
        _check(self.params_dtype in DTYPES, "ModelConfig.params_dtype", self.params_dtype,
               f"choose one of {sorted(DTYPES)}")
        _check(self.linear_backend in ("auto", "local", "te"), "ModelConfig.linear_backend",
               self.linear_backend, "choose 'auto', 'local' or 'te'")
        _check(self.fp8 in ("none", "deepseek"), "ModelConfig.fp8", self.fp8,
               "choose 'none' or 'deepseek'")
        unknown = sorted(set(self.fp8_layers) - set(FP8_LAYERS))
        _check(not unknown, "ModelConfig.fp8_layers", self.fp8_layers,
               f"{unknown} are no parts of the precision map: choose among {list(FP8_LAYERS)}")
        _check("routed_experts_wgrad" not in self.fp8_layers
               or "routed_experts" in self.fp8_layers, "ModelConfig.fp8_layers",
               self.fp8_layers, "has 'routed_experts_wgrad' without 'routed_experts': the "
               "experts' weight gradient in FP8 comes with their GEMMs in FP8; add "
               "'routed_experts' or drop 'routed_experts_wgrad'")
        if self.fp8 == "deepseek":
            for name, width, role, part in self.fp8_linear_widths():
                _check(width % 128 == 0, name, width,
                       f"with fp8='deepseek' it is {role}, which FP8 cuts into 128-wide tiles: "
                       f"use a multiple of 128 (e.g. {max(128, width // 128 * 128)}), leave "
                       f"{part!r} out of ModelConfig.fp8_layers (--fp8-layers) to keep it in "
                       "BF16, or fp8='none'")
        if self.mla.yarn is not None:
            _check(self.max_seq_len >= self.mla.yarn.original_max_position_embeddings,
                   "ModelConfig.max_seq_len", self.max_seq_len,
                   "is shorter than yarn.original_max_position_embeddings="
                   f"{self.mla.yarn.original_max_position_embeddings}: YaRN only extends "
                   "context, drop the YaRN config for a short model")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.params_dtype]

    def fp8_linear_widths(self) -> list[tuple[str, int, str, str]]:
        """(field, width, what it is, part of fp8_layers) of every input and output width of
        the linears that run in FP8 with fp8='deepseek' (the precision map,
        docs/precision-and-parallelism.md), for the parts in `fp8_layers`: the MLA projections
        but the KV down-projection (its 576-wide output in V3 is no multiple of 128) and the
        output projection (its input stays in higher precision), the dense FFNs, the shared
        experts and the routed experts' forward and input-gradient GEMMs (the grouped FP8 GEMM;
        their weight gradients stay BF16); the dispatch packs any width."""
        mla, moe, parts = self.mla, self.moe, set(self.fp8_layers)
        widths = []
        if "attention" in parts:
            widths.append(("ModelConfig.hidden_size", self.hidden_size,
                           "the input of the MLA query projection", "attention"))
            if mla.q_lora_rank > 0:
                widths.append(("MLAConfig.q_lora_rank", mla.q_lora_rank, "the query "
                               "down-projection's output and up-projection's input", "attention"))
            widths += [("MLAConfig.num_heads * qk_head_dim", mla.num_heads * mla.qk_head_dim,
                        "the query projection's output", "attention"),
                       ("MLAConfig.kv_lora_rank", mla.kv_lora_rank,
                        "the KV up-projection's input", "attention"),
                       ("MLAConfig.num_heads * (qk_nope_head_dim + v_head_dim)",
                        mla.num_heads * (mla.qk_nope_head_dim + mla.v_head_dim),
                        "the KV up-projection's output", "attention")]
        for part, size, role in (("dense_ffn", moe.dense_ffn_size if moe.first_k_dense else 0,
                                  "the dense FFN's hidden width"),
                                 ("shared_experts", moe.shared_ffn_size,
                                  "the shared experts' hidden width"),
                                 ("routed_experts", moe.expert_ffn_size,
                                  "each routed expert's hidden width")):
            if part in parts and size:
                field_name = {"dense_ffn": "MoEConfig.dense_ffn_size",
                              "shared_experts": "MoEConfig.num_shared_experts * expert_ffn_size",
                              "routed_experts": "MoEConfig.expert_ffn_size"}[part]
                widths += [("ModelConfig.hidden_size", self.hidden_size,
                            f"the input of the {part.replace('_', ' ')}", part),
                           (field_name, size, role, part)]
        return widths

    def is_moe_layer(self, layer_index: int) -> bool:
        """layer_index is 0-based over the decoder; MTP layers are always MoE layers."""
        return layer_index >= self.moe.first_k_dense

    def replace(self, **changes) -> "ModelConfig":
        """A copy with top-level fields replaced; nested configs by `mla=`, `moe=`, `mtp=`.

        Nested fields can be given with a double underscore: `moe__top_k=4`.
        """
        nested: dict[str, dict] = {}
        top: dict = {}
        for key, value in changes.items():
            if "__" in key:
                group, sub = key.split("__", 1)
                nested.setdefault(group, {})[sub] = value
            else:
                top[key] = value
        for group, sub_changes in nested.items():
            if group not in ("mla", "moe", "mtp"):
                raise ConfigError(f"{group}__... is not a nested config: use mla__, moe__ or "
                                  "mtp__")
            top[group] = dataclasses.replace(top.get(group, getattr(self, group)), **sub_changes)
        return dataclasses.replace(self, **top)


# ----------------------------------------------------------------------------------------------
# Presets
# ----------------------------------------------------------------------------------------------
def tiny() -> ModelConfig:
    """Trains in minutes on two CPU cores; every mechanism switched on."""
    return ModelConfig(
        name="tiny", vocab_size=2048, hidden_size=128, num_layers=3, max_seq_len=128,
        mla=MLAConfig(num_heads=4, q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=32,
                      qk_rope_head_dim=16, v_head_dim=32),
        moe=MoEConfig(num_experts=8, top_k=2, expert_ffn_size=64, num_shared_experts=1,
                      first_k_dense=1, dense_ffn_size=256, num_groups=4, topk_groups=2,
                      # 10x V3's rate: a few hundred steps must show the balancing at work.
                      route_scale=2.5, seq_aux_loss_coeff=1e-4, bias_update_rate=1e-2),
        mtp=MTPConfig(num_layers=1),
        init_std=0.02,
    )


def proxy() -> ModelConfig:
    """One H200: DeepSeek-V2-Lite widths with V3 routing, 8 layers (the peers' `proxy`)."""
    return ModelConfig(
        name="proxy", vocab_size=32768, hidden_size=2048, num_layers=8, max_seq_len=4096,
        mla=MLAConfig(num_heads=16, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
                      qk_rope_head_dim=64, v_head_dim=128),
        moe=MoEConfig(num_experts=64, top_k=6, expert_ffn_size=1408, num_shared_experts=2,
                      first_k_dense=1, dense_ffn_size=10944, num_groups=8, topk_groups=4,
                      route_scale=2.5, seq_aux_loss_coeff=1e-4),
        mtp=MTPConfig(num_layers=1),
        params_dtype="bfloat16",
    )


def v2_lite() -> ModelConfig:
    """DeepSeek-V2-Lite's official dimensions (15.7B), routed the V3 way (sigmoid + bias).

    V2-Lite itself uses softmax gating with an auxiliary loss; only its widths are kept here.
    """
    return ModelConfig(
        name="v2-lite", vocab_size=102400, hidden_size=2048, num_layers=27, max_seq_len=163840,
        mla=MLAConfig(num_heads=16, q_lora_rank=0, kv_lora_rank=512, qk_nope_head_dim=128,
                      qk_rope_head_dim=64, v_head_dim=128,
                      yarn=YarnConfig(factor=40.0, original_max_position_embeddings=4096,
                                      beta_fast=32.0, beta_slow=1.0, mscale=0.707,
                                      mscale_all_dim=0.707)),
        moe=MoEConfig(num_experts=64, top_k=6, expert_ffn_size=1408, num_shared_experts=2,
                      first_k_dense=1, dense_ffn_size=10944, num_groups=1, topk_groups=1,
                      route_scale=1.0),
        mtp=MTPConfig(num_layers=0),
        params_dtype="bfloat16",
    )


def v3_671b() -> ModelConfig:
    """DeepSeek-V3's official dimensions (671B total, 37B active)."""
    return ModelConfig(
        name="v3-671b", vocab_size=129280, hidden_size=7168, num_layers=61, max_seq_len=163840,
        mla=MLAConfig(num_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
                      qk_rope_head_dim=64, v_head_dim=128,
                      yarn=YarnConfig(factor=40.0, original_max_position_embeddings=4096,
                                      beta_fast=32.0, beta_slow=1.0, mscale=1.0,
                                      mscale_all_dim=1.0)),
        moe=MoEConfig(num_experts=256, top_k=8, expert_ffn_size=2048, num_shared_experts=1,
                      first_k_dense=3, dense_ffn_size=18432, num_groups=8, topk_groups=4,
                      route_scale=2.5, seq_aux_loss_coeff=1e-4, bias_update_rate=1e-3,
                      bias_update_stop_tokens=14_300_000_000_000),
        mtp=MTPConfig(num_layers=1),
        params_dtype="bfloat16",
    )


PRESETS = {"tiny": tiny, "proxy": proxy, "v2-lite": v2_lite, "v3-671b": v3_671b}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"preset={name!r} is unknown: choose one of {sorted(PRESETS)}")
    return PRESETS[name]()


# ----------------------------------------------------------------------------------------------
# Megatron-Core adapter
# ----------------------------------------------------------------------------------------------
def fp8_layers_flag(text: str) -> tuple[str, ...]:
    """The parts named by a comma-separated --fp8-layers value (ModelConfig checks the names)."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def resolved_linear_backend(name: str) -> str:
    """ModelConfig.linear_backend `name` with "auto" resolved: "te" when TE imports, else
    "local"."""
    if name != "auto":
        return name
    from .megatron_compat import transformer_engine_available

    return "te" if transformer_engine_available() else "local"


def to_megatron_config(cfg: ModelConfig, *, tensor_parallel_size: int = 1,
                       pipeline_parallel_size: int = 1, expert_parallel_size: int = 1,
                       use_cpu_initialization: Optional[bool] = None, **overrides):
    """The MLATransformerConfig Megatron-Core's builder sees for this model.

    Our modules read their own configs (kept on the Megatron config as `dsv3`); the Megatron
    fields are filled faithfully so that Megatron's own code (FLOP counters, checkpointing,
    `--spec` builders, `from_megatron_config`) sees the same model.
    """
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    mla, moe = cfg.mla, cfg.moe
    _check(mla.num_heads % tensor_parallel_size == 0, "tensor_parallel_size",
           tensor_parallel_size, f"must divide MLAConfig.num_heads={mla.num_heads}")
    for name, width in (("expert_ffn_size", moe.expert_ffn_size),
                        ("dense_ffn_size", moe.dense_ffn_size)):
        _check(width % tensor_parallel_size == 0, "tensor_parallel_size", tensor_parallel_size,
               f"must divide MoEConfig.{name}={width}")
    _check(isinstance(expert_parallel_size, int) and expert_parallel_size > 0
           and moe.num_experts % expert_parallel_size == 0, "expert_parallel_size",
           expert_parallel_size, f"must be a positive divisor of MoEConfig.num_experts="
           f"{moe.num_experts} (each EP rank holds num_experts / EP whole experts)")
    if use_cpu_initialization is None:
        use_cpu_initialization = not torch.cuda.is_available()
    dtype = cfg.torch_dtype
    yarn = mla.yarn
    kwargs = dict(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=mla.num_heads,
        ffn_hidden_size=moe.dense_ffn_size if moe.first_k_dense > 0 else moe.expert_ffn_size,
        kv_channels=mla.v_head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.norm_eps,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        init_method_std=cfg.init_std,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        pipeline_dtype=dtype,
        use_cpu_initialization=use_cpu_initialization,
        tensor_model_parallel_size=tensor_parallel_size,
        pipeline_model_parallel_size=pipeline_parallel_size,
        expert_model_parallel_size=expert_parallel_size,
        # MLA
        multi_latent_attention=True,
        q_lora_rank=mla.q_lora_rank if mla.q_lora_rank > 0 else None,
        kv_lora_rank=mla.kv_lora_rank,
        qk_head_dim=mla.qk_nope_head_dim,
        qk_pos_emb_head_dim=mla.qk_rope_head_dim,
        v_head_dim=mla.v_head_dim,
        rotary_base=mla.rope_theta,
        rope_type="yarn" if yarn is not None else "rope",
        rotary_scaling_factor=yarn.factor if yarn else 1.0,
        original_max_position_embeddings=(yarn.original_max_position_embeddings if yarn
                                          else cfg.max_seq_len),
        beta_fast=yarn.beta_fast if yarn else 32.0,
        beta_slow=yarn.beta_slow if yarn else 1.0,
        mscale=yarn.mscale if yarn else 1.0,
        mscale_all_dim=yarn.mscale_all_dim if yarn else 0.0,
        # MoE
        num_moe_experts=moe.num_experts,
        moe_layer_freq=[0] * moe.first_k_dense + [1] * (cfg.num_layers - moe.first_k_dense),
        moe_ffn_hidden_size=moe.expert_ffn_size,
        moe_shared_expert_intermediate_size=moe.shared_ffn_size or None,
        moe_router_topk=moe.top_k,
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        moe_router_bias_update_rate=moe.bias_update_rate,
        moe_router_num_groups=moe.num_groups if moe.num_groups > 1 else None,
        moe_router_group_topk=moe.topk_groups if moe.num_groups > 1 else None,
        moe_router_topk_scaling_factor=moe.route_scale,
        moe_router_pre_softmax=False,
        moe_router_load_balancing_type="seq_aux_loss" if moe.seq_aux_loss_coeff > 0 else "none",
        moe_aux_loss_coeff=moe.seq_aux_loss_coeff,
        moe_router_dtype="fp32",
        moe_token_dispatcher_type="alltoall",
        moe_grouped_gemm=False,
        # MTP
        mtp_num_layers=cfg.mtp.num_layers or None,
        mtp_loss_scaling_factor=cfg.mtp.loss_weight(0),
    )
    if cfg.fp8 == "deepseek" and resolved_linear_backend(cfg.linear_backend) == "te":
        # TE's DeepSeek-style recipe (1x128 activations, 128x128 weights), entered by Megatron
        # around each layer; the local backend runs our own FP8 instead (model.mark_fp8_linears)
        kwargs.update(fp8="e4m3", fp8_recipe="blockwise")
    kwargs.update(overrides)
    megatron_cfg = MLATransformerConfig(**kwargs)
    # Our modules read the exact config they were designed around; Megatron's fields above
    # are the faithful projection of it. `from_megatron_config` recovers it when absent.
    megatron_cfg.dsv3 = cfg
    return megatron_cfg


def from_megatron_config(megatron_cfg, *, vocab_size: Optional[int] = None,
                         max_seq_len: Optional[int] = None) -> ModelConfig:
    """The ModelConfig a Megatron TransformerConfig describes.

    Used when Megatron's own argument parser built the config (`--spec megatron_dsv3.specs
    decoder_block_spec`): the DeepSeek fields are read from Megatron's MLA / MoE / MTP fields.
    A config made by `to_megatron_config` carries the original and returns it unchanged.
    """
    carried = getattr(megatron_cfg, "dsv3", None)
    if isinstance(carried, ModelConfig):
        return carried
    if not getattr(megatron_cfg, "multi_latent_attention", False):
        raise ConfigError("multi_latent_attention=False is invalid for megatron_dsv3 specs: "
                          "pass --multi-latent-attention (an MLATransformerConfig)")
    if megatron_cfg.num_moe_experts is None:
        raise ConfigError("num_moe_experts=None is invalid for megatron_dsv3 specs: pass "
                          "--num-experts (DeepSeekMoE layers need routed experts)")
    for field_name, expected, flag in (("normalization", "RMSNorm", "--normalization RMSNorm"),
                                       ("gated_linear_unit", True, "--swiglu"),
                                       ("add_bias_linear", False, "--disable-bias-linear")):
        value = getattr(megatron_cfg, field_name)
        if value != expected:
            raise ConfigError(f"{field_name}={value!r} is invalid: DeepSeek-V3 layers are "
                              f"RMSNorm / SwiGLU / bias-free, pass {flag}")
    if megatron_cfg.moe_router_score_function != "sigmoid":
        raise ConfigError(f"moe_router_score_function={megatron_cfg.moe_router_score_function!r}"
                          " is invalid: DeepSeek-V3 routing uses 'sigmoid' "
                          "(--moe-router-score-function sigmoid)")
    layer_freq = megatron_cfg.moe_layer_freq
    if isinstance(layer_freq, int):
        pattern = [1 if i % layer_freq == 0 else 0 for i in range(megatron_cfg.num_layers)]
    else:
        pattern = list(layer_freq)
    first_k_dense = next((i for i, is_moe in enumerate(pattern) if is_moe), len(pattern))
    if any(not is_moe for is_moe in pattern[first_k_dense:]):
        raise ConfigError(f"moe_layer_freq={layer_freq!r} is invalid: DeepSeek layouts are "
                          "dense layers first, then only MoE layers (e.g. '[0]*3+[1]*58')")
    shared = megatron_cfg.moe_shared_expert_intermediate_size or 0
    expert_ffn = megatron_cfg.moe_ffn_hidden_size
    if shared % expert_ffn != 0:
        raise ConfigError(f"moe_shared_expert_intermediate_size={shared} is invalid: must be a "
                          f"multiple of moe_ffn_hidden_size={expert_ffn}")
    # Megatron's CLI gives one balancing type / coefficient per entry (nargs='+').
    balance_types = megatron_cfg.moe_router_load_balancing_type
    balance_types = list(balance_types) if isinstance(balance_types, (list, tuple)) else [
        balance_types]
    coeffs = megatron_cfg.moe_aux_loss_coeff
    coeffs = list(coeffs) if isinstance(coeffs, (list, tuple)) else [coeffs] * len(balance_types)
    seq_aux_loss_coeff = (float(coeffs[balance_types.index("seq_aux_loss")])
                          if "seq_aux_loss" in balance_types else 0.0)
    yarn = None
    if megatron_cfg.rope_type == "yarn" and megatron_cfg.rotary_scaling_factor > 1.0:
        yarn = YarnConfig(factor=megatron_cfg.rotary_scaling_factor,
                          original_max_position_embeddings=(
                              megatron_cfg.original_max_position_embeddings),
                          beta_fast=megatron_cfg.beta_fast, beta_slow=megatron_cfg.beta_slow,
                          mscale=megatron_cfg.mscale,
                          mscale_all_dim=megatron_cfg.mscale_all_dim)
    dtype = {torch.float32: "float32", torch.bfloat16: "bfloat16",
             torch.float16: "float16"}[megatron_cfg.params_dtype]
    mtp_layers = megatron_cfg.mtp_num_layers or 0
    return ModelConfig(
        name="from-megatron",
        vocab_size=vocab_size or 1,
        hidden_size=megatron_cfg.hidden_size,
        num_layers=megatron_cfg.num_layers,
        max_seq_len=max_seq_len or (yarn.original_max_position_embeddings * int(yarn.factor)
                                    if yarn else megatron_cfg.original_max_position_embeddings),
        mla=MLAConfig(num_heads=megatron_cfg.num_attention_heads,
                      q_lora_rank=megatron_cfg.q_lora_rank or 0,
                      kv_lora_rank=megatron_cfg.kv_lora_rank,
                      qk_nope_head_dim=megatron_cfg.qk_head_dim,
                      qk_rope_head_dim=megatron_cfg.qk_pos_emb_head_dim,
                      v_head_dim=megatron_cfg.v_head_dim,
                      rope_theta=float(megatron_cfg.rotary_base), yarn=yarn),
        moe=MoEConfig(num_experts=megatron_cfg.num_moe_experts,
                      top_k=megatron_cfg.moe_router_topk,
                      expert_ffn_size=expert_ffn,
                      num_shared_experts=shared // expert_ffn,
                      first_k_dense=first_k_dense,
                      dense_ffn_size=megatron_cfg.ffn_hidden_size,
                      num_groups=megatron_cfg.moe_router_num_groups or 1,
                      topk_groups=megatron_cfg.moe_router_group_topk or 1,
                      route_scale=megatron_cfg.moe_router_topk_scaling_factor or 1.0,
                      seq_aux_loss_coeff=seq_aux_loss_coeff,
                      bias_update_rate=(megatron_cfg.moe_router_bias_update_rate
                                        if megatron_cfg.moe_router_enable_expert_bias else 0.0)),
        mtp=MTPConfig(num_layers=mtp_layers,
                      loss_weight_schedule=((0, megatron_cfg.mtp_loss_scaling_factor or 0.0),)),
        norm_eps=megatron_cfg.layernorm_epsilon,
        init_std=megatron_cfg.init_method_std,
        params_dtype=dtype,
    )
