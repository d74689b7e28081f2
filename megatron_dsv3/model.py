"""The DeepSeek-V3 model: Megatron-Core's GPTModel built from our specs.

`DeepSeekV3Model` is Megatron's `GPTModel` (embedding, TransformerBlock, MTP block, output
layer, vocab-parallel cross-entropy) with two changes: with labels it returns the main and the
per-depth MTP cross-entropies separately (`LMOutput`) instead of folding MTP into the backward
with a constant weight, so the training step applies the lambda schedule and reports both; and
with the vocabulary on one rank on a GPU its cross-entropy is ours (kernels/cross_entropy.py).
Without labels it returns the main logits [b, s, V] (vocab-parallel unless gathered).

`build_model(cfg, ...)` builds one pipeline stage; `model_provider` is the same thing with the
signature Megatron's `pretrain()` calls.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from megatron.core.process_groups_config import ProcessGroupCollection

from .config import DEFAULT_FP8_LAYERS, ModelConfig, resolved_linear_backend, to_megatron_config
from .kernels import cross_entropy as fused_ce
from .megatron_compat import GPTPostprocessHook
from .mtp import mtp_targets
from .specs import decoder_block_spec, mtp_block_spec


@dataclass
class LMOutput:
    """Per-token losses of one micro-batch.

    lm_loss:     [b, s] cross-entropy of the next token
    mtp_losses:  [D, b, s] cross-entropy of depth k's target t_{i+k+1}, or None without MTP
    mtp_valid:   [D, b, s] bool, positions whose depth-k target exists (and is not masked)
    """

    lm_loss: torch.Tensor
    mtp_losses: Optional[torch.Tensor] = None
    mtp_valid: Optional[torch.Tensor] = None


class DeepSeekV3Model(GPTPostprocessHook):
    """GPTModel whose post-processing reports MTP losses instead of hiding them."""

    def postprocess(self, hidden_states, *, input_ids, position_ids, labels, loss_mask=None,
                    attention_mask=None, run_mtp: bool = True, runtime_gather_output=None):
        """After the decoder's final norm: the MTP block (run_mtp), the output head and, with
        labels, the per-token cross-entropies (LMOutput); without labels the main logits."""
        if run_mtp:
            hidden_states = self.mtp(input_ids=input_ids, position_ids=position_ids,
                                     hidden_states=hidden_states, attention_mask=attention_mask,
                                     embedding=self.embedding)
        if not self.post_process:
            return hidden_states

        depth = self.config.mtp_num_layers or 0
        chunks = hidden_states.chunk(1 + depth, dim=0) if depth else (hidden_states,)
        output_weight = (self.shared_embedding_or_output_weight()
                         if self.share_embeddings_and_output_weights else None)

        def logits_of(h):
            logits, _ = self.output_layer(h, weight=output_weight,
                                          runtime_gather_output=runtime_gather_output)
            return logits  # [s, b, V/tp]

        main_logits = logits_of(chunks[0])
        if labels is None:
            return main_logits.transpose(0, 1).contiguous()  # [b, s, V/tp]

        lm_loss = self.compute_language_model_loss(labels, main_logits)
        if depth == 0:
            return LMOutput(lm_loss)
        losses, valids = [], []
        for k in range(1, depth + 1):
            targets, valid = mtp_targets(labels, k)
            if loss_mask is not None:
                valid = valid & mtp_targets(loss_mask.bool(), k)[0]
            losses.append(self.compute_language_model_loss(targets, logits_of(chunks[k])))
            valids.append(valid)
        return LMOutput(lm_loss, torch.stack(losses), torch.stack(valids))

    def compute_language_model_loss(self, labels: torch.Tensor,
                                    logits: torch.Tensor) -> torch.Tensor:
        """Per-token cross-entropy [b, s] of logits [s, b, V]: with the whole vocabulary on this
        rank (no tensor parallelism) on a GPU, our two-pass kernels (kernels/cross_entropy.py:
        the same fp32 loss with a fifth of the memory traffic and no fp32 softmax kept);
        otherwise Megatron's."""
        if self.pg_collection.tp.size() == 1 and fused_ce.uses_kernel(logits):
            return fused_ce.cross_entropy(logits, labels.t()).t().contiguous()
        return super().compute_language_model_loss(labels, logits)


