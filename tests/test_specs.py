"""Specs: Megatron-Core's own classes (TransformerBlock, GPTModel, GPTModelBuilder, the
`--spec` argument, the pipeline offsets, MultiTokenPredictionBlock) build our layers.

Everything runs on CPU in a single-process gloo world (`dist_single`), fp32, with the tiny
preset shrunk further. Where both sides run the same operations in the same order the
comparison is exact (`assert_equal`).
"""

from __future__ import annotations

import argparse

import pytest
import torch

from megatron_dsv3.attention.mla import MultiLatentAttention
from megatron_dsv3.config import ConfigError, from_megatron_config, to_megatron_config
from megatron_dsv3.layers import RMSNorm
from megatron_dsv3.model import DeepSeekV3Model, build_model, model_provider
from megatron_dsv3.moe.layer import DeepSeekMoE, DenseMLP
from megatron_dsv3.mtp import MTPLayer
from megatron_dsv3.specs import decoder_block_spec, layer_spec, mtp_block_spec
from helpers.small_model import small_config as _small_config
from helpers.tolerance import FP32_REORDER, assert_close, assert_equal

SEQ, BATCH = 8, 2


def small_config(**changes):
    """helpers.small_model's, with Megatron's CLI default bias update rate (tiny uses 1e-2)."""
    return _small_config(**{"moe__bias_update_rate": 1e-3, **changes})


def _without_carried_config(megatron_cfg):
    """As if Megatron's own argument parser had built it: no `.dsv3` attached."""
    del megatron_cfg.dsv3
    return megatron_cfg


def _mlp_kinds(layers) -> list[str]:
    return [type(layer.mlp).__name__ for layer in layers]


