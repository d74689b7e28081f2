"""Causal attention cores: a plain reference and the fused SDPA path beside it.

Shapes: q, k [b, h, s, d_qk], v [b, h, s, d_v] -> out [b, h, s, d_v]. MLA has d_qk = 192 and
d_v = 128 in V3; SDPA takes unequal widths (flash kernels need equal widths, so on GPU the
value is zero-padded to d_qk for them and the padding sliced off again, as Hugging Face does).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        softmax_scale: float) -> torch.Tensor:
    """softmax(q k^T * scale + causal mask) v, the softmax in fp32."""
    s_q, s_k = q.shape[-2], k.shape[-2]
    scores = torch.einsum("bhqd,bhkd->bhqk", q.float(), k.float()) * softmax_scale
    causal = torch.ones(s_q, s_k, dtype=torch.bool, device=q.device).tril(s_k - s_q)
    scores = scores.masked_fill(~causal, float("-inf"))
    probs = scores.softmax(dim=-1)
    return torch.einsum("bhqk,bhkd->bhqd", probs, v.float()).to(q.dtype)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   softmax_scale: float) -> torch.Tensor:
    """Fused scaled-dot-product attention (flash / cuDNN / memory-efficient on GPU)."""
    d_qk, d_v = q.shape[-1], v.shape[-1]
    if q.is_cuda and d_v < d_qk:
        v_padded = F.pad(v, (0, d_qk - d_v))
        out = F.scaled_dot_product_attention(q, k, v_padded, is_causal=True, scale=softmax_scale)
        return out[..., :d_v]
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=softmax_scale)


ATTENTION_CORES = {"reference": reference_attention, "sdpa": sdpa_attention}


def pick_attention_core(impl: str, device: torch.device):
    """'auto' is SDPA on GPU and the reference on CPU."""
    if impl == "auto":
        impl = "sdpa" if device.type == "cuda" else "reference"
    return ATTENTION_CORES[impl]
