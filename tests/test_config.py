"""Configs: preset dimensions, parameter counts, softmax scale, the lambda schedule, validation
errors, and the mapping onto Megatron's MLATransformerConfig and back.

Expected numbers are written out here from the DeepSeek-V3 report / released configs
(docs/architecture.md 3.1-3.3), never read back from the code under test.
"""

from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch

from megatron_dsv3.config import (
    PRESETS,
    ConfigError,
    MTPConfig,
    YarnConfig,
    from_megatron_config,
    preset,
    tiny,
    to_megatron_config,
)

V3_MTP_SWITCH_TOKENS = 10_000_000_000_000  # lambda 0.3 -> 0.1 after 10T tokens
V3_BIAS_STOP_TOKENS = 14_300_000_000_000  # gamma 0.001 -> 0 after 14.3T tokens


# ----------------------------------------------------------------------------------------------
# Presets
# ----------------------------------------------------------------------------------------------
def test_every_preset_constructs_with_its_own_name():
    for name in ("tiny", "proxy", "v2-lite", "v3-671b"):
        assert preset(name).name == name
    assert sorted(PRESETS) == sorted(["tiny", "proxy", "v2-lite", "v3-671b"])


def test_v3_preset_has_the_official_deepseek_v3_dimensions():
    cfg = preset("v3-671b")
    mla, moe = cfg.mla, cfg.moe
    assert (cfg.num_layers, cfg.hidden_size, cfg.vocab_size) == (61, 7168, 129280)
    assert (mla.num_heads, mla.q_lora_rank, mla.kv_lora_rank) == (128, 1536, 512)
    assert (mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.v_head_dim) == (128, 64, 128)
    assert (moe.num_experts, moe.top_k, moe.expert_ffn_size) == (256, 8, 2048)
    assert (moe.num_shared_experts, moe.first_k_dense, moe.dense_ffn_size) == (1, 3, 18432)
    assert (moe.num_groups, moe.topk_groups, moe.route_scale) == (8, 4, 2.5)
    assert (moe.seq_aux_loss_coeff, moe.bias_update_rate) == (1e-4, 1e-3)
    assert moe.bias_update_stop_tokens == V3_BIAS_STOP_TOKENS
    assert cfg.mtp.num_layers == 1
    yarn = mla.yarn
    assert yarn is not None
    assert (yarn.factor, yarn.original_max_position_embeddings) == (40.0, 4096)
    assert (yarn.beta_fast, yarn.beta_slow) == (32.0, 1.0)
    assert (yarn.mscale, yarn.mscale_all_dim) == (1.0, 1.0)
    assert cfg.max_seq_len == 4096 * 40  # 160K: 4K extended by YaRN factor 40
    assert mla.kv_cache_values_per_token == 576  # docs/architecture.md 3.1: 512 + 64


def test_proxy_preset_has_v2_lite_widths_with_v3_routing():
    cfg = preset("proxy")
    mla, moe = cfg.mla, cfg.moe
    assert (cfg.hidden_size, cfg.num_layers) == (2048, 8)
    assert (cfg.vocab_size, cfg.max_seq_len) == (32768, 4096)
    assert (mla.num_heads, mla.q_lora_rank, mla.kv_lora_rank) == (16, 1536, 512)
    assert (mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.v_head_dim) == (128, 64, 128)
    assert (moe.first_k_dense, moe.dense_ffn_size) == (1, 10944)
    assert (moe.num_experts, moe.top_k, moe.expert_ffn_size) == (64, 6, 1408)
    assert moe.shared_ffn_size == 2816
    assert (moe.num_groups, moe.topk_groups, moe.route_scale) == (8, 4, 2.5)


def test_v2_lite_preset_has_no_query_compression_and_no_mtp():
    cfg = preset("v2-lite")
    assert (cfg.num_layers, cfg.hidden_size, cfg.vocab_size) == (27, 2048, 102400)
    assert cfg.mla.q_lora_rank == 0 and cfg.mla.kv_lora_rank == 512
    assert (cfg.moe.num_experts, cfg.moe.top_k, cfg.moe.num_shared_experts) == (64, 6, 2)
    assert (cfg.moe.num_groups, cfg.moe.topk_groups) == (1, 1)
    assert cfg.mtp.num_layers == 0