def _tokens(vocab_size: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    full = torch.randint(0, vocab_size, (BATCH, SEQ + 1), generator=gen)
    position_ids = torch.arange(SEQ).expand(BATCH, SEQ)
    return full[:, :SEQ], full[:, 1:], position_ids


# ----------------------------------------------------------------------------------------------
# TransformerBlock
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def block(dist_single):
    from megatron.core.transformer.transformer_block import TransformerBlock

    torch.manual_seed(0)
    megatron_cfg = to_megatron_config(small_config())
    return TransformerBlock(config=megatron_cfg, spec=decoder_block_spec(megatron_cfg),
                            pg_collection=dist_single)


def test_transformer_block_builds_mla_layers_dense_first_then_moe(block):
    assert [layer.layer_number for layer in block.layers] == [1, 2, 3]
    assert all(isinstance(layer.self_attention, MultiLatentAttention) for layer in block.layers)
    assert isinstance(block.layers[0].mlp, DenseMLP)
    assert all(isinstance(layer.mlp, DeepSeekMoE) for layer in block.layers[1:])
    assert all(isinstance(layer.input_layernorm, RMSNorm) for layer in block.layers)
    assert isinstance(block.final_layernorm, RMSNorm)


def test_transformer_block_forward_equals_its_layers_applied_one_by_one(block):
    x = torch.randn(SEQ, BATCH, 32, generator=torch.Generator().manual_seed(1))  # [s, b, h]
    with torch.no_grad():
        out = block(hidden_states=x, attention_mask=None)
        h = x
        for layer in block.layers:
            h, _ = layer(hidden_states=h, attention_mask=None)
        expected = block.final_layernorm(h)
    assert_equal(out, expected, "block vs layer by layer")


def test_each_layer_is_pre_norm_residual_attention_then_ffn(block):
    """The spec's norms and bias-dropout-adds make x + Attn(N1(x)), then + FFN(N2(.))."""
    x = torch.randn(SEQ, BATCH, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for layer in block.layers:
            out, _ = layer(hidden_states=x, attention_mask=None)
            attn, _ = layer.self_attention(layer.input_layernorm(x))
            mid = x + attn
            ffn, _ = layer.mlp(layer.pre_mlp_layernorm(mid))
            assert_equal(out, mid + ffn, f"layer {layer.layer_number}")
            x = out


def test_transformer_block_output_at_a_position_ignores_later_positions(block):
    x = torch.randn(SEQ, BATCH, 32, generator=torch.Generator().manual_seed(3))
    changed = x.clone()
    changed[5] += 1.0
    with torch.no_grad():
        out = block(hidden_states=x, attention_mask=None)
        out_changed = block(hidden_states=changed, attention_mask=None)
    # Not bit for bit: the changed token may route to other experts, so every expert GEMM of the
    # block sees another number of rows, and a CPU GEMM may block its sums by the row count.
    assert_close(out_changed[:5], out[:5], FP32_REORDER,
                 "expert GEMMs over a different number of rows", "positions before the change")
    assert not torch.allclose(out_changed[5:], out[5:])


# ----------------------------------------------------------------------------------------------
# GPTModel (Megatron's base class) with our decoder spec
# ----------------------------------------------------------------------------------------------
def test_megatron_gpt_model_with_our_specs_matches_deepseek_v3_model_logits_and_loss(dist_single):
    from megatron.core.models.gpt import GPTModel

    cfg = small_config()
    torch.manual_seed(0)
    ours = build_model(cfg, pg_collection=dist_single)
    megatron_cfg = ours.config
    base = GPTModel(config=megatron_cfg, transformer_layer_spec=decoder_block_spec(megatron_cfg),
                    vocab_size=cfg.vocab_size, max_sequence_length=cfg.max_seq_len,
                    position_embedding_type="none", mtp_block_spec=mtp_block_spec(megatron_cfg),
                    pg_collection=dist_single)
    assert type(base) is GPTModel
    base.load_state_dict(ours.state_dict(), strict=True)
    ours.eval(), base.eval()
    input_ids, labels, position_ids = _tokens(cfg.vocab_size)
    with torch.no_grad():
        logits, base_logits = (m(input_ids, position_ids, None) for m in (ours, base))
        main_loss = ours(input_ids, position_ids, None, labels=labels).lm_loss
        base_loss = base(input_ids, position_ids, None, labels=labels)
    assert logits.shape == (BATCH, SEQ, cfg.vocab_size)
    assert_equal(logits, base_logits, "logits")
    assert_equal(main_loss, base_loss, "per-token main loss")


# ----------------------------------------------------------------------------------------------
# The `--spec megatron_dsv3.specs decoder_block_spec` path
# ----------------------------------------------------------------------------------------------
def test_import_module_resolves_the_spec_argument_to_decoder_block_spec():
    from megatron.training import argument_utils

    assert argument_utils.import_module(["megatron_dsv3.specs", "decoder_block_spec"]) \
        is decoder_block_spec


def test_gpt_model_builder_with_decoder_block_spec_builds_our_layers(dist_single):
    from megatron.core.models.gpt import GPTModel
    from megatron.training.models.gpt import GPTModelBuilder, GPTModelConfig

    cfg = small_config(mtp__num_layers=0)
    megatron_cfg = _without_carried_config(to_megatron_config(cfg))
    model_cfg = GPTModelConfig(transformer=megatron_cfg, transformer_layer_spec=decoder_block_spec,
                               vocab_size=cfg.vocab_size, seq_length=cfg.max_seq_len,
                               position_embedding_type="none")
    model = GPTModelBuilder(model_cfg).build_model(dist_single)
    assert type(model) is GPTModel
    layers = model.decoder.layers
    assert all(isinstance(layer.self_attention, MultiLatentAttention) for layer in layers)
    assert _mlp_kinds(model.decoder.layers) == ["DenseMLP", "DeepSeekMoE", "DeepSeekMoE"]
    # The layers read the model back from Megatron's fields: same mechanisms as `cfg`.
    assert model.decoder.layers[0].self_attention.cfg == cfg.mla
    assert model.decoder.layers[1].mlp.cfg == cfg.moe
    input_ids, _, position_ids = _tokens(cfg.vocab_size)
    with torch.no_grad():
        logits = model(input_ids, position_ids, None)
    assert logits.shape == (BATCH, SEQ, cfg.vocab_size) and torch.isfinite(logits).all()


def _megatron_cli(*extra: str) -> list[str]:
    """Megatron flags for small_config(), as a user would launch it with `--spec`."""
    return ("--spec megatron_dsv3.specs decoder_block_spec "
            "--num-layers 3 --hidden-size 32 --num-attention-heads 2 --ffn-hidden-size 32 "
            "--normalization RMSNorm --swiglu --disable-bias-linear "
            "--position-embedding-type none --max-position-embeddings 16 --seq-length 16 "
            "--multi-latent-attention --q-lora-rank 16 --kv-lora-rank 8 --qk-head-dim 8 "
            "--qk-pos-emb-head-dim 4 --v-head-dim 8 "
            "--num-experts 8 --moe-ffn-hidden-size 16 --moe-shared-expert-intermediate-size 16 "
            "--moe-router-topk 2 --moe-router-score-function sigmoid "
            "--moe-router-enable-expert-bias --moe-layer-freq [0]*1+[1]*2 "
            "--moe-router-num-groups 4 --moe-router-group-topk 2 "
            "--moe-router-topk-scaling-factor 2.5 "
            "--use-cpu-initialization --hidden-dropout 0 --attention-dropout 0 "
            "--no-gradient-accumulation-fusion").split() + list(extra)


def _gpt_config_from_cli(argv: list[str]):
    from megatron.core.transformer.transformer_config import MLATransformerConfig
    from megatron.training.argument_utils import gpt_config_from_args
    from megatron.training.arguments import (
        add_megatron_arguments,
        core_transformer_config_from_args,
    )

    args = add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False)).parse_args(argv)
    args.padded_vocab_size = 64  # set by Megatron's tokenizer setup
    args.params_dtype = torch.float32  # set by Megatron's validate_args
    transformer = core_transformer_config_from_args(args, MLATransformerConfig)
    return gpt_config_from_args(args, config=transformer)


