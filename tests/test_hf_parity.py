"""Parity with Hugging Face transformers' DeepseekV3ForCausalLM, and the checkpoint converter.

Import direction: a randomly initialised HF model (fp32, eager attention, eager experts)
is converted with `hf_to_dsv3`, loaded into our model, and both run the same tokens. Logits,
the language-model loss and every MoE layer's routing decisions must agree, for variants
that switch q-LoRA, YaRN, group-limited routing, dense first layers and shared experts.
Export direction: `dsv3_to_hf` output is saved as a checkpoint and loaded through HF's own
`from_pretrained` and `MtpModel.from_pretrained` (DeepSeek's MTP layout, layer num_layers),
which must reproduce our main and MTP logits. The converter's round trip is exact and its
errors name the key and the fix.

Weights are drawn with std 0.1 (HF's default 0.02 leaves tiny activations at width 64),
RMSNorm weights uniformly in [0.5, 1.5] and router biases with std ROUTER_BIAS_STD, which the
tests check is large enough to change selections (and so that parity exercises the bias).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from megatron_dsv3.checkpoint.hf import (
    ConversionError,
    dsv3_to_hf,
    hf_config_from_model_config,
    hf_to_dsv3,
    load_dsv3_state_dict,
)
from megatron_dsv3.config import MLAConfig, ModelConfig, MoEConfig, MTPConfig, YarnConfig
from megatron_dsv3.model import build_model
from megatron_dsv3.mtp import shift_left
from helpers.tolerance import FP32_REORDER, assert_close, assert_equal

transformers = pytest.importorskip("transformers")

BATCH, SEQ = 2, 32
INIT_STD = 0.1
ROUTER_BIAS_STD = 0.05
FP32_WHY = ("fp32, same math in another order: HF's rsqrt RMSNorm vs F.rms_norm, matmul vs "
            "einsum attention, de-interleaved vs interleaved rope, index_add vs permuted expert "
            "combine; rounding ~1e-7 per op, grown through a few layers (measured <= 1e-6)")


def _cfg(name: str, *, q_lora_rank: int = 32, yarn=None, max_seq_len: int = 64, **moe
         ) -> ModelConfig:
    moe_fields = dict(num_experts=8, top_k=2, expert_ffn_size=32, num_shared_experts=1,
                      first_k_dense=1, dense_ffn_size=96, num_groups=4, topk_groups=2,
                      route_scale=2.5)
    moe_fields.update(moe)
    return ModelConfig(
        name=name, vocab_size=512, hidden_size=64, num_layers=3, max_seq_len=max_seq_len,
        mla=MLAConfig(num_heads=4, q_lora_rank=q_lora_rank, kv_lora_rank=32,
                      qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, yarn=yarn),
        moe=MoEConfig(**moe_fields), mtp=MTPConfig(num_layers=0), init_std=INIT_STD)


VARIANTS = {
    # q-LoRA, YaRN (positions 16..31 lie beyond the original 16), 4 groups keep 2, 1 dense layer
    "qlora-yarn-groups": _cfg("qlora-yarn-groups", yarn=YarnConfig(
        factor=4.0, original_max_position_embeddings=16)),
    # no q-LoRA (HF q_proj), plain rope, 8 groups of 2 keep 3, top-4, 2 shared experts
    "noqlora-rope-groups": _cfg("noqlora-rope-groups", q_lora_rank=0, num_experts=16, top_k=4,
                                num_groups=8, topk_groups=3, num_shared_experts=2),
    # every layer MoE, no shared expert (HF: zero-width), no groups, unnormalised gates,
    # YaRN with V2's mscale
    "allmoe-noshared-yarn": _cfg("allmoe-noshared-yarn", first_k_dense=0, num_shared_experts=0,
                                 num_groups=1, topk_groups=1, top_k=3, route_scale=1.0,
                                 normalize_gates=False,
                                 yarn=YarnConfig(factor=8.0, original_max_position_embeddings=16,
                                                 mscale=0.707, mscale_all_dim=0.707),
                                 max_seq_len=128),
}


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------
def _hf_config(cfg: ModelConfig):
    return hf_config_from_model_config(cfg, attn_implementation="eager",
                                       experts_implementation="eager")


def _randomise_hf(model, seed: int) -> None:
    """HF's init drew std=INIT_STD (initializer_range); add random norms and router biases."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(torch.rand(param.shape, generator=generator) + 0.5)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(torch.randn(buffer.shape, generator=generator) * ROUTER_BIAS_STD)