def test_tiny_preset_switches_every_mechanism_on():
    cfg = preset("tiny")
    assert cfg.mla.q_lora_rank > 0
    assert cfg.moe.first_k_dense >= 1 and cfg.num_layers > cfg.moe.first_k_dense
    assert cfg.moe.num_shared_experts >= 1 and cfg.moe.num_groups > 1
    assert cfg.moe.topk_groups < cfg.moe.num_groups and cfg.moe.seq_aux_loss_coeff > 0
    assert cfg.mtp.num_layers >= 1


# ----------------------------------------------------------------------------------------------
# Parameter counts (an independent formula, checked against a built model, then against V3)
# ----------------------------------------------------------------------------------------------
def _param_counts(cfg) -> dict:
    """Parameters of the main model and of one MTP module, from the widths alone.

    Linear weights only (no biases), RMSNorm weights, untied embedding and output head,
    router weight (its selection bias is a buffer, not a parameter).
    """
    d, V, m, e = cfg.hidden_size, cfg.vocab_size, cfg.mla, cfg.moe
    h, n, r, v, c, q = (m.num_heads, m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim,
                        m.kv_lora_rank, m.q_lora_rank)
    attn = (d * q + q + q * h * (n + r)) if q else d * h * (n + r)  # W^DQ, q-norm, W^UQ|W^QR
    attn += d * (c + r) + c + c * h * (n + v) + h * v * d  # W^DKV|W^KR, kv-norm, W^UK|W^UV, W^O
    swiglu = lambda width: 3 * d * width  # noqa: E731  gate, up, down
    norms = 2 * d
    dense = attn + norms + swiglu(e.dense_ffn_size)
    moe_fixed = attn + norms + e.num_experts * d + swiglu(e.shared_ffn_size)
    moe_total = moe_fixed + e.num_experts * swiglu(e.expert_ffn_size)
    moe_active = moe_fixed + e.top_k * swiglu(e.expert_ffn_size)
    n_dense, n_moe = e.first_k_dense, cfg.num_layers - e.first_k_dense
    embedding = head = V * d
    outer = embedding + head + d  # + final norm
    return dict(
        total=outer + n_dense * dense + n_moe * moe_total,
        # Active per token, as FLOP-bearing weights: the input embedding is a lookup.
        active=head + d + n_dense * dense + n_moe * moe_active,
        embedding=embedding,
        mtp_module=3 * d + 2 * d * d + moe_total,  # enorm, hnorm, final norm, eh_proj, layer
    )


def test_param_count_formula_matches_a_built_tiny_model_exactly(dist_single):
    from megatron_dsv3.model import build_model

    cfg = tiny().replace(linear_backend="local", mtp__num_layers=2)
    model = build_model(cfg, pg_collection=dist_single)
    counts = _param_counts(cfg)
    main = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("mtp."))
    mtp = sum(p.numel() for p in model.mtp.parameters())
    assert main == counts["total"]
    assert mtp == 2 * counts["mtp_module"]


def test_v3_parameter_counts_match_the_report_671b_total_37b_active():
    counts = _param_counts(preset("v3-671b"))
    # 671B counts the main model (embedding and output head included, MTP excluded); the
    # report rounds to 1B, so the formula must land within half of that.
    assert abs(counts["total"] - 671e9) <= 0.5e9, counts["total"]
    # 37B active: the report rounds to 1B and does not say whether the (lookup-only) input
    # embedding counts; without it the formula gives 36.6B, with it 37.6B. Accept +-1B.
    assert abs(counts["active"] - 37e9) <= 1e9, counts["active"]
    assert abs(counts["active"] + counts["embedding"] - 37e9) <= 1e9
    # The released checkpoint is 685B: main model + 14B MTP module, which stores its own
    # copy of the embedding and the output head. Rounded to 1B.
    checkpoint = counts["total"] + counts["mtp_module"] + 2 * counts["embedding"]
    assert abs(checkpoint - 685e9) <= 1e9, checkpoint


def test_v2_lite_parameter_counts_match_its_15_7b_total_2_4b_active():
    counts = _param_counts(preset("v2-lite"))
    assert abs(counts["total"] - 15.7e9) <= 0.05e9, counts["total"]  # reported to 0.1B
    # Reported as 2.4B activated; the formula (input embedding excluded) gives 2.45B. The
    # official figure is truncated, so allow 0.1B.
    assert abs(counts["active"] - 2.4e9) <= 0.1e9, counts["active"]