def build_model(cfg: ModelConfig, *, pg_collection: Optional[ProcessGroupCollection] = None,
                megatron_config=None, pre_process: bool = True, post_process: bool = True,
                vp_stage: Optional[int] = None) -> DeepSeekV3Model:
    """One pipeline stage of the model (the whole model by default).

    `megatron_config` defaults to `to_megatron_config(cfg)` with the TP, PP and EP sizes of
    `pg_collection`; `pg_collection` defaults to Megatron's global process groups. With
    cfg.fp8 == "deepseek" the precision map's linears run in FP8 (mark_fp8_linears).
    """
    if pg_collection is None:
        pg_collection = ProcessGroupCollection.use_mpu_process_groups()
    if megatron_config is None:
        megatron_config = to_megatron_config(cfg, tensor_parallel_size=pg_collection.tp.size(),
                                             pipeline_parallel_size=pg_collection.pp.size(),
                                             expert_parallel_size=pg_collection.ep.size())
    model = DeepSeekV3Model(
        config=megatron_config,
        transformer_layer_spec=decoder_block_spec(megatron_config, vp_stage=vp_stage),
        vocab_size=cfg.vocab_size,
        max_sequence_length=cfg.max_seq_len,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=False,
        position_embedding_type="none",
        mtp_block_spec=mtp_block_spec(megatron_config, vp_stage=vp_stage),
        pg_collection=pg_collection,
        vp_stage=vp_stage,
    )
    if cfg.fp8 == "deepseek":
        mark_fp8_linears(model, linears=resolved_linear_backend(cfg.linear_backend) == "local",
                         parts=cfg.fp8_layers)
    return model


def model_provider(pre_process: bool = True, post_process: bool = True,
                   vp_stage: Optional[int] = None, config=None, pg_collection=None,
                   fp8: Optional[str] = None, fp8_layers: Optional[Sequence[str]] = None,
                   **unused) -> DeepSeekV3Model:
    """`megatron.training.pretrain`'s model provider for this model.

    The model config comes from Megatron's parsed arguments (`--multi-latent-attention
    --q-lora-rank ... --num-experts ... --moe-router-score-function sigmoid ...`) through
    `from_megatron_config`; pass `config` to override with a Megatron TransformerConfig.
    `fp8`, `fp8_layers`: ModelConfig.fp8 and fp8_layers for the model ("deepseek": those
    parts of the precision map in FP8).
    """
    from .config import ConfigError, from_megatron_config

    if config is None:
        from megatron.core.transformer.transformer_config import MLATransformerConfig
        from megatron.training.arguments import core_transformer_config_from_args

        config = core_transformer_config_from_args(_megatron_args(), MLATransformerConfig)
    if isinstance(getattr(config, "dsv3", None), ModelConfig):
        cfg = config.dsv3
    else:
        args = _megatron_args()
        vocab_size = getattr(args, "padded_vocab_size", None)
        if not vocab_size:
            raise ConfigError("vocab_size=None is invalid: model_provider takes it from "
                              "Megatron's parsed arguments (args.padded_vocab_size); build the "
                              "config with megatron_dsv3.config.to_megatron_config(cfg) or "
                              "initialise Megatron's arguments first")
        cfg = from_megatron_config(config, vocab_size=vocab_size,
                                   max_seq_len=getattr(args, "max_position_embeddings", None))
    if fp8 is not None:
        cfg = cfg.replace(fp8=fp8)
    if fp8_layers is not None:
        cfg = cfg.replace(fp8_layers=tuple(fp8_layers))
    config.dsv3 = cfg
    return build_model(cfg, pg_collection=pg_collection, megatron_config=config,
                       pre_process=pre_process, post_process=post_process, vp_stage=vp_stage)


def _megatron_args():
    from megatron.training import get_args

    try:
        return get_args()
    except AssertionError:  # Megatron's arguments were never parsed
        return None