def test_spec_flag_through_megatrons_argument_parser_builds_our_model(dist_single):
    from megatron.training.models.gpt import GPTModelBuilder

    model_cfg = _gpt_config_from_cli(_megatron_cli())
    assert model_cfg.transformer_layer_spec is decoder_block_spec
    model = GPTModelBuilder(model_cfg).build_model(dist_single)
    assert _mlp_kinds(model.decoder.layers) == ["DenseMLP", "DeepSeekMoE", "DeepSeekMoE"]
    expected = small_config(moe__seq_aux_loss_coeff=0.0)  # no balance-loss flags given
    assert model.decoder.layers[0].self_attention.cfg == expected.mla
    assert model.decoder.layers[2].mlp.cfg == expected.moe


def test_spec_flag_with_the_v3_balance_loss_flags_builds_our_moe_layers(dist_single):
    from megatron.training.models.gpt import GPTModelBuilder

    model_cfg = _gpt_config_from_cli(_megatron_cli(
        "--moe-router-load-balancing-type", "seq_aux_loss", "--moe-aux-loss-coeff", "1e-4"))
    model = GPTModelBuilder(model_cfg).build_model(dist_single)
    assert model.decoder.layers[2].mlp.cfg == small_config().moe  # seq_aux_loss_coeff 1e-4


def test_spec_flag_with_mtp_is_refused_with_a_pointer_to_model_provider(dist_single):
    """Megatron's GPTModelBuilder builds the MTP block from its own layer specs (Megatron's
    MLA/MoE, which need TE), so `--spec` + `--mtp-num-layers` must fail loudly, not build a
    different model."""
    from megatron.training.models.gpt import GPTModelBuilder

    model_cfg = _gpt_config_from_cli(_megatron_cli("--mtp-num-layers", "1"))
    with pytest.raises(ConfigError, match="mtp_num_layers=1.*model_provider"):
        GPTModelBuilder(model_cfg).build_model(dist_single)


# ----------------------------------------------------------------------------------------------
# Pipeline stages: Megatron's offsets decide which layers a stage builds
# ----------------------------------------------------------------------------------------------
_LAYOUTS = {
    # name: (overrides, {(pp_rank, vp_stage): global layer indices of that stage})
    "even": ({}, {(0, None): [0, 1], (1, None): [2, 3]}),
    "first-stage-1": ({"num_layers_in_first_pipeline_stage": 1},
                      {(0, None): [0], (1, None): [1, 2, 3]}),
    "last-stage-1": ({"num_layers_in_last_pipeline_stage": 1},
                     {(0, None): [0, 1, 2], (1, None): [3]}),
    "virtual-2": ({"virtual_pipeline_model_parallel_size": 2},
                  {(0, 0): [0], (1, 0): [1], (0, 1): [2], (1, 1): [3]}),
}