# ----------------------------------------------------------------------------------------------
# Softmax scale
# ----------------------------------------------------------------------------------------------
def test_softmax_scale_without_yarn_is_inverse_sqrt_of_qk_head_dim():
    cfg = tiny()
    assert cfg.mla.yarn is None
    assert cfg.mla.softmax_scale == pytest.approx((32 + 16) ** -0.5, rel=1e-15)


def test_softmax_scale_with_v3_yarn_is_multiplied_by_mscale_squared():
    expected = (1 / math.sqrt(192)) * (0.1 * math.log(40) + 1) ** 2
    assert preset("v3-671b").mla.softmax_scale == pytest.approx(expected, rel=1e-15)
    assert preset("v3-671b").mla.softmax_scale == pytest.approx(0.13523, abs=1e-5)


def test_softmax_scale_with_v2_lite_yarn_uses_its_mscale_0707():
    expected = (1 / math.sqrt(192)) * (0.1 * 0.707 * math.log(40) + 1) ** 2
    assert preset("v2-lite").mla.softmax_scale == pytest.approx(expected, rel=1e-15)


def test_yarn_with_factor_one_leaves_the_softmax_scale_alone():
    mla = dataclasses.replace(tiny().mla, yarn=YarnConfig(factor=1.0,
                                                          original_max_position_embeddings=64))
    assert mla.softmax_scale == pytest.approx(48 ** -0.5, rel=1e-15)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_softmax_scale_equals_megatrons_formula_on_the_mapped_config(name):
    """Megatron's MLA computes mscale(rotary_scaling_factor, mscale_all_dim)^2 / sqrt(q_head)
    from the fields `to_megatron_config` writes: both must give the same scale."""
    from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import _yarn_get_mscale

    cfg = preset(name)
    mc = to_megatron_config(cfg)
    mscale = _yarn_get_mscale(mc.rotary_scaling_factor, mc.mscale_all_dim)
    megatron_scale = mscale * mscale / math.sqrt(mc.qk_head_dim + mc.qk_pos_emb_head_dim)
    assert cfg.mla.softmax_scale == pytest.approx(megatron_scale, rel=1e-12)


# ----------------------------------------------------------------------------------------------
# MTP lambda schedule
# ----------------------------------------------------------------------------------------------
def test_v3_mtp_weight_is_0_3_before_10t_tokens_and_0_1_from_10t_on():
    mtp = preset("v3-671b").mtp
    assert mtp.loss_weight(0) == 0.3
    assert mtp.loss_weight(V3_MTP_SWITCH_TOKENS - 1) == 0.3
    assert mtp.loss_weight(V3_MTP_SWITCH_TOKENS) == 0.1
    assert mtp.loss_weight(10 * V3_MTP_SWITCH_TOKENS) == 0.1


def test_piecewise_mtp_schedule_returns_the_piece_in_force_at_each_boundary():
    mtp = MTPConfig(num_layers=2, loss_weight_schedule=((0, 1.0), (100, 0.5), (250, 0.0)))
    got = [mtp.loss_weight(t) for t in (0, 99, 100, 101, 249, 250, 10**15)]
    assert got == [1.0, 1.0, 0.5, 0.5, 0.5, 0.0, 0.0]


def test_single_piece_mtp_schedule_is_constant():
    mtp = MTPConfig(loss_weight_schedule=((0, 0.2),))
    assert {mtp.loss_weight(t) for t in (0, 1, 10**14)} == {0.2}


# ----------------------------------------------------------------------------------------------
# Validation: every invalid combination raises ConfigError naming the field
# ----------------------------------------------------------------------------------------------
def _tiny_with(**changes):
    return lambda: tiny().replace(**changes)


