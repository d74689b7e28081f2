"""Hugging Face DeepSeek-V3 <-> megatron_dsv3 state dicts (full tensors, TP=1).

What: the names and layouts of transformers 5.x `DeepseekV3ForCausalLM` on one side, ours
(`build_model(cfg).state_dict()` without Megatron's `_extra_state` entries) on the other,
and the `DeepseekV3Config` that makes Hugging Face compute what our model computes.

How: one table of rules built from the ModelConfig (`_rules`). A rule maps one of our
tensors onto one Hugging Face tensor (a rename) or onto two stacked along rows (our fused
SwiGLU `linear_fc1` = [gate_proj; up_proj]); it carries the expected HF shapes and their
meaning in config fields, so every missing / unexpected key and every shape mismatch is
reported with the field to change. Both directions run the same table, so
`dsv3_to_hf(hf_to_dsv3(sd, cfg), cfg) == sd` bit for bit. Values are never cast or scaled.

  ours (decoder.layers.{i}.)                    Hugging Face (model.layers.{i}.)
  input_layernorm / pre_mlp_layernorm           input_layernorm / post_attention_layernorm
  self_attention.linear_q_down, q_norm,         self_attn.q_a_proj, q_a_layernorm, q_b_proj
    linear_q_up   (or linear_q, q_lora_rank=0)    (or q_proj, q_lora_rank=None)
  self_attention.linear_kv_down, kv_norm,       self_attn.kv_a_proj_with_mqa, kv_a_layernorm,
    linear_kv_up, linear_proj                     kv_b_proj, o_proj
  mlp.linear_fc1 = [gate; up], mlp.linear_fc2   mlp.gate_proj + mlp.up_proj, mlp.down_proj
  mlp.router.weight / router.expert_bias        mlp.gate.weight / gate.e_score_correction_bias
  mlp.experts.fc1 [E, 2F, D] / fc2 [E, D, F]    mlp.experts.gate_up_proj / down_proj (same)
  mlp.shared_experts.linear_fc1/2               mlp.shared_experts.gate_proj+up_proj/down_proj

MTP (which Hugging Face's model does not build) follows DeepSeek's released checkpoints:
depth k is HF layer `num_layers + k` with `enorm`, `hnorm`, `eh_proj`, `shared_head.norm`
(= our `mtp.layers.{k}.final_layernorm`), its transformer sublayer under the usual layer
names, and copies of the shared embedding / output head as `embed_tokens` /
`shared_head.head`: written (as separate tensors) on export, checked equal to the main ones
on import when present. Checkpoints that store experts one by one
(`mlp.experts.{j}.gate_proj.weight`, as DeepSeek's release does) are fused on import.

Parity settings (each silently breaks parity with Hugging Face's model if missed):
rope_interleave=True (our rope rotates interleaved pairs, so weights copy as they are),
q_lora_rank=None for no query compression (0 builds zero-width projections), YaRN with
mscale_all_dim == mscale, group-limited routing by top-2 sums (HF's only rule, also ours).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

import torch

from ..config import ModelConfig

EXTRA_STATE_SUFFIX = "._extra_state"


class ConversionError(ValueError):
    """A state dict does not match the ModelConfig; the message names the keys and the fix."""


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------
def hf_config_from_model_config(cfg: ModelConfig, **overrides):
    """The `transformers.DeepseekV3Config` whose model computes what ours computes.

    (HF's q_a_layernorm / kv_a_layernorm keep eps=1e-6 whatever rms_norm_eps says, as ours do:
    `attention.mla.LATENT_NORM_EPS`.) `overrides` go to DeepseekV3Config as they are (e.g.
    attn_implementation="eager").
    """
    from transformers import DeepseekV3Config

    mla, moe = cfg.mla, cfg.moe
    rope: dict = {"rope_type": "default", "rope_theta": mla.rope_theta}
    if mla.yarn is not None:
        yarn = mla.yarn
        # mscale_all_dim == mscale (YarnConfig enforces it): HF then leaves cos/sin unscaled
        # and multiplies the softmax scale by mscale**2, as DeepSeek and we do.
        rope = {"rope_type": "yarn", "rope_theta": mla.rope_theta, "factor": yarn.factor,
                "original_max_position_embeddings": yarn.original_max_position_embeddings,
                "beta_fast": yarn.beta_fast, "beta_slow": yarn.beta_slow,
                "mscale": yarn.mscale, "mscale_all_dim": yarn.mscale_all_dim}
    kwargs = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        initializer_range=cfg.init_std,
        tie_word_embeddings=False,
        hidden_act="silu",
        # MLA
        num_attention_heads=mla.num_heads,
        num_key_value_heads=mla.num_heads,
        q_lora_rank=mla.q_lora_rank if mla.q_lora_rank > 0 else None,  # 0 would build q = 0
        kv_lora_rank=mla.kv_lora_rank,
        qk_nope_head_dim=mla.qk_nope_head_dim,
        qk_rope_head_dim=mla.qk_rope_head_dim,
        v_head_dim=mla.v_head_dim,
        rope_parameters=rope,
        rope_interleave=True,
        attention_bias=False,
        attention_dropout=0.0,
        # MoE
        first_k_dense_replace=moe.first_k_dense,
        intermediate_size=moe.dense_ffn_size if moe.first_k_dense > 0 else moe.expert_ffn_size,
        moe_intermediate_size=moe.expert_ffn_size,
        n_routed_experts=moe.num_experts,
        n_shared_experts=moe.num_shared_experts,
        num_experts_per_tok=moe.top_k,
        n_group=moe.num_groups,
        topk_group=moe.topk_groups,
        norm_topk_prob=moe.normalize_gates,
        routed_scaling_factor=moe.route_scale,
        # MTP: stored as extra layers num_layers .. num_layers + D - 1 (HF builds none)
        num_nextn_predict_layers=cfg.mtp.num_layers,
    )
    kwargs.update(overrides)
    return DeepseekV3Config(**kwargs)


# ----------------------------------------------------------------------------------------------
# The mapping table
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Rule:
    """Our tensor `ours` is the HF tensor `hf[0]`, or `hf[0]` and `hf[1]` stacked by rows."""

    ours: str
    hf: tuple[str, ...]
    hf_shape: tuple[int, ...]  # of each HF tensor
    dims: str                  # hf_shape in config fields, for error messages

    @property
    def our_shape(self) -> tuple[int, ...]:
        return (len(self.hf) * self.hf_shape[0],) + self.hf_shape[1:]

    @property
    def our_dims(self) -> str:
        return self.dims if len(self.hf) == 1 else f"[gate; up] rows, each {self.dims}"


def _rename(ours: str, hf: str, shape: tuple[int, ...], dims: str) -> _Rule:
    return _Rule(ours, (hf,), shape, dims)


def _gate_up(ours: str, hf_gate: str, hf_up: str, shape: tuple[int, ...], dims: str) -> _Rule:
    return _Rule(ours, (hf_gate, hf_up), shape, dims)


def _attention_rules(cfg: ModelConfig, hf: str, ours: str) -> list[_Rule]:
    mla, d = cfg.mla, cfg.hidden_size
    q_rows = mla.num_heads * mla.qk_head_dim
    q_rows_dims = "num_heads * (qk_nope_head_dim + qk_rope_head_dim)"
    hf, ours = hf + "self_attn.", ours + "self_attention."
    if mla.q_lora_rank > 0:
        c_q = mla.q_lora_rank
        rules = [
            _rename(ours + "linear_q_down.weight", hf + "q_a_proj.weight", (c_q, d),
                    "[q_lora_rank, hidden_size]"),
            _rename(ours + "q_norm.weight", hf + "q_a_layernorm.weight", (c_q,),
                    "[q_lora_rank]"),
            _rename(ours + "linear_q_up.weight", hf + "q_b_proj.weight", (q_rows, c_q),
                    f"[{q_rows_dims}, q_lora_rank]"),
        ]
    else:
        rules = [_rename(ours + "linear_q.weight", hf + "q_proj.weight", (q_rows, d),
                         f"[{q_rows_dims}, hidden_size]")]
    c_kv = mla.kv_lora_rank
    return rules + [
        _rename(ours + "linear_kv_down.weight", hf + "kv_a_proj_with_mqa.weight",
                (c_kv + mla.qk_rope_head_dim, d), "[kv_lora_rank + qk_rope_head_dim, hidden_size]"),
        _rename(ours + "kv_norm.weight", hf + "kv_a_layernorm.weight", (c_kv,), "[kv_lora_rank]"),
        _rename(ours + "linear_kv_up.weight", hf + "kv_b_proj.weight",
                (mla.num_heads * (mla.qk_nope_head_dim + mla.v_head_dim), c_kv),
                "[num_heads * (qk_nope_head_dim + v_head_dim), kv_lora_rank]"),
        _rename(ours + "linear_proj.weight", hf + "o_proj.weight",
                (d, mla.num_heads * mla.v_head_dim), "[hidden_size, num_heads * v_head_dim]"),
    ]


def _swiglu_rules(hf: str, ours: str, d: int, ffn: int, ffn_dims: str) -> list[_Rule]:
    return [
        _gate_up(ours + "linear_fc1.weight", hf + "gate_proj.weight", hf + "up_proj.weight",
                 (ffn, d), f"[{ffn_dims}, hidden_size]"),
        _rename(ours + "linear_fc2.weight", hf + "down_proj.weight", (d, ffn),
                f"[hidden_size, {ffn_dims}]"),
    ]


def _mlp_rules(cfg: ModelConfig, hf: str, ours: str, is_moe: bool) -> list[_Rule]:
    moe, d = cfg.moe, cfg.hidden_size
    hf, ours = hf + "mlp.", ours + "mlp."
    if not is_moe:
        return _swiglu_rules(hf, ours, d, moe.dense_ffn_size, "dense_ffn_size")
    E, F = moe.num_experts, moe.expert_ffn_size
    rules = [
        _rename(ours + "router.weight", hf + "gate.weight", (E, d), "[num_experts, hidden_size]"),
        _rename(ours + "router.expert_bias", hf + "gate.e_score_correction_bias", (E,),
                "[num_experts]"),
        _rename(ours + "experts.fc1", hf + "experts.gate_up_proj", (E, 2 * F, d),
                "[num_experts, 2 * expert_ffn_size, hidden_size]"),
        _rename(ours + "experts.fc2", hf + "experts.down_proj", (E, d, F),
                "[num_experts, hidden_size, expert_ffn_size]"),
    ]
    if moe.num_shared_experts > 0:
        rules += _swiglu_rules(hf + "shared_experts.", ours + "shared_experts.", d,
                               moe.shared_ffn_size, "num_shared_experts * expert_ffn_size")
    return rules


def _layer_rules(cfg: ModelConfig, hf: str, ours: str, is_moe: bool) -> list[_Rule]:
    d = cfg.hidden_size
    return ([_rename(ours + "input_layernorm.weight", hf + "input_layernorm.weight", (d,),
                     "[hidden_size]")]
            + _attention_rules(cfg, hf, ours)
            + [_rename(ours + "pre_mlp_layernorm.weight", hf + "post_attention_layernorm.weight",
                       (d,), "[hidden_size]")]
            + _mlp_rules(cfg, hf, ours, is_moe))


def _rules(cfg: ModelConfig) -> list[_Rule]:
    """Every tensor of the model, in state-dict order."""
    V, d, L = cfg.vocab_size, cfg.hidden_size, cfg.num_layers
    rules = [_rename("embedding.word_embeddings.weight", "model.embed_tokens.weight", (V, d),
                     "[vocab_size, hidden_size]")]
    for i in range(L):
        rules += _layer_rules(cfg, f"model.layers.{i}.", f"decoder.layers.{i}.",
                              cfg.is_moe_layer(i))
    rules += [
        _rename("decoder.final_layernorm.weight", "model.norm.weight", (d,), "[hidden_size]"),
        _rename("output_layer.weight", "lm_head.weight", (V, d), "[vocab_size, hidden_size]"),
    ]
    for k in range(cfg.mtp.num_layers):
        hf, ours = f"model.layers.{L + k}.", f"mtp.layers.{k}."
        rules += [
            _rename(ours + "enorm.weight", hf + "enorm.weight", (d,), "[hidden_size]"),
            _rename(ours + "hnorm.weight", hf + "hnorm.weight", (d,), "[hidden_size]"),
            _rename(ours + "eh_proj.weight", hf + "eh_proj.weight", (d, 2 * d),
                    "[hidden_size, 2 * hidden_size] (columns: [embedding; hidden])"),
        ]
        rules += _layer_rules(cfg, hf, ours + "transformer_layer.", is_moe=True)
        rules.append(_rename(ours + "final_layernorm.weight", hf + "shared_head.norm.weight",
                             (d,), "[hidden_size]"))
    return rules


def _mtp_copies(cfg: ModelConfig) -> dict[str, str]:
    """HF keys of the MTP layers' copies of shared tensors -> the main tensor's HF key."""
    copies = {}
    for k in range(cfg.mtp.num_layers):
        hf = f"model.layers.{cfg.num_layers + k}."
        copies[hf + "embed_tokens.weight"] = "model.embed_tokens.weight"
        copies[hf + "shared_head.head.weight"] = "lm_head.weight"
    return copies


def _empty_shared_experts(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """With num_shared_experts=0 HF still builds zero-width shared experts: their keys."""
    if cfg.moe.num_shared_experts > 0:
        return {}
    d, L = cfg.hidden_size, cfg.num_layers
    layers = [i for i in range(L) if cfg.is_moe_layer(i)] + list(range(L, L + cfg.mtp.num_layers))
    shapes = {}
    for i in layers:
        hf = f"model.layers.{i}.mlp.shared_experts."
        shapes.update({hf + "gate_proj.weight": (0, d), hf + "up_proj.weight": (0, d),
                       hf + "down_proj.weight": (d, 0)})
    return shapes


# ----------------------------------------------------------------------------------------------
# Checks with errors that say what to change
# ----------------------------------------------------------------------------------------------
_LAYER_INDEX = re.compile(r"^model\.layers\.(\d+)\.")
_MAX_LISTED = 8


def _hint(key: str, cfg: ModelConfig, missing: bool) -> str:
    """What probably explains a missing (or unexpected) HF key, and what to change."""
    L, D = cfg.num_layers, cfg.mtp.num_layers
    if key.endswith("weight_scale_inv"):
        return ("an FP8 block-quantized checkpoint: read its folder with "
                "hf_files.load_hf_checkpoint, which dequantizes the weights, or dequantize "
                "the state dict to bf16/fp32 first (hf_files.dequantize_fp8_blocks)")
    if key.endswith("rotary_emb.inv_freq"):
        return "a rope buffer from an old checkpoint, recomputed from the config: drop it"
    match = _LAYER_INDEX.match(key)
    if match and int(match.group(1)) >= L:
        depth = int(match.group(1)) - L
        if missing:
            return (f"the checkpoint has no MTP depth {depth} (HF layer {L + depth}): lower "
                    f"mtp.num_layers (now {D}), e.g. to 0 for a checkpoint without MTP weights")
        return (f"HF layer {L + depth} is MTP depth {depth}, beyond mtp.num_layers={D}: raise "
                f"mtp.num_layers, or drop those keys to convert without MTP")
    if ".self_attn.q_" in key:
        return ("q_lora_rank differs: HF q_proj means q_lora_rank=0, q_a_proj/q_a_layernorm/"
                f"q_b_proj mean q_lora_rank>0 (cfg has mla.q_lora_rank={cfg.mla.q_lora_rank})")
    if ".mlp." in key and match:
        return (f"dense vs MoE layer differs: HF layers below first_k_dense_replace have "
                f"mlp.gate_proj/up_proj/down_proj, the others mlp.gate/experts/shared_experts "
                f"(cfg has moe.first_k_dense={cfg.moe.first_k_dense}, "
                f"moe.num_shared_experts={cfg.moe.num_shared_experts})")
    return f"cfg {cfg.name!r} does not describe this checkpoint: check num_layers={L}"


def _check_keys(actual: set[str], expected: set[str], optional: set[str], side: str,
                cfg: ModelConfig, hint) -> None:
    missing = sorted(expected - actual)
    unexpected = sorted(actual - expected - optional)
    if not missing and not unexpected:
        return
    lines = []
    for label, keys, is_missing in (("missing", missing, True),
                                    ("unexpected", unexpected, False)):
        if keys:
            lines.append(f"{len(keys)} {label} key(s):")
            lines += [f"  {key}: {hint(key, cfg, is_missing)}" for key in keys[:_MAX_LISTED]]
            if len(keys) > _MAX_LISTED:
                lines.append(f"  ... and {len(keys) - _MAX_LISTED} more")
    raise ConversionError(f"{side} state dict does not match ModelConfig {cfg.name!r}:\n"
                          + "\n".join(lines))


def _check_shape(key: str, tensor: torch.Tensor, shape: tuple[int, ...], dims: str,
                 cfg: ModelConfig) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise ConversionError(
            f"{key}: shape {tuple(tensor.shape)} does not match ModelConfig {cfg.name!r}, which "
            f"expects {tuple(shape)} = {dims}; convert with the config the checkpoint was made "
            "with (compare the widths in its config.json)")


def _our_hint(key: str, cfg: ModelConfig, missing: bool) -> str:
    if key.startswith("mtp.layers."):
        return f"MTP depth differs: cfg has mtp.num_layers={cfg.mtp.num_layers}"
    return (f"this state dict was not made by build_model(ModelConfig {cfg.name!r}) at TP=1: "
            "gather tensor-parallel shards first (parallel.gather_state_dict) and convert with "
            "the model's own config")


# ----------------------------------------------------------------------------------------------
# Per-expert checkpoints (DeepSeek's release) -> fused experts
# ----------------------------------------------------------------------------------------------
_PER_EXPERT = re.compile(r"^(?P<prefix>.+\.mlp\.experts)\.(?P<expert>\d+)\."
                         r"(?P<proj>gate_proj|up_proj|down_proj)\.weight$")


def _fuse_per_expert(hf_sd: Mapping[str, torch.Tensor], cfg: ModelConfig
                     ) -> dict[str, torch.Tensor]:
    """`mlp.experts.{j}.{gate,up,down}_proj.weight` -> `mlp.experts.gate_up_proj` [E, 2F, D]
    and `mlp.experts.down_proj` [E, D, F]; other keys pass through."""
    groups: dict[str, dict[tuple[int, str], torch.Tensor]] = {}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in hf_sd.items():
        match = _PER_EXPERT.match(key)
        if match is None:
            out[key] = tensor
        else:
            groups.setdefault(match["prefix"], {})[(int(match["expert"]), match["proj"])] = tensor
    E = cfg.moe.num_experts
    for prefix, parts in groups.items():
        wanted = {(e, proj) for e in range(E) for proj in ("gate_proj", "up_proj", "down_proj")}
        if set(parts) != wanted:
            absent = sorted(wanted - set(parts))[:3]
            extra = sorted(set(parts) - wanted)[:3]
            raise ConversionError(
                f"{prefix}.{{j}}.*: per-expert weights must cover experts 0..{E - 1} with "
                f"gate_proj, up_proj and down_proj each (moe.num_experts={E}); absent "
                f"{absent}, beyond {extra}: fix moe.num_experts or complete the checkpoint")
        for fused in (prefix + ".gate_up_proj", prefix + ".down_proj"):
            if fused in out:
                raise ConversionError(f"{fused}: the checkpoint holds both fused and per-expert "
                                      f"weights for {prefix}; keep one of the two")
        out[prefix + ".gate_up_proj"] = torch.stack(
            [torch.cat([parts[(e, "gate_proj")], parts[(e, "up_proj")]]) for e in range(E)])
        out[prefix + ".down_proj"] = torch.stack([parts[(e, "down_proj")] for e in range(E)])
    return out


# ----------------------------------------------------------------------------------------------
# Conversion
# ----------------------------------------------------------------------------------------------
def hf_to_dsv3(hf_state_dict: Mapping[str, torch.Tensor], cfg: ModelConfig
               ) -> dict[str, torch.Tensor]:
    """Our full (TP=1) state dict from a Hugging Face DeepSeek-V3 one.

    Load it with `load_dsv3_state_dict(model, sd)`. MTP weights are read from HF layers
    num_layers .. num_layers + mtp.num_layers - 1 (DeepSeek's release layout).
    """
    hf_sd = _fuse_per_expert(hf_state_dict, cfg)
    rules, copies, empty = _rules(cfg), _mtp_copies(cfg), _empty_shared_experts(cfg)
    expected = {key for rule in rules for key in rule.hf}
    _check_keys(set(hf_sd), expected, set(copies) | set(empty), "Hugging Face", cfg, _hint)
    for key, shape in empty.items():
        if key in hf_sd:
            _check_shape(key, hf_sd[key], shape, "zero-width (moe.num_shared_experts=0)", cfg)
    for copy_key, main_key in copies.items():
        if copy_key in hf_sd and not torch.equal(hf_sd[copy_key], hf_sd[main_key]):
            raise ConversionError(
                f"{copy_key} differs from {main_key}: our MTP shares the main model's "
                "embedding and output head, so the checkpoint's MTP copy must equal the main "
                "tensor; drop the copy to use the main one, or convert another checkpoint")

    out: dict[str, torch.Tensor] = {}
    for rule in rules:
        parts = [hf_sd[key] for key in rule.hf]
        for key, tensor in zip(rule.hf, parts):
            _check_shape(key, tensor, rule.hf_shape, rule.dims, cfg)
        out[rule.ours] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    return out


def dsv3_to_hf(state_dict: Mapping[str, torch.Tensor], cfg: ModelConfig
               ) -> dict[str, torch.Tensor]:
    """A Hugging Face DeepSeek-V3 state dict (plus DeepSeek-layout MTP layers) from ours.

    `state_dict` is a full (TP=1) `model.state_dict()`; `_extra_state` entries are ignored.
    Every output tensor owns its memory apart from renamed inputs (safetensors-ready).
    """
    ours = {k: v for k, v in state_dict.items() if not k.endswith(EXTRA_STATE_SUFFIX)}
    rules = _rules(cfg)
    _check_keys(set(ours), {rule.ours for rule in rules}, set(), "megatron_dsv3", cfg, _our_hint)

    out: dict[str, torch.Tensor] = {}
    for rule in rules:
        tensor = ours[rule.ours]
        _check_shape(rule.ours, tensor, rule.our_shape, rule.our_dims, cfg)
        if len(rule.hf) == 1:
            out[rule.hf[0]] = tensor
        else:
            # [gate; up] rows -> two tensors that do not share storage
            for key, part in zip(rule.hf, tensor.split(rule.hf_shape[0], dim=0)):
                out[key] = part.clone()
    dtype = ours["embedding.word_embeddings.weight"].dtype
    for key, shape in _empty_shared_experts(cfg).items():
        out[key] = torch.zeros(shape, dtype=dtype)
    for copy_key, main_key in _mtp_copies(cfg).items():
        out[copy_key] = out[main_key].clone()
    return out


def load_dsv3_state_dict(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor]
                         ) -> None:
    """`model.load_state_dict` strict in everything but Megatron's `_extra_state` entries
    (which hold no weights: FP8 metadata of Transformer Engine layers, None here)."""
    missing, unexpected = model.load_state_dict(dict(state_dict), strict=False)
    missing = [k for k in missing if not k.endswith(EXTRA_STATE_SUFFIX)]
    if missing or unexpected:
        raise ConversionError(
            f"state dict does not fit the model: missing {missing[:_MAX_LISTED]}, unexpected "
            f"{list(unexpected)[:_MAX_LISTED]}; convert with the ModelConfig the model was "
            "built from")


__all__ = ["ConversionError", "hf_config_from_model_config", "hf_to_dsv3",
           "dsv3_to_hf", "load_dsv3_state_dict"]
