"""Rotary position embedding of MLA's decoupled rope channels, with YaRN.

DeepSeek rotates *interleaved* pairs (x0, x1), (x2, x3), ... as complex numbers; the output
keeps that layout (so do the official weights). Hugging Face's `rope_interleave=True`
computes the same scores with its de-interleaving permutation applied to q and k alike.

YaRN (docs/architecture.md 3.1, DeepSeek `precompute_freqs_cis`): frequencies whose wavelength is
long against `original_max_position_embeddings` are divided by `factor`, short ones kept, a
linear ramp between `beta_slow` and `beta_fast` rotations. The attention-temperature part of
YaRN is applied to the softmax scale (`MLAConfig.softmax_scale`), not to cos/sin.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ..config import YarnConfig


def _correction_dim(num_rotations: float, dim: int, base: float, max_len: int) -> float:
    return dim * math.log(max_len / (num_rotations * 2 * math.pi)) / (2 * math.log(base))


def rope_inv_freq(dim: int, base: float, yarn: Optional[YarnConfig]) -> torch.Tensor:
    """Per-pair angular frequencies [dim/2] in fp32 (YaRN-corrected when `yarn` is set)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if yarn is None or yarn.factor == 1.0:
        return inv_freq
    original = yarn.original_max_position_embeddings
    low = max(math.floor(_correction_dim(yarn.beta_fast, dim, base, original)), 0)
    high = min(math.ceil(_correction_dim(yarn.beta_slow, dim, base, original)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1.0 - ramp  # 1: keep the original frequency (short wavelengths), 0: interpolate
    return inv_freq / yarn.factor * (1.0 - keep) + inv_freq * keep


class RotaryEmbedding(torch.nn.Module):
    """cos/sin tables [positions, dim/2] for the rope channels.

    Recomputed at each call (an outer product and two elementwise ops, fused under
    torch.compile): a cache would hand out tensors that CUDA-graph replays overwrite."""

    def __init__(self, dim: int, base: float, yarn: Optional[YarnConfig] = None):
        super().__init__()
        self.dim = dim
        self.register_buffer("inv_freq", rope_inv_freq(dim, base, yarn), persistent=False)

    def cos_sin(self, seq_len: int, device: torch.device, offset: int = 0
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), each [seq_len, dim/2] fp32, for positions offset .. offset+seq_len-1."""
        positions = torch.arange(offset, offset + seq_len, dtype=torch.float32, device=device)
        angles = torch.outer(positions, self.inv_freq.to(device))  # [s, dim/2]
        return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs of x [s, b, ..., dim] by cos/sin [s, dim/2].

    Computed in fp32, returned in x's dtype.
    """
    shape = (cos.shape[0],) + (1,) * (x.dim() - 2) + (cos.shape[1],)
    cos, sin = cos.view(shape), sin.view(shape)
    pairs = x.float().unflatten(-1, (-1, 2))  # [..., dim/2, 2]
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return rotated.flatten(-2).to(x.dtype)