_INVALID = {
    # tiny: 8 experts in 4 groups (2 per group), top-2 groups, top-2 experts, 3 layers
    "top_k above num_experts": (_tiny_with(moe__top_k=9), "MoEConfig.top_k"),
    "groups not dividing experts": (_tiny_with(moe__num_groups=3), "MoEConfig.num_groups"),
    "one expert per group": (_tiny_with(moe__num_groups=8), "MoEConfig.num_groups"),
    "topk_groups above num_groups": (_tiny_with(moe__topk_groups=5), "MoEConfig.topk_groups"),
    "top_k above kept groups' experts": (_tiny_with(moe__top_k=5), "MoEConfig.top_k"),
    "zero experts": (_tiny_with(moe__num_experts=0), "MoEConfig.num_experts"),
    "negative shared experts": (_tiny_with(moe__num_shared_experts=-1),
                                "MoEConfig.num_shared_experts"),
    "dense layers without dense width": (_tiny_with(moe__dense_ffn_size=0),
                                         "MoEConfig.dense_ffn_size"),
    "first_k_dense above num_layers": (_tiny_with(moe__first_k_dense=4), "MoEConfig.first_k_dense"),
    "non-positive route scale": (_tiny_with(moe__route_scale=0.0), "MoEConfig.route_scale"),
    "negative aux coefficient": (_tiny_with(moe__seq_aux_loss_coeff=-1e-4),
                                 "MoEConfig.seq_aux_loss_coeff"),
    "negative bias rate": (_tiny_with(moe__bias_update_rate=-1e-3), "MoEConfig.bias_update_rate"),
    "negative bias stop": (_tiny_with(moe__bias_update_stop_tokens=-1),
                           "MoEConfig.bias_update_stop_tokens"),
    "unknown experts impl": (_tiny_with(moe__experts_impl="fast"), "MoEConfig.experts_impl"),
    "odd rope dim": (_tiny_with(mla__qk_rope_head_dim=15), "MLAConfig.qk_rope_head_dim"),
    "negative q_lora": (_tiny_with(mla__q_lora_rank=-1), "MLAConfig.q_lora_rank"),
    "zero kv_lora": (_tiny_with(mla__kv_lora_rank=0), "MLAConfig.kv_lora_rank"),
    "zero heads": (_tiny_with(mla__num_heads=0), "MLAConfig.num_heads"),
    "non-positive rope theta": (_tiny_with(mla__rope_theta=0.0), "MLAConfig.rope_theta"),
    "unknown attention impl": (_tiny_with(mla__attention_impl="flash"), "MLAConfig.attention_impl"),
    "mscale != mscale_all_dim": (lambda: YarnConfig(mscale=1.0, mscale_all_dim=0.707),
                                 "YarnConfig.mscale_all_dim"),
    "yarn factor below one": (lambda: YarnConfig(factor=0.5), "YarnConfig.factor"),
    "yarn beta_fast below beta_slow": (lambda: YarnConfig(beta_fast=1.0, beta_slow=32.0),
                                       "YarnConfig.beta_fast"),
    "yarn on a model shorter than its original context": (
        _tiny_with(mla__yarn=YarnConfig(original_max_position_embeddings=4096)),
        "ModelConfig.max_seq_len"),
    "schedule not starting at 0": (lambda: MTPConfig(loss_weight_schedule=((1, 0.3),)),
                                   "MTPConfig.loss_weight_schedule"),
    "empty schedule": (lambda: MTPConfig(loss_weight_schedule=()),
                       "MTPConfig.loss_weight_schedule"),
    "schedule not increasing": (lambda: MTPConfig(loss_weight_schedule=((0, 0.3), (0, 0.1))),
                                "MTPConfig.loss_weight_schedule"),
    "schedule decreasing": (lambda: MTPConfig(
        loss_weight_schedule=((0, 0.3), (100, 0.2), (50, 0.1))), "MTPConfig.loss_weight_schedule"),
    "negative lambda": (lambda: MTPConfig(loss_weight_schedule=((0, 0.3), (10, -0.1))),
                        "MTPConfig.loss_weight_schedule"),
    "negative mtp depth": (_tiny_with(mtp__num_layers=-1), "MTPConfig.num_layers"),
    "zero hidden size": (_tiny_with(hidden_size=0), "ModelConfig.hidden_size"),
    "unknown dtype": (_tiny_with(params_dtype="int8"), "ModelConfig.params_dtype"),
    "unknown linear backend": (_tiny_with(linear_backend="apex"), "ModelConfig.linear_backend"),
    "non-positive norm eps": (_tiny_with(norm_eps=0.0), "ModelConfig.norm_eps"),
    "unknown preset": (lambda: preset("v4"), "preset='v4'"),
    "bad replace group": (_tiny_with(router__top_k=2), "router__"),
    "TP not dividing heads": (lambda: to_megatron_config(tiny(), tensor_parallel_size=3),
                              "MLAConfig.num_heads"),
    "TP not dividing expert FFN": (
        lambda: to_megatron_config(tiny().replace(moe__expert_ffn_size=66), tensor_parallel_size=4),
        "MoEConfig.expert_ffn_size"),
    "TP not dividing dense FFN": (
        lambda: to_megatron_config(tiny().replace(moe__dense_ffn_size=258), tensor_parallel_size=4),
        "MoEConfig.dense_ffn_size"),
}


