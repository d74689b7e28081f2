"""The model on new tokens only, its MLA layers reading and filling the latent cache.

Each decoder layer runs as Megatron's TransformerLayer runs it, from the layer's own modules:
input_layernorm -> MLA against the cache (inference/attention.py) -> self_attn_bda (the
residual add) -> pre_mlp_layernorm -> the layer's mlp (DeepSeekMoE with the training router,
dispatcher and experts, or the dense SwiGLU) -> mlp_bda. Then the decoder's final norm and the
output layer. Only the attention is ours; everything else is the trained module called on the
new tokens [s, b]. The model must be in eval mode (the router counts expert loads for the bias
update only in training), one process, TP = 1, and the whole model (no pipeline stage).
MTP layers are not run here: inference/speculative.py runs the first one (with a latent cache
of its own, through `layer_step`) to draft tokens from `forward_hidden`'s last hidden state.
"""

from __future__ import annotations

import torch

from ..attention.mla import MultiLatentAttention
from ..megatron_compat import layer_post_mlp, layer_pre_mlp_norm
from ..model import DeepSeekV3Model
from .attention import mla_attention
from .cache import LatentKVCache


def check_model(model: DeepSeekV3Model) -> None:
    """What cached inference needs of a model; ValueError naming the fix otherwise."""
    if not isinstance(model, DeepSeekV3Model):
        raise ValueError(f"model is a {type(model).__name__}: pass the DeepSeekV3Model built by "
                         "megatron_dsv3.model.build_model")
    if not (model.pre_process and model.post_process):
        raise ValueError("model is one pipeline stage: build the whole model "
                         "(build_model with pre_process=True, post_process=True, PP=1)")
    if model.pg_collection.tp.size() != 1:
        raise ValueError(f"model is split over {model.pg_collection.tp.size()} tensor-parallel "
                         "ranks: cached inference runs at TP=1 (init_distributed("
                         "tensor_parallel_size=1))")
    if model.training:
        raise ValueError("model is in training mode: call model.eval() first (the router "
                         "counts expert loads in training mode)")
    for layer in model.decoder.layers:
        if not isinstance(layer.self_attention, MultiLatentAttention):
            raise ValueError(f"decoder layer {layer.layer_number}'s self_attention is a "
                             f"{type(layer.self_attention).__name__}: cached inference reads "
                             "MultiLatentAttention's weights (build with megatron_dsv3.specs)")


