"""ModuleSpecs that plug our modules into Megatron-Core's builder.

  layer_spec(cfg, layer_index)   one TransformerLayer: RMSNorm -> MLA -> RMSNorm -> FFN/MoE
  decoder_block_spec(config, vp_stage=None, pp_rank=None)
                                 the decoder layers of one pipeline stage (dense first, MoE
                                 after) + final norm; usable as Megatron's
                                 `--spec megatron_dsv3.specs decoder_block_spec`
  mtp_block_spec(config, vp_stage=None)
                                 Megatron's MultiTokenPredictionBlock made of our MTPLayers

`config` may be our ModelConfig or a Megatron (MLA)TransformerConfig / GPTModelConfig; the
implementation of every linear and norm comes from `layers.get_backend` (one switch).
"""

from __future__ import annotations

from typing import Optional

from megatron.core.transformer.multi_token_prediction import MultiTokenPredictionBlockSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
    get_transformer_layer_offset,
)

from .attention.mla import MLASubmodules, MultiLatentAttention
from .config import ConfigError, ModelConfig, from_megatron_config
from .layers import LinearBackend, get_backend
from .moe.layer import DeepSeekMoE, DenseMLP
from .mtp import MTPLayer, MTPSubmodules


def _model_config(config) -> ModelConfig:
    if isinstance(config, ModelConfig):
        return config
    transformer = getattr(config, "transformer", config)  # GPTModelConfig wraps one
    return from_megatron_config(transformer)


def layer_spec(cfg: ModelConfig, layer_index: int, backend: Optional[LinearBackend] = None
               ) -> ModuleSpec:
    """Spec of decoder layer `layer_index` (0-based): dense FFN for the first k layers."""
    backend = backend or get_backend(cfg.linear_backend)
    mlp = DeepSeekMoE if cfg.is_moe_layer(layer_index) else DenseMLP
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=backend.norm,
            self_attention=ModuleSpec(module=MultiLatentAttention,
                                      submodules=MLASubmodules(backend=backend)),
            self_attn_bda=_bias_dropout_add(),
            pre_mlp_layernorm=backend.norm,
            mlp=ModuleSpec(module=mlp),
            mlp_bda=_bias_dropout_add(),
        ),
    )


def _bias_dropout_add():
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add

    return get_bias_dropout_add


def decoder_block_spec(config, vp_stage: Optional[int] = None,
                       pp_rank: Optional[int] = None) -> TransformerBlockSubmodules:
    """Decoder layers of this pipeline stage and the final norm.

    With a Megatron config the stage's slice follows Megatron's own layer offsets; with our
    ModelConfig (no pipeline split) all layers are built.
    """
    cfg = _model_config(config)
    if hasattr(config, "transformer") and config.transformer.mtp_num_layers:
        raise ConfigError(
            f"mtp_num_layers={config.transformer.mtp_num_layers} is invalid with --spec: "
            "Megatron's GPTModelBuilder builds the MTP block from its own layer specs, not "
            "ours; build the model with megatron_dsv3.model.model_provider (our MTP spec), or "
            "pass --mtp-num-layers 0")
    backend = get_backend(cfg.linear_backend)
    specs = [layer_spec(cfg, i, backend) for i in range(cfg.num_layers)]
    transformer = getattr(config, "transformer", config)
    if not isinstance(config, ModelConfig) and transformer.pipeline_model_parallel_size > 1:
        count = get_num_layers_to_build(transformer, vp_stage=vp_stage, pp_rank=pp_rank)
        offset = get_transformer_layer_offset(transformer, vp_stage=vp_stage, pp_rank=pp_rank)
        specs = specs[offset:offset + count]
    return TransformerBlockSubmodules(layer_specs=specs, layer_norm=backend.norm)


def mtp_block_spec(config, vp_stage: Optional[int] = None) -> Optional[ModuleSpec]:
    """Megatron's MTP block built from our MTP layers (None when MTP is off)."""
    cfg = _model_config(config)
    if cfg.mtp.num_layers == 0:
        return None
    backend = get_backend(cfg.linear_backend)
    inner = layer_spec(cfg, cfg.num_layers, backend)  # MTP layers are MoE layers
    mtp_layer = ModuleSpec(module=MTPLayer,
                           submodules=MTPSubmodules(backend=backend, transformer_layer=inner))
    return MultiTokenPredictionBlockSubmodules(layer_specs=[mtp_layer] * cfg.mtp.num_layers)


__all__ = ["layer_spec", "decoder_block_spec", "mtp_block_spec"]