@pytest.mark.parametrize("make, field_name", list(_INVALID.values()), ids=list(_INVALID))
def test_invalid_config_raises_config_error_naming_the_field(make, field_name):
    with pytest.raises(ConfigError, match=re.escape(field_name)):
        make()


def test_config_error_message_says_what_to_change():
    with pytest.raises(ConfigError) as info:
        tiny().replace(moe__top_k=5)
    message = str(info.value)
    assert "top_k=5" in message and "raise topk_groups or lower top_k" in message


def test_configs_are_frozen():
    cfg = tiny()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.hidden_size = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.moe.top_k = 1  # type: ignore[misc]


def test_replace_changes_only_the_named_nested_field():
    base = tiny()
    changed = base.replace(moe__top_k=4, mla__v_head_dim=16, num_layers=5)
    assert (changed.moe.top_k, changed.mla.v_head_dim, changed.num_layers) == (4, 16, 5)
    assert dataclasses.replace(changed.moe, top_k=base.moe.top_k) == base.moe
    assert dataclasses.replace(changed.mla, v_head_dim=base.mla.v_head_dim) == base.mla
    assert changed.mtp == base.mtp and base.moe.top_k == 2  # the original is untouched


def test_is_moe_layer_is_false_exactly_for_the_first_k_layers():
    cfg = preset("v3-671b")
    assert [cfg.is_moe_layer(i) for i in range(5)] == [False, False, False, True, True]
    assert cfg.is_moe_layer(61)  # the MTP layer (index num_layers) is an MoE layer


# ----------------------------------------------------------------------------------------------
# Megatron mapping
# ----------------------------------------------------------------------------------------------
def test_to_megatron_config_maps_v3_onto_megatrons_mla_and_moe_fields():
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    cfg = preset("v3-671b")
    mc = to_megatron_config(cfg)
    assert isinstance(mc, MLATransformerConfig) and mc.dsv3 is cfg
    assert (mc.num_layers, mc.hidden_size, mc.num_attention_heads) == (61, 7168, 128)
    assert mc.multi_latent_attention is True
    assert (mc.q_lora_rank, mc.kv_lora_rank) == (1536, 512)
    assert (mc.qk_head_dim, mc.qk_pos_emb_head_dim, mc.v_head_dim) == (128, 64, 128)
    assert (mc.rope_type, mc.rotary_scaling_factor, mc.original_max_position_embeddings) == (
        "yarn", 40.0, 4096)
    assert (mc.beta_fast, mc.beta_slow, mc.mscale, mc.mscale_all_dim) == (32.0, 1.0, 1.0, 1.0)
    assert mc.moe_layer_freq == [0, 0, 0] + [1] * 58
    assert (mc.ffn_hidden_size, mc.moe_ffn_hidden_size) == (18432, 2048)
    assert mc.moe_shared_expert_intermediate_size == 2048
    assert (mc.num_moe_experts, mc.moe_router_topk) == (256, 8)
    assert mc.moe_router_score_function == "sigmoid"
    assert mc.moe_router_enable_expert_bias is True
    assert mc.moe_router_bias_update_rate == 1e-3
    assert (mc.moe_router_num_groups, mc.moe_router_group_topk) == (8, 4)
    assert mc.moe_router_topk_scaling_factor == 2.5
    assert mc.moe_router_pre_softmax is False
    assert mc.moe_router_load_balancing_type == "seq_aux_loss" and mc.moe_aux_loss_coeff == 1e-4
    assert (mc.mtp_num_layers, mc.mtp_loss_scaling_factor) == (1, 0.3)
    assert mc.normalization == "RMSNorm" and mc.gated_linear_unit is True
    assert mc.activation_func is torch.nn.functional.silu
    assert mc.add_bias_linear is False and mc.layernorm_epsilon == cfg.norm_eps
    assert mc.params_dtype is torch.bfloat16 and mc.bf16 is True


def test_to_megatron_config_marks_no_query_compression_and_no_mtp_with_none():
    mc = to_megatron_config(preset("v2-lite"))
    assert mc.q_lora_rank is None  # 0 in our config; Megatron's "no q-LoRA" is None
    assert mc.mtp_num_layers is None
    assert mc.moe_router_num_groups is None and mc.moe_router_group_topk is None
    assert mc.moe_router_load_balancing_type == "none"


