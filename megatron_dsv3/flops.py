"""Model FLOPs of a training step, counted the way the peers' benchmarks count them.

Per token, forward:
  matmuls     2 * (active matmul parameters): every MLA projection (q down/up or q, kv down/up,
              output), the dense FFNs, per MoE layer the router, the top-k routed experts and the
              shared experts (3 matrices of d x F each), the output head (not the embedding
              lookup); MTP modules add their eh_proj, one MoE transformer layer and the head.
  attention   2 * heads * (d_qk + d_v) * (s + 1) / 2 per layer: q.k and p.v over the causal
              half of the sequence (s + 1)/2 keys on average.
Forward + backward = 3 x forward (backward computes input and weight gradients).
For the `proxy` preset without MTP: 742M active matmul parameters and 4.95 GFLOP per token.
"""

from __future__ import annotations

from .config import ModelConfig


def mla_matmul_params(cfg: ModelConfig) -> int:
    mla, d = cfg.mla, cfg.hidden_size
    heads = mla.num_heads
    if mla.q_lora_rank > 0:
        q = d * mla.q_lora_rank + mla.q_lora_rank * heads * mla.qk_head_dim
    else:
        q = d * heads * mla.qk_head_dim
    kv = d * (mla.kv_lora_rank + mla.qk_rope_head_dim) + \
        mla.kv_lora_rank * heads * (mla.qk_nope_head_dim + mla.v_head_dim)
    out = heads * mla.v_head_dim * d
    return q + kv + out


def moe_active_matmul_params(cfg: ModelConfig) -> int:
    moe, d = cfg.moe, cfg.hidden_size
    router = d * moe.num_experts
    experts = (moe.top_k + moe.num_shared_experts) * 3 * d * moe.expert_ffn_size
    return router + experts


def active_matmul_params(cfg: ModelConfig, *, include_mtp: bool = True) -> int:
    """Matmul parameters one token passes through (forward)."""
    d = cfg.hidden_size
    dense = cfg.moe.first_k_dense
    total = cfg.num_layers * mla_matmul_params(cfg)
    total += dense * 3 * d * cfg.moe.dense_ffn_size
    total += (cfg.num_layers - dense) * moe_active_matmul_params(cfg)
    total += d * cfg.vocab_size  # output head
    if include_mtp:
        per_depth = 2 * d * d + mla_matmul_params(cfg) + moe_active_matmul_params(cfg) + \
            d * cfg.vocab_size
        total += cfg.mtp.num_layers * per_depth
    return total


def attention_flops_per_token(cfg: ModelConfig, seq_len: int, *, include_mtp: bool = True
                              ) -> float:
    """Forward q.k and p.v FLOPs per token, causal."""
    mla = cfg.mla
    layers = cfg.num_layers + (cfg.mtp.num_layers if include_mtp else 0)
    return layers * 2 * mla.num_heads * (mla.qk_head_dim + mla.v_head_dim) * (seq_len + 1) / 2


def training_flops_per_token(cfg: ModelConfig, seq_len: int, *, include_mtp: bool = True
                             ) -> float:
    """Forward + backward model FLOPs per token (3 x forward)."""
    forward = 2 * active_matmul_params(cfg, include_mtp=include_mtp) + \
        attention_flops_per_token(cfg, seq_len, include_mtp=include_mtp)
    return 3 * forward