def _random_hf_model(cfg: ModelConfig, seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.DeepseekV3ForCausalLM(_hf_config(cfg)).eval()
    _randomise_hf(model, seed)
    return model


def _our_model(cfg: ModelConfig, dist, state_dict) -> torch.nn.Module:
    model = build_model(cfg, pg_collection=dist).eval()
    load_dsv3_state_dict(model, state_dict)
    return model


def _our_routers(model):
    return [layer.mlp.router for layer in model.decoder.layers if hasattr(layer.mlp, "router")]


def _hf_routers(model):
    return [layer.mlp.gate for layer in model.model.layers if hasattr(layer.mlp, "gate")]


@contextlib.contextmanager
def _capture(modules, pick):
    """Collect pick(output) of every call of each module, in order."""
    seen: list = []
    handles = [m.register_forward_hook(lambda _m, _i, out: seen.append(pick(out)))
               for m in modules]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def _ours_bs_major(x_TK: torch.Tensor) -> torch.Tensor:
    """Our router sees tokens s-major ([s, b] flattened); HF's b-major: reorder ours."""
    return x_TK.view(SEQ, BATCH, -1).transpose(0, 1).reshape(BATCH * SEQ, -1)


def _sorted_choice(topk_TK: torch.Tensor, gates_TK: torch.Tensor):
    """Expert ids sorted per token (HF's topk is unsorted), gates in the same order."""
    ids, order = topk_TK.sort(dim=-1)
    return ids, gates_TK.gather(1, order)


def _flips(a_TK: torch.Tensor, b_TK: torch.Tensor) -> int:
    """Tokens whose chosen expert set differs."""
    return int((a_TK.sort(-1).values != b_TK.sort(-1).values).any(-1).sum())


def _tokens(cfg: ModelConfig, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (BATCH, SEQ),
                         generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------
# Import direction: HF model -> hf_to_dsv3 -> our model
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=list(VARIANTS))
def parity_run(request, dist_single):
    """Both models on the same tokens: logits, losses, routing per MoE layer."""
    cfg = VARIANTS[request.param]
    hf = _random_hf_model(cfg)
    ours = _our_model(cfg, dist_single, hf_to_dsv3(hf.state_dict(), cfg))
    ids = _tokens(cfg)
    next_tokens = shift_left(ids, 1)  # our labels are the next tokens; the last is unused
    with torch.no_grad():
        with _capture(_hf_routers(hf), lambda out: (out[2], out[1])) as hf_routing:
            hf_out = hf(ids, labels=ids)  # HF shifts labels by one inside
        with _capture(_our_routers(ours), lambda r: (_ours_bs_major(r.topk_TK),
                                                     _ours_bs_major(r.gates_TK))) as our_routing:
            our_logits = ours(ids, None, None)
        our_loss = ours(ids, None, None, labels=next_tokens).lm_loss

        def hf_topk():
            with _capture(_hf_routers(hf), lambda out: out[2]) as seen:
                hf(ids)
            return seen

        biases = [gate.e_score_correction_bias.clone() for gate in _hf_routers(hf)]
        for gate in _hf_routers(hf):
            gate.e_score_correction_bias.zero_()
        zero_bias_topk = hf_topk()
        for gate, bias in zip(_hf_routers(hf), biases):
            gate.e_score_correction_bias.copy_(bias)
            gate.topk_group = gate.num_group
        no_group_limit_topk = hf_topk()
    return dict(cfg=cfg, ids=ids, next_tokens=next_tokens, hf_logits=hf_out.logits,
                hf_loss=hf_out.loss, our_logits=our_logits, our_loss=our_loss,
                hf_routing=hf_routing, our_routing=our_routing, zero_bias_topk=zero_bias_topk,
                no_group_limit_topk=no_group_limit_topk)


def test_logits_match_hf(parity_run):
    err = assert_close(parity_run["our_logits"], parity_run["hf_logits"], FP32_REORDER, FP32_WHY,
                       "logits")
    print(f"{parity_run['cfg'].name}: logits max relative error {err:.2e}")


def test_loss_matches_hf_shifted_labels(parity_run):
    """HF's `labels=ids` loss is the mean CE over positions 0..s-2 of target ids[i+1]; ours
    takes the next tokens as labels and returns per-token CE, whose last column has no
    target in HF."""
    our_per_token = parity_run["our_loss"][:, :-1]
    err = assert_close(our_per_token.mean(), parity_run["hf_loss"], FP32_REORDER, FP32_WHY,
                       "mean loss")
    hf_per_token = F.cross_entropy(parity_run["hf_logits"][:, :-1].transpose(1, 2),
                                   parity_run["next_tokens"][:, :-1], reduction="none")
    err_tok = assert_close(our_per_token, hf_per_token, FP32_REORDER, FP32_WHY, "per-token CE")
    print(f"{parity_run['cfg'].name}: loss {err:.2e}, per-token CE {err_tok:.2e}")


def test_routing_decisions_match_hf_exactly(parity_run):
    """fp32 scores of the two implementations differ by ~1e-7, far below the gaps between
    competing experts here, so not one token may choose another expert set."""
    hf_routing, our_routing = parity_run["hf_routing"], parity_run["our_routing"]
    num_moe = parity_run["cfg"].num_layers - parity_run["cfg"].moe.first_k_dense
    assert len(hf_routing) == len(our_routing) == num_moe, (len(hf_routing), len(our_routing))
    for layer, ((hf_topk, hf_gates), (our_topk, our_gates)) in enumerate(
            zip(hf_routing, our_routing)):
        flips = _flips(our_topk, hf_topk)
        assert flips == 0, f"MoE layer {layer}: {flips} of {BATCH * SEQ} tokens chose other experts"
        hf_ids, hf_sorted_gates = _sorted_choice(hf_topk, hf_gates)
        our_ids, our_sorted_gates = _sorted_choice(our_topk, our_gates)
        assert_equal(our_ids, hf_ids, f"MoE layer {layer} expert ids")
        err = assert_close(our_sorted_gates, hf_sorted_gates, FP32_REORDER,
                           "fp32 sigmoid of the same logits; HF adds 1e-20 to the normaliser",
                           f"MoE layer {layer} gates")
        print(f"{parity_run['cfg'].name}: MoE layer {layer}: 0 flips, gates {err:.2e}")


def test_router_bias_changes_selections(parity_run):
    """The biases drawn here are large enough to matter, so routing parity covers them."""
    flips = sum(_flips(zero, hf) for zero, (hf, _) in
                zip(parity_run["zero_bias_topk"], parity_run["hf_routing"]))
    print(f"{parity_run['cfg'].name}: zero bias changes {flips} token selections")
    assert flips > 0, "zeroing the router bias changed no selection: raise ROUTER_BIAS_STD"


def test_group_limit_changes_selections(parity_run):
    moe = parity_run["cfg"].moe
    if moe.topk_groups == moe.num_groups:
        pytest.skip("variant without group-limited routing")
    flips = sum(_flips(free, hf) for free, (hf, _) in
                zip(parity_run["no_group_limit_topk"], parity_run["hf_routing"]))
    print(f"{parity_run['cfg'].name}: no group limit changes {flips} token selections")
    assert flips > 0, "group-limited routing never bound: routing parity would not cover it"


# ----------------------------------------------------------------------------------------------
# Export direction: our model (with MTP) -> dsv3_to_hf -> HF's own loaders
# ----------------------------------------------------------------------------------------------
def _random_state_dict(model) -> dict[str, torch.Tensor]:
    """Every tensor of `model` drawn anew: norms in [0.5, 1.5], biases ROUTER_BIAS_STD."""
    generator = torch.Generator().manual_seed(7)
    out = {}
    for key, value in model.state_dict().items():
        if not torch.is_tensor(value):
            continue
        if key.endswith("norm.weight"):
            out[key] = torch.rand(value.shape, generator=generator) + 0.5
        elif key.endswith("expert_bias"):
            out[key] = torch.randn(value.shape, generator=generator) * ROUTER_BIAS_STD
        else:
            out[key] = torch.randn(value.shape, generator=generator) * INIT_STD
    return out


def test_export_loads_into_hf_and_mtp_matches_hf_mtp_model(dist_single, tmp_path):
    """Our model with MTP depth 1, exported and loaded by HF's `from_pretrained` (main
    model) and `MtpModel.from_pretrained` (DeepSeek's layer-`num_layers` MTP layout): the
    main logits and the MTP depth-1 logits must match ours."""
    from safetensors.torch import save_file
    from transformers.modeling_layers import MtpModel

    cfg = VARIANTS["qlora-yarn-groups"].replace(mtp__num_layers=1)
    ours = build_model(cfg, pg_collection=dist_single).eval()
    load_dsv3_state_dict(ours, _random_state_dict(ours))
    save_file(dsv3_to_hf(ours.state_dict(), cfg), str(tmp_path / "model.safetensors"))
    _hf_config(cfg).save_pretrained(tmp_path)

    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(
        tmp_path, attn_implementation="eager", experts_implementation="eager",
        dtype=torch.float32).eval()
    # HF finds MTP weights by its ignore-list pattern, written for V3's 61 layers.
    hf._keys_to_ignore_on_load_unexpected = [rf"model\.layers\.{cfg.num_layers}\..*"]
    mtp = MtpModel.from_pretrained(hf).eval()
    # HF loaded our values (a fresh HF init has all-ones norms)
    assert_equal(mtp.layers[0].post_norm.weight, ours.mtp.layers[0].final_layernorm.weight,
                 "MTP shared_head.norm")

    ids = _tokens(cfg)
    with torch.no_grad():
        # clone: Megatron's cross-entropy overwrites the logits in place
        with _capture([ours.output_layer], lambda out: out[0].clone()) as our_logits:
            ours(ids, None, None, labels=shift_left(ids, 1))
        main = hf.model(ids)
        # Depth 1 at position i sees h_i and the embedding of t_{i+1}. HF drafts with the
        # positions of the shifted tokens; rope scores depend only on position differences.
        positions = torch.arange(1, SEQ + 1).unsqueeze(0)
        h = mtp.forward_layer(0, main.last_hidden_state, positions, None,
                              input_ids=shift_left(ids, 1))
        hf_mtp_logits = mtp.shared_head(h)
        hf_main_logits = hf.lm_head(main.last_hidden_state)
    our_main, our_mtp = (logits.transpose(0, 1) for logits in our_logits)  # [b, s, V]
    err_main = assert_close(our_main, hf_main_logits, FP32_REORDER, FP32_WHY, "main logits")
    err_mtp = assert_close(our_mtp, hf_mtp_logits, FP32_REORDER, FP32_WHY, "MTP logits")
    print(f"export: main logits {err_main:.2e}, MTP depth-1 logits {err_mtp:.2e}")


# ----------------------------------------------------------------------------------------------
# Converter: exact round trip, layout, errors
# ----------------------------------------------------------------------------------------------
MTP_CFGS = {name: VARIANTS[name].replace(mtp__num_layers=1)
            for name in ("qlora-yarn-groups", "noqlora-rope-groups", "allmoe-noshared-yarn")}


@pytest.fixture(scope="module", params=list(MTP_CFGS))
def mtp_pair(request, dist_single):
    """(cfg, our random state dict, its HF export) for a cfg with MTP depth 1."""
    cfg = MTP_CFGS[request.param]
    ours = _random_state_dict(build_model(cfg, pg_collection=dist_single))
    return cfg, ours, dsv3_to_hf(ours, cfg)


def _assert_same_dict(actual: dict, expected: dict, what: str) -> None:
    assert set(actual) == set(expected), (what, sorted(set(actual) ^ set(expected))[:5])
    for key in expected:
        assert actual[key].dtype == expected[key].dtype, (what, key)
        assert_equal(actual[key], expected[key], f"{what}: {key}")


def test_round_trip_is_exact_including_mtp(mtp_pair):
    cfg, ours, hf_sd = mtp_pair
    _assert_same_dict(hf_to_dsv3(hf_sd, cfg), ours, "hf_to_dsv3(dsv3_to_hf(sd))")
    _assert_same_dict(dsv3_to_hf(hf_to_dsv3(hf_sd, cfg), cfg), hf_sd,
                      "dsv3_to_hf(hf_to_dsv3(hf_sd))")


def test_export_follows_hf_names_and_deepseek_mtp_layout(mtp_pair):
    """Main keys are exactly HF's model's (strict load); MTP depth 0 is HF layer num_layers
    with the sublayer names of an MoE layer plus DeepSeek's MTP-only tensors."""
    cfg, _, hf_sd = mtp_pair
    L = cfg.num_layers
    mtp_prefix = f"model.layers.{L}."
    main = {k: v for k, v in hf_sd.items() if not k.startswith(mtp_prefix)}
    transformers.DeepseekV3ForCausalLM(_hf_config(cfg)).load_state_dict(main, strict=True)

    mtp_keys = {k[len(mtp_prefix):] for k in hf_sd if k.startswith(mtp_prefix)}
    last_layer = f"model.layers.{L - 1}."  # an MoE layer: same sublayers as the MTP layer
    sublayer_keys = {k[len(last_layer):] for k in hf_sd if k.startswith(last_layer)}
    mtp_only = {"enorm.weight", "hnorm.weight", "eh_proj.weight", "embed_tokens.weight",
                "shared_head.norm.weight", "shared_head.head.weight"}
    assert mtp_keys == sublayer_keys | mtp_only, sorted(mtp_keys ^ (sublayer_keys | mtp_only))
    assert_equal(hf_sd[mtp_prefix + "embed_tokens.weight"], hf_sd["model.embed_tokens.weight"])
    assert_equal(hf_sd[mtp_prefix + "shared_head.head.weight"], hf_sd["lm_head.weight"])
    storages = [t.untyped_storage().data_ptr() for t in hf_sd.values() if t.numel()]
    assert len(storages) == len(set(storages)), "exported tensors share memory (safetensors)"


def test_per_expert_checkpoint_is_fused_on_import(mtp_pair):
    """DeepSeek's release stores experts one by one: the same weights, unfused."""
    cfg, ours, hf_sd = mtp_pair
    ffn = cfg.moe.expert_ffn_size
    unfused = {}
    for key, value in hf_sd.items():
        if key.endswith("mlp.experts.gate_up_proj"):
            prefix = key[: -len("gate_up_proj")]
            for e in range(cfg.moe.num_experts):
                unfused[f"{prefix}{e}.gate_proj.weight"] = value[e, :ffn]
                unfused[f"{prefix}{e}.up_proj.weight"] = value[e, ffn:]
        elif key.endswith("mlp.experts.down_proj"):
            prefix = key[: -len("down_proj")]
            for e in range(cfg.moe.num_experts):
                unfused[f"{prefix}{e}.down_proj.weight"] = value[e]
        else:
            unfused[key] = value
    _assert_same_dict(hf_to_dsv3(unfused, cfg), ours, "from per-expert checkpoint")

    del unfused["model.layers.1.mlp.experts.3.up_proj.weight"]
    with pytest.raises(ConversionError, match=r"model\.layers\.1\.mlp\.experts.*num_experts"):
        hf_to_dsv3(unfused, cfg)


def _conversion_error(hf_sd, cfg) -> str:
    with pytest.raises(ConversionError) as info:
        hf_to_dsv3(hf_sd, cfg)
    return str(info.value)


def test_errors_name_the_key_and_the_fix(mtp_pair):
    cfg, ours, hf_sd = mtp_pair
    L = cfg.num_layers

    missing = dict(hf_sd)
    del missing["model.layers.1.mlp.gate.e_score_correction_bias"]
    message = _conversion_error(missing, cfg)
    assert "1 missing key" in message and "e_score_correction_bias" in message, message

    no_mtp_cfg = cfg.replace(mtp__num_layers=0)
    message = _conversion_error(hf_sd, no_mtp_cfg)
    assert f"model.layers.{L}.eh_proj.weight" in message and "raise mtp.num_layers" in message

    message = _conversion_error({k: v for k, v in hf_sd.items()
                                 if not k.startswith(f"model.layers.{L}.")}, cfg)
    assert "no MTP depth 0" in message and "lower mtp.num_layers" in message, message

    narrower = cfg.replace(mla__kv_lora_rank=24)
    message = _conversion_error(hf_sd, narrower)
    assert "kv_a_proj_with_mqa.weight: shape (40, 64)" in message, message
    assert "(32, 64) = [kv_lora_rank + qk_rope_head_dim, hidden_size]" in message, message

    other_q = cfg.replace(mla__q_lora_rank=0 if cfg.mla.q_lora_rank else 32)
    message = _conversion_error(hf_sd, other_q)
    assert "q_lora_rank differs" in message, message

    fp8 = dict(hf_sd, **{"model.layers.0.self_attn.o_proj.weight_scale_inv": torch.ones(1)})
    assert "dequantize" in _conversion_error(fp8, cfg)

    bad_copy = dict(hf_sd)
    bad_copy[f"model.layers.{L}.shared_head.head.weight"] = hf_sd["lm_head.weight"] + 1
    message = _conversion_error(bad_copy, cfg)
    assert f"model.layers.{L}.shared_head.head.weight differs from lm_head.weight" in message

    with pytest.raises(ConversionError, match=r"decoder\.layers\.0\.input_layernorm\.weight"):
        dsv3_to_hf({k: v for k, v in ours.items()
                    if k != "decoder.layers.0.input_layernorm.weight"}, cfg)
    with pytest.raises(ConversionError, match=r"expects \(32, 64\) = \[kv_lora_rank"):
        dsv3_to_hf(ours, narrower)


def test_mtp_copies_are_optional_on_import(mtp_pair):
    cfg, ours, hf_sd = mtp_pair
    L = cfg.num_layers
    trimmed = {k: v for k, v in hf_sd.items()
               if k not in (f"model.layers.{L}.embed_tokens.weight",
                            f"model.layers.{L}.shared_head.head.weight")}
    _assert_same_dict(hf_to_dsv3(trimmed, cfg), ours, "without the MTP copies")


def test_load_ignores_only_extra_state(dist_single):
    cfg = VARIANTS["qlora-yarn-groups"]
    model = build_model(cfg, pg_collection=dist_single)
    state = _random_state_dict(model)  # no `_extra_state` entries
    load_dsv3_state_dict(model, state)
    del state["output_layer.weight"]
    with pytest.raises(ConversionError, match="output_layer.weight"):
        load_dsv3_state_dict(model, state)


# ----------------------------------------------------------------------------------------------
# The HF config: the four settings that silently break parity, checked directly
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(VARIANTS))
def test_hf_config_parity_settings(name):
    from megatron_dsv3.attention.rope import rope_inv_freq

    cfg = VARIANTS[name]
    hf_cfg = _hf_config(cfg)
    assert hf_cfg.rope_interleave is True
    assert hf_cfg.q_lora_rank == (cfg.mla.q_lora_rank or None)
    assert hf_cfg.num_key_value_heads == cfg.mla.num_heads
    assert hf_cfg.tie_word_embeddings is False
    assert hf_cfg.num_nextn_predict_layers == cfg.mtp.num_layers
    model = transformers.DeepseekV3ForCausalLM(hf_cfg)
    rotary = model.model.rotary_emb
    assert rotary.attention_scaling == 1.0, "HF would scale cos/sin: mscale_all_dim != mscale"
    assert model.model.layers[0].self_attn.scaling == pytest.approx(cfg.mla.softmax_scale,
                                                                     rel=1e-12)
    assert_equal(rotary.inv_freq, rope_inv_freq(cfg.mla.qk_rope_head_dim, cfg.mla.rope_theta,
                                                cfg.mla.yarn), "rope inv_freq")


def test_latent_norms_keep_eps_1e6_like_hf_when_norm_eps_differs(dist_single):
    """HF's q_a_layernorm/kv_a_layernorm keep eps=1e-6 whatever rms_norm_eps says (so does
    DeepSeek's reference code); ours do too, while the layer norms follow norm_eps. At
    norm_eps=1e-5 a mismatch would move the logits by only ~4e-6 relative (measured), below the
    fp32 parity bound, so the eps values are checked directly."""
    from megatron_dsv3.attention.mla import LATENT_NORM_EPS

    cfg = VARIANTS["qlora-yarn-groups"].replace(norm_eps=1e-5)
    hf_cfg = _hf_config(cfg)
    hf_attention = transformers.DeepseekV3ForCausalLM(hf_cfg).model.layers[0].self_attn
    ours = build_model(cfg, pg_collection=dist_single).decoder.layers[0]
    assert hf_cfg.rms_norm_eps == 1e-5 == ours.input_layernorm.eps
    assert hf_attention.q_a_layernorm.variance_epsilon == LATENT_NORM_EPS == ours.self_attention.q_norm.eps
    assert hf_attention.kv_a_layernorm.variance_epsilon == LATENT_NORM_EPS == ours.self_attention.kv_norm.eps