@pytest.mark.parametrize("first_k_dense", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("layout", list(_LAYOUTS))
def test_decoder_block_spec_builds_the_layers_megatrons_offsets_assign_to_a_stage(
        layout, first_k_dense):
    """4 layers over PP=2. Sweeping first_k_dense pins each stage's global layer indices:
    a stage that numbered its layers from 0 would put dense layers in the wrong place."""
    overrides, stages = _LAYOUTS[layout]
    cfg = small_config(num_layers=4, moe__first_k_dense=first_k_dense)
    megatron_cfg = to_megatron_config(cfg, pipeline_parallel_size=2, **overrides)
    for (pp_rank, vp_stage), indices in stages.items():
        spec = decoder_block_spec(megatron_cfg, vp_stage=vp_stage, pp_rank=pp_rank)
        got = [s.submodules.mlp.module for s in spec.layer_specs]
        assert got == [DenseMLP if i < first_k_dense else DeepSeekMoE for i in indices], (
            f"{layout=}, {pp_rank=}, {vp_stage=}, {first_k_dense=}")
        assert spec.layer_norm is RMSNorm


def test_decoder_block_spec_slices_stages_of_a_gpt_model_config_too():
    from megatron.training.models.gpt import GPTModelConfig

    cfg = small_config(num_layers=4, moe__first_k_dense=3, mtp__num_layers=0)  # --spec: no MTP
    megatron_cfg = _without_carried_config(to_megatron_config(cfg, pipeline_parallel_size=2))
    model_cfg = GPTModelConfig(transformer=megatron_cfg, vocab_size=64, seq_length=16)
    stage_1 = decoder_block_spec(model_cfg, pp_rank=1)
    assert [s.submodules.mlp.module for s in stage_1.layer_specs] == [DenseMLP, DeepSeekMoE]


def test_decoder_block_spec_of_our_model_config_builds_every_layer():
    cfg = small_config(num_layers=5, moe__first_k_dense=2)
    spec = decoder_block_spec(cfg)
    kinds = [s.submodules.mlp.module for s in spec.layer_specs]
    assert kinds == [DenseMLP, DenseMLP, DeepSeekMoE, DeepSeekMoE, DeepSeekMoE]
    assert [s.submodules.mlp.module for s in (layer_spec(cfg, 1), layer_spec(cfg, 2))] == [
        DenseMLP, DeepSeekMoE]


# ----------------------------------------------------------------------------------------------
# MTP block spec
# ----------------------------------------------------------------------------------------------
def test_mtp_block_spec_is_none_without_mtp():
    cfg = small_config(mtp__num_layers=0)
    assert mtp_block_spec(cfg) is None
    assert mtp_block_spec(_without_carried_config(to_megatron_config(cfg))) is None


def test_mtp_block_spec_builds_d_independent_mtp_layers_each_with_an_moe_layer(dist_single):
    from megatron.core.transformer.multi_token_prediction import MultiTokenPredictionBlock

    torch.manual_seed(0)
    megatron_cfg = to_megatron_config(small_config(mtp__num_layers=2))
    block = MultiTokenPredictionBlock(config=megatron_cfg, spec=mtp_block_spec(megatron_cfg),
                                      pg_collection=dist_single)
    assert len(block.layers) == 2
    assert all(isinstance(layer, MTPLayer) for layer in block.layers)
    assert [layer.layer_number for layer in block.layers] == [1, 2]
    for layer in block.layers:
        assert isinstance(layer.transformer_layer.self_attention, MultiLatentAttention)
        assert isinstance(layer.transformer_layer.mlp, DeepSeekMoE)
        assert tuple(layer.eh_proj.weight.shape) == (32, 64)  # M_k: [emb ; hidden] 2d -> d
    first, second = (layer.eh_proj.weight for layer in block.layers)
    assert first.data_ptr() != second.data_ptr() and not torch.equal(first, second)


# ----------------------------------------------------------------------------------------------
# model_provider
# ----------------------------------------------------------------------------------------------
def test_model_provider_builds_the_model_a_megatron_config_describes(dist_single):
    cfg = small_config()
    megatron_cfg = to_megatron_config(cfg)
    model = model_provider(config=megatron_cfg, pg_collection=dist_single)
    assert isinstance(model, DeepSeekV3Model)
    assert (model.vocab_size, model.max_sequence_length) == (cfg.vocab_size, cfg.max_seq_len)
    assert _mlp_kinds(model.decoder.layers) == ["DenseMLP", "DeepSeekMoE", "DeepSeekMoE"]
    assert isinstance(model.mtp.layers[0], MTPLayer)
    assert from_megatron_config(model.config) is cfg
    input_ids, labels, position_ids = _tokens(cfg.vocab_size)
    with torch.no_grad():
        out = model(input_ids, position_ids, None, labels=labels)
    assert out.lm_loss.shape == (BATCH, SEQ) and out.mtp_losses.shape == (1, BATCH, SEQ)
    # Per-token cross-entropy of an untrained model sits near ln(V).
    assert abs(out.lm_loss.mean().item() - torch.log(torch.tensor(64.0)).item()) < 0.5


def test_model_provider_without_post_process_builds_no_output_layer(dist_single):
    model = model_provider(post_process=False, config=to_megatron_config(small_config()),
                           pg_collection=dist_single)
    assert not hasattr(model, "output_layer")


def test_model_provider_with_a_plain_megatron_config_uses_megatrons_vocab_size(
        dist_single, monkeypatch):
    from megatron.training import global_vars

    monkeypatch.setattr(global_vars, "_GLOBAL_ARGS",
                        argparse.Namespace(padded_vocab_size=64, max_position_embeddings=16))
    megatron_cfg = _without_carried_config(to_megatron_config(small_config()))
    try:
        model = model_provider(config=megatron_cfg, pg_collection=dist_single)
    except ConfigError as error:
        assert "vocab_size" in str(error)
    else:
        assert model.vocab_size == 64
