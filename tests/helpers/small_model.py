"""The small DeepSeek-V3 config the model-level CPU tests build: `tiny`, shrunk to 3 layers
(1 dense + 2 MoE), d=32, 8 experts in 4 groups, vocab 64, one MTP depth."""

from __future__ import annotations

from megatron_dsv3.config import tiny

HIDDEN, VOCAB = 32, 64


def small_config(**changes):
    fields = dict(hidden_size=HIDDEN, vocab_size=VOCAB, num_layers=3, max_seq_len=16,
                  mla__num_heads=2, mla__q_lora_rank=16, mla__kv_lora_rank=8,
                  mla__qk_nope_head_dim=8, mla__qk_rope_head_dim=4, mla__v_head_dim=8,
                  moe__expert_ffn_size=16, moe__dense_ffn_size=32, linear_backend="local")
    fields.update(changes)
    return tiny().replace(**fields)