def on_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor (positions, a mask: a few bytes a step) on `device` without waiting for
    the GPU: a copy from pageable memory first waits for everything queued on the stream (one
    host sync per copy, several per decode step otherwise), one from pinned memory is queued
    behind it. On the CPU, or already there: `tensor.to(device)`."""
    device = torch.device(device)
    if device.type != "cuda" or tensor.device.type == "cuda":
        return tensor.to(device)
    return tensor.contiguous().pin_memory().to(device, non_blocking=True)


def new_cache(model: DeepSeekV3Model, batch_size: int, capacity: int) -> LatentKVCache:
    """An empty latent cache for the model's decoder layers, in its parameters' dtype and
    device."""
    weight = model.embedding.word_embeddings.weight
    return LatentKVCache(model.config.dsv3.mla, len(model.decoder.layers), batch_size, capacity,
                         dtype=weight.dtype, device=weight.device)


@torch.no_grad()
def forward_hidden(model: DeepSeekV3Model, cache: LatentKVCache, tokens_BS: torch.Tensor,
                   positions_BS: torch.Tensor, attention: str = "absorbed") -> torch.Tensor:
    """New tokens [b, s] at positions [b, s] -> the decoder's output after its final norm
    [s, b, d] (what the output layer and the first MTP layer read). Writes the tokens'
    latents into `cache` at their positions and leaves cache.lengths_B to the caller."""
    length = int(positions_BS.max()) + 1
    cache.check_capacity(length - 1)
    positions_BS = on_device(positions_BS, cache.latent_LBTC.device)
    h_SBD = model.embedding(input_ids=tokens_BS, position_ids=None)  # [s, b, d]
    for index, layer in enumerate(model.decoder.layers):
        h_SBD = layer_step(layer, h_SBD, cache, index, positions_BS, length, attention)
    return model.decoder.final_layernorm(h_SBD)


@torch.no_grad()
def forward_cached(model: DeepSeekV3Model, cache: LatentKVCache, tokens_BS: torch.Tensor,
                   positions_BS: torch.Tensor, attention: str = "absorbed") -> torch.Tensor:
    """New tokens [b, s] at positions [b, s] -> logits [b, s, V] (in the output layer's
    dtype). Writes the tokens' latents into `cache` at their positions and leaves
    cache.lengths_B to the caller (`prefill`, `decode_step`)."""
    logits_SBV, _ = model.output_layer(
        forward_hidden(model, cache, tokens_BS, positions_BS, attention))
    return logits_SBV.transpose(0, 1)


def layer_step(layer, h_SBD: torch.Tensor, cache: LatentKVCache, index: int,
               positions_BS: torch.Tensor, length: int, attention: str) -> torch.Tensor:
    """One TransformerLayer on the new tokens [s, b, d], its attention against layer `index`
    of `cache` (positions_BS [b, s] on the cache's device, length = max(positions) + 1)."""
    residual = h_SBD.float() if layer.config.fp32_residual_connection else h_SBD
    attn_out = mla_attention(layer.self_attention, layer.input_layernorm(h_SBD), cache, index,
                             positions_BS, length, attention)
    h_SBD = layer.self_attn_bda(False, layer.config.bias_dropout_fusion)(
        (attn_out, None), residual, layer.hidden_dropout)
    mlp_out, _ = layer.mlp(layer_pre_mlp_norm(layer, h_SBD))
    return layer_post_mlp(layer, mlp_out, h_SBD)


def right_padded(prompts: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts (1-d id tensors) right-padded with `pad_id` to the longest, on the host: the
    tokens [B, s_max] and their positions 0.. [B, s_max], what a prefill feeds."""
    tokens_BS = torch.full((len(prompts), max(len(p) for p in prompts)), pad_id,
                           dtype=torch.long)
    for row, prompt in enumerate(prompts):
        tokens_BS[row, :len(prompt)] = prompt
    return tokens_BS, torch.arange(tokens_BS.shape[1]).expand(tokens_BS.shape)


@torch.no_grad()
def prefill(model: DeepSeekV3Model, cache: LatentKVCache, prompts: list[torch.Tensor],
            attention: str = "absorbed", pad_id: int = 0) -> torch.Tensor:
    """Every prompt in one forward: prompts (B 1-d id tensors, lengths >= 1) right-padded with
    `pad_id` to the longest, at positions 0.. -> logits [B, s_max, V]; request b's next-token
    logits are at [b, len_b - 1], the pad positions' are meaningless. Sets the cache's
    lengths to the prompt lengths."""
    if len(prompts) != cache.batch_size:
        raise ValueError(f"prefill: {len(prompts)} prompts for a cache of batch_size="
                         f"{cache.batch_size}: allocate the cache for the batch")
    if int(cache.lengths_B.max()) > 0:
        raise ValueError("prefill: the cache already holds tokens; prefill fills a fresh "
                         "cache (new_cache), decode_step extends it")
    tokens_BS, positions_BS = right_padded(prompts, pad_id)
    logits_BSV = forward_cached(model, cache, tokens_BS.to(cache.latent_LBTC.device),
                                positions_BS, attention)
    cache.lengths_B = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    return logits_BSV


@torch.no_grad()
def decode_step(model: DeepSeekV3Model, cache: LatentKVCache, tokens_B: torch.Tensor,
                attention: str = "absorbed") -> torch.Tensor:
    """One new token per request [B], each at its request's next position (its cached
    length) -> next-token logits [B, V]; each length grows by one."""
    positions_BS = cache.lengths_B.unsqueeze(1)  # on the host: forward_cached moves it
    logits_BSV = forward_cached(model, cache, tokens_B.view(-1, 1), positions_BS, attention)
    cache.lengths_B = cache.lengths_B + 1
    return logits_BSV[:, 0]