def test_to_megatron_config_carries_parallel_sizes_and_overrides():
    mc = to_megatron_config(tiny(), tensor_parallel_size=2, pipeline_parallel_size=1,
                            init_method_std=0.5)
    assert mc.tensor_model_parallel_size == 2 and mc.init_method_std == 0.5


def _fields_megatron_cannot_represent(cfg):
    """Blank out what MLATransformerConfig has no field for: the name, the schedule's later
    pieces, the bias-update stop."""
    first_piece = cfg.mtp.loss_weight_schedule[:1]
    return cfg.replace(name="-", mtp__loss_weight_schedule=first_piece,
                       moe__bias_update_stop_tokens=None)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_from_megatron_config_inverts_to_megatron_config_for_every_representable_field(name):
    cfg = preset(name)
    mc = to_megatron_config(cfg)
    del mc.dsv3  # as if Megatron's own argument parser had built it
    back = from_megatron_config(mc, vocab_size=cfg.vocab_size, max_seq_len=cfg.max_seq_len)
    assert _fields_megatron_cannot_represent(back) == _fields_megatron_cannot_represent(cfg)


def test_from_megatron_config_returns_the_carried_config_unchanged():
    cfg = preset("v3-671b")
    assert from_megatron_config(to_megatron_config(cfg)) is cfg


def test_from_megatron_config_derives_the_yarn_context_when_max_seq_len_is_not_given():
    mc = to_megatron_config(preset("v3-671b"))
    del mc.dsv3
    assert from_megatron_config(mc, vocab_size=129280).max_seq_len == 4096 * 40


def _megatron_without_dsv3(**overrides):
    mc = to_megatron_config(tiny(), **overrides)
    del mc.dsv3
    return mc


def test_from_megatron_config_rejects_a_config_without_mla():
    from megatron.core.transformer.transformer_config import TransformerConfig

    plain = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4,
                              use_cpu_initialization=True)
    with pytest.raises(ConfigError, match="multi_latent_attention"):
        from_megatron_config(plain)


def test_from_megatron_config_rejects_a_config_without_experts():
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    dense = MLATransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4,
                                 multi_latent_attention=True, use_cpu_initialization=True)
    with pytest.raises(ConfigError, match="num_moe_experts"):
        from_megatron_config(dense)


def test_from_megatron_config_rejects_softmax_routing():
    mc = _megatron_without_dsv3(moe_router_score_function="softmax",
                                moe_router_enable_expert_bias=False)
    with pytest.raises(ConfigError, match="moe_router_score_function"):
        from_megatron_config(mc)


@pytest.mark.parametrize("layer_freq", [[0, 1, 0], [1, 0, 1], 2],
                         ids=["dense-moe-dense", "moe-dense-moe", "every-2nd"])
def test_from_megatron_config_rejects_interleaved_dense_and_moe_layers(layer_freq):
    mc = _megatron_without_dsv3(moe_layer_freq=layer_freq)
    with pytest.raises(ConfigError, match="moe_layer_freq"):
        from_megatron_config(mc)


def test_from_megatron_config_reads_an_integer_layer_freq_of_one_as_all_moe():
    mc = _megatron_without_dsv3(moe_layer_freq=1, ffn_hidden_size=64)
    back = from_megatron_config(mc, vocab_size=2048, max_seq_len=128)
    assert back.moe.first_k_dense == 0 and back.is_moe_layer(0)


def test_from_megatron_config_reads_list_valued_balance_loss_fields_as_megatrons_cli_sets_them():
    mc = _megatron_without_dsv3(moe_router_load_balancing_type=["aux_loss", "seq_aux_loss"],
                                moe_aux_loss_coeff=[1e-2, 1e-4])
    back = from_megatron_config(mc, vocab_size=2048, max_seq_len=128)
    assert back.moe.seq_aux_loss_coeff == 1e-4


def test_from_megatron_config_rejects_a_shared_width_not_a_multiple_of_the_expert_width():
    mc = _megatron_without_dsv3(moe_shared_expert_intermediate_size=96)  # experts are 64 wide
    with pytest.raises(ConfigError, match="moe_shared_expert_intermediate_size"):
        from_megatron_config(mc)