def mark_fp8_linears(model: torch.nn.Module, linears: bool = True,
                     parts: Sequence[str] = DEFAULT_FP8_LAYERS) -> int:
    """Put the `parts` (ModelConfig.fp8_layers) of DeepSeek-V3's FP8 precision map in FP8:
    "attention" the MLA projections but the KV down- and output projections, "dense_ffn" and
    "shared_experts" their linears (ModelConfig.fp8_linear_widths lists the widths),
    "routed_experts" the experts' forward and input-gradient grouped GEMMs
    ("routed_experts_wgrad" their weight-gradient GEMMs as well), "dispatch"
    the dispatch all-to-all of every expert-parallel MoE layer (its rows sent in FP8 with their
    scales, moe/dispatcher.py); returns how many linears. `linears=False` (the TE backend,
    whose linears run TE's blockwise recipe under Megatron's FP8 context,
    config.to_megatron_config): the routed experts and the dispatch only (ours either way)."""
    from .attention.mla import MultiLatentAttention
    from .config import ConfigError
    from .fp8 import ops as fp8_ops
    from .fp8.linear import weight_blocks
    from .fp8.weight_cache import keep_static_blocks
    from .moe.dispatcher import AllToAllDispatcher
    from .moe.experts import RoutedExperts, SwiGLUMLP

    shared = {id(m.shared_experts) for m in model.modules()
              if isinstance(getattr(m, "shared_experts", None), SwiGLUMLP)}
    chosen = []
    for module in model.modules():
        if isinstance(getattr(module, "dispatcher", None), AllToAllDispatcher):
            module.dispatcher.fp8 = "dispatch" in parts
        if isinstance(module, RoutedExperts) and "routed_experts" in parts:
            for weight in (module.fc1, module.fc2):  # this rank's [E, rows, cols] shards
                check_fp8_shard(weight[0], "RoutedExperts")
            module.fp8 = True
            module.fp8_wgrad = "routed_experts_wgrad" in parts
            for name in ("fc1", "fc2"):  # as the linears' below
                keep_static_blocks(module, name, f"{name}_blocks", fp8_ops.grouped_weight,
                                   fp8_ops.grouped_transposed)
        if isinstance(module, MultiLatentAttention) and "attention" in parts:
            chosen += [getattr(module, name, None) for name in
                       ("linear_q_down", "linear_q_up", "linear_q", "linear_kv_up")]
        elif isinstance(module, SwiGLUMLP) and (
                "shared_experts" if id(module) in shared else "dense_ffn") in parts:
            chosen += [module.linear_fc1, module.linear_fc2]
    chosen = [layer for layer in chosen if layer is not None] if linears else []
    for layer in chosen:
        if not hasattr(type(layer), "fp8"):
            raise ConfigError(f"fp8='deepseek': {type(layer).__name__} has no FP8 path (the "
                              "local backend's linears have): use linear_backend='local'")
        check_fp8_shard(layer.weight, type(layer).__name__)
        layer.fp8 = True
        # W's and W^T's FP8 blocks, refreshed once per training step (fp8/weight_cache.py)
        keep_static_blocks(layer, "weight", "fp8_blocks", weight_blocks, fp8_ops.transposed)
    return len(chosen)


def check_fp8_shard(weight: torch.Tensor, layer: str) -> None:
    """The weight shard a rank holds must be whole 128 x 128 blocks: the config checks the full
    widths (ModelConfig.fp8_linear_widths); tensor parallelism divides them further."""
    from .config import ConfigError

    rows, cols = weight.shape
    if rows % 128 or cols % 128:
        raise ConfigError(
            f"fp8='deepseek': a {layer} holds a {rows} x {cols} shard of its weight on this "
            "rank, and FP8 needs both sides a multiple of 128 (its 128 x 128 blocks); tensor "
            "parallelism divides the widths: use a smaller --tensor-parallel-size, wider "
            "layers, or fp8='none'")


def resolve_compile(scope: str, mode: str, *, on_cuda: bool, parallel: bool) -> tuple[str, str]:
    """A --compile scope and --compile-mode with 'auto' resolved, as the training job and
    Megatron's loop (pretrain) take them: our modules on cuda, nothing elsewhere (CPU tests
    and runs stay eager); reduce-overhead (CUDA graphs) on cuda without tensor, expert or
    pipeline parallelism (whose collectives and micro-batches in flight CUDA graphs do not
    take here), default otherwise."""
    if scope == "auto":
        scope = "modules" if on_cuda else "none"
    if mode == "auto":
        mode = "reduce-overhead" if on_cuda and not parallel else "default"
    return scope, mode


def compile_model(model: torch.nn.Module, scope: str = "layers", **compile_kwargs) -> int:
    """torch.compile, in place, each transformer layer (scope="layers", decoder and MTP) or
    each of our attention / FFN modules (scope="modules"). Fuses the elementwise work around
    the GEMMs and removes most per-op launch overhead; the GEMMs, attention and grouped GEMMs
    stay library calls. With "layers" each layer is one graph (one CUDA graph with
    reduce-overhead) holding its norms and residual adds too: Megatron's TransformerLayer
    traces without a break (tests/test_compile_graphs.py); the MTP layer's norms and
    projection, the embedding, the final norm and the output layer stay eager. The F&B
    overlap's pieces (moe/pieces.py) call a layer's parts, not its compiled forward: with it,
    use "modules". For GPU runs: CPU tests and the CPU job run eager. Returns the number of
    modules compiled."""
    from megatron.core.transformer.transformer_layer import TransformerLayer

    from .attention.mla import MultiLatentAttention
    from .moe.layer import DeepSeekMoE, DenseMLP

    kinds = {"layers": (TransformerLayer,),
             "modules": (MultiLatentAttention, DeepSeekMoE, DenseMLP)}
    if scope not in kinds:
        raise ValueError(f"scope={scope!r} is invalid: choose 'layers' or 'modules'")
    targets = [m for m in model.modules() if isinstance(m, kinds[scope])]
    for module in targets:
        module.compile(**compile_kwargs)
    return len(targets)
