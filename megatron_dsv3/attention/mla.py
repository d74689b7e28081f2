"""Multi-head latent attention (docs/architecture.md 3.1), the training path.

Plugged into Megatron's `TransformerLayer` as `self_attention` through a ModuleSpec (see
`megatron_dsv3.specs`). Replaces Megatron's own MLA, whose local spec cannot build without
Transformer Engine (`DotProductAttention` takes no `k_channels`), and which assumes CUDA.

Shape legend: s sequence, b micro-batch, d hidden, h heads on this TP rank,
  c kv_lora_rank, c' q_lora_rank, n qk_nope_head_dim, r qk_rope_head_dim, v v_head_dim.

  q:  c'_q = RMSNorm(W^DQ x)          [s, b, c']  (replicated over TP)
      q    = W^UQ c'_q                [s, b, h, n + r]   (column-parallel: heads split)
  kv: [c_kv ; k_r] = W^DKV x          [s, b, c + r]      (replicated)
      [k_n ; v] = W^UKV RMSNorm(c_kv) [s, b, h, n + v]   (column-parallel)
  rope on q[..., n:] and on the shared k_r (one per token, broadcast over heads)
  o = softmax(q k^T / sqrt(n + r) * mscale^2, causal) v, then W^O (row-parallel).

Tensor parallelism: heads are split; the down-projections and their norms are replicated.
Their output gradients are summed over TP by the up-projections (Megatron's column-parallel
backward all-reduce) and, for the shared rope key, by `copy_to_tp`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..config import ModelConfig, from_megatron_config
from ..layers import (
    LinearBackend,
    copy_to_tp,
    get_backend,
    normal_init,
    tp_group_of,
    tp_size,
)
from ..sharded_checkpoint import ShardedCheckpointable
from .core import cudnn_attention_takes_unequal_widths, pick_attention_core
from .rope import RotaryEmbedding, apply_rope


@dataclass
class MLASubmodules:
    """Which layer implementations MLA is built from (filled by the spec)."""

    backend: LinearBackend


# DeepSeek's reference code (and Hugging Face) build the two latent norms with RMSNorm's
# default eps whatever the model's norm_eps is; so do we, so that checkpoints compute the same.
LATENT_NORM_EPS = 1e-6


class MultiLatentAttention(ShardedCheckpointable, torch.nn.Module):
    """MLA self-attention with Megatron's attention-module call signature."""

    def __init__(self, config, submodules: Optional[MLASubmodules] = None, layer_number: int = 1,
                 pg_collection=None, name: Optional[str] = None, **unused):
        super().__init__()
        cfg: ModelConfig = from_megatron_config(config)
        backend = submodules.backend if submodules is not None else get_backend(
            cfg.linear_backend)
        self.cfg = cfg.mla
        self.layer_number = layer_number
        self.tp_group = tp_group_of(pg_collection)
        tp = tp_size(self.tp_group)
        mla, d = cfg.mla, cfg.hidden_size
        self.num_local_heads = mla.num_heads // tp
        init = normal_init(cfg.init_std)
        common = dict(config=config, init_method=init, tp_group=self.tp_group)

        if mla.q_lora_rank > 0:
            self.linear_q_down = backend.replicated(d, mla.q_lora_rank, **common)
            self.q_norm = backend.norm(config=config, hidden_size=mla.q_lora_rank,
                                       eps=LATENT_NORM_EPS)
            self.linear_q_up = backend.column(mla.q_lora_rank, mla.num_heads * mla.qk_head_dim,
                                              **common)
        else:
            self.linear_q = backend.column(d, mla.num_heads * mla.qk_head_dim, **common)
        self.linear_kv_down = backend.replicated(d, mla.kv_lora_rank + mla.qk_rope_head_dim,
                                                 **common)
        self.kv_norm = backend.norm(config=config, hidden_size=mla.kv_lora_rank,
                                    eps=LATENT_NORM_EPS)
        self.linear_kv_up = backend.column(
            mla.kv_lora_rank, mla.num_heads * (mla.qk_nope_head_dim + mla.v_head_dim), **common)
        self.linear_proj = backend.row(mla.num_heads * mla.v_head_dim, d, **common)
        self.rotary = RotaryEmbedding(mla.qk_rope_head_dim, mla.rope_theta, mla.yarn)
        # Decided once, outside any compiled region: pad v for flash unless cuDNN takes it.
        self.sdpa_pad_value = not cudnn_attention_takes_unequal_widths()

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, inference_context=None,
                packed_seq_params=None, **unused):
        """hidden_states [s, b, d] -> ([s, b, d], None). Causal; `attention_mask` is ignored
        (DeepSeek pre-training attends causally over the whole sequence)."""
        if inference_context is not None:
            raise NotImplementedError(
                "MultiLatentAttention: the training module takes no inference_context; "
                "decode with the latent KV cache through megatron_dsv3.inference (generate, "
                "or prefill and decode_step), or call the model without inference_context")
        if packed_seq_params is not None:
            raise NotImplementedError(
                "MultiLatentAttention: packed sequences (THD) are not supported; pass "
                "[s, b] batches with packed_seq_params=None")
        query, key, value = self.qkv(hidden_states)
        core = pick_attention_core(self.cfg.attention_impl, hidden_states.device,
                                   pad_value=self.sdpa_pad_value)
        context = core(query, key, value, self.cfg.softmax_scale)  # [b, h, s, v]
        s, b = hidden_states.shape[:2]
        context = context.permute(2, 0, 1, 3).reshape(s, b, -1)  # [s, b, h*v]
        return self.linear_proj(context)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x [s, b, d] -> the query's no-rope and rope parts [s, b, h, n] and [s, b, h, r], the
        KV latent before its norm [s, b, c] and the shared rope key [s, b, r], no rope applied
        (what training and the latent-cache decode, inference/attention.py, both start from)."""
        mla, h = self.cfg, self.num_local_heads
        s, b = x.shape[:2]
        if mla.q_lora_rank > 0:
            q_latent, _ = self.linear_q_down(x)
            q, _ = self.linear_q_up(self.q_norm(q_latent))
        else:
            q, _ = self.linear_q(x)
        q = q.view(s, b, h, mla.qk_head_dim)
        q_nope, q_rope = q.split([mla.qk_nope_head_dim, mla.qk_rope_head_dim], dim=-1)
        kv_down, _ = self.linear_kv_down(x)  # [s, b, c + r]
        kv_latent, k_rope = kv_down.split([mla.kv_lora_rank, mla.qk_rope_head_dim], dim=-1)
        return q_nope, q_rope, kv_latent, k_rope

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [s, b, d] -> q, k [b, h, s, n + r] and v [b, h, s, v], rope applied."""
        mla, h = self.cfg, self.num_local_heads
        s, b = x.shape[:2]
        q_nope, q_rope, kv_latent, k_rope = self.project(x)
        kv, _ = self.linear_kv_up(self.kv_norm(kv_latent))
        kv = kv.view(s, b, h, mla.qk_nope_head_dim + mla.v_head_dim)
        k_nope, value = kv.split([mla.qk_nope_head_dim, mla.v_head_dim], dim=-1)

        cos, sin = self.rotary.cos_sin(s, x.device)
        q_rope = apply_rope(q_rope, cos, sin)                                   # [s, b, h, r]
        k_rope = apply_rope(copy_to_tp(k_rope, self.tp_group), cos, sin)        # [s, b, r]
        k_rope = k_rope.unsqueeze(2).expand(s, b, h, mla.qk_rope_head_dim)

        query = torch.cat([q_nope, q_rope], dim=-1).permute(1, 2, 0, 3)       # [b, h, s, n+r]
        key = torch.cat([k_nope, k_rope], dim=-1).permute(1, 2, 0, 3)
        value = value.permute(1, 2, 0, 3)                                       # [b, h, s, v]
        return query, key, value
