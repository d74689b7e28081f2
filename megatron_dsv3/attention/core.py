"""Causal attention cores: a plain reference and the fused SDPA path beside it.

Shapes: q, k [b, h, s, d_qk], v [b, h, s, d_v] -> out [b, h, s, d_v]. MLA has d_qk = 192 and
d_v = 128 in V3; SDPA takes unequal widths. On Hopper cuDNN runs them as they are; elsewhere
the value is zero-padded to d_qk so that flash kernels can run, and the padding sliced off.
"""

from __future__ import annotations

import functools

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


def cudnn_attention_takes_unequal_widths() -> bool:
    """cuDNN's fused attention (Hopper and newer) runs d_v < d_qk directly, faster than
    padding the value to d_qk for it or for flash attention (benchmarks/RESULTS.md)."""
    return (torch.cuda.is_available() and torch.backends.cuda.cudnn_sdp_enabled()
            and torch.cuda.get_device_capability() >= (9, 0))


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float,
                   pad_value: bool = False) -> torch.Tensor:
    """Fused scaled-dot-product attention (cuDNN / flash / memory-efficient on GPU).

    pad_value: zero-pad v to d_qk (and slice the output) so that flash kernels, which need
    equal widths, can run; not needed where cuDNN takes the unequal widths."""
    d_qk, d_v = q.shape[-1], v.shape[-1]
    if pad_value and d_v < d_qk:
        v_padded = F.pad(v, (0, d_qk - d_v))
        out = F.scaled_dot_product_attention(q, k, v_padded, is_causal=True, scale=softmax_scale)
        return out[..., :d_v]
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=softmax_scale)


def pick_attention_core(impl: str, device: torch.device, *, pad_value: bool = False):
    """'auto' is SDPA on GPU and the reference on CPU; returns core(q, k, v, softmax_scale)."""
    if impl == "auto":
        impl = "sdpa" if device.type == "cuda" else "reference"
    if impl == "sdpa":
        return functools.partial(sdpa_attention, pad_value=pad_value)
    if impl == "reference":
        return reference_attention
    raise ValueError(f"attention_impl={impl!r} is invalid: choose 'auto', 'sdpa' or 'reference'")
