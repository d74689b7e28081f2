"""MLA's latent KV cache: per layer, per token, only the normalised latent c_kv and the roped
shared key k_r (docs/architecture.md 3.1).

Shape legend: L layers, B requests, T capacity (tokens per request), c kv_lora_rank,
r qk_rope_head_dim. V3 caches c + r = 512 + 64 = 576 values per token per layer, against
2 * 128 heads * 192 / 128 = 65,536 (K and V) for the multi-head attention it replaces.

Layout: one padded buffer [L, B, T, c + r] with per-request lengths. Each request owns row b
from position 0; the latent and the rope key of a token sit side by side in one 576-wide row
(the layout FlashMLA reads). A contiguous row per request was chosen over pages because a batch
of `generate()` is fixed from prefill to the end: every request needs at most its prompt plus
`max_new_tokens` positions, known before the first step, so the padding wasted is bounded by
the spread of prompt lengths, and attention over a request is a plain slice of its row (one
batched matmul with a length mask, no page-table gather). Paging pays off once requests join
and leave a running batch (continuous batching), which this cache does not do.

Prompts of unequal length are right-padded in prefill: the pad positions of a short request
are written but lie beyond its length, every query attends only to positions <= its own (the
mask in inference/attention.py), and decode overwrites them one by one.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..config import MLAConfig


class LatentKVCache:
    """The latent cache of `num_layers` MLA layers for `batch_size` requests.

    latent_LBTC: [L, B, T, c + r], c_kv in [..., :c] and roped k_r in [..., c:]
    lengths_B:   tokens cached per request (a host tensor: the step sizes are host decisions)
    """

    def __init__(self, mla: MLAConfig, num_layers: int, batch_size: int, capacity: int, *,
                 dtype: torch.dtype, device: torch.device | str):
        for name, value in (("num_layers", num_layers), ("batch_size", batch_size),
                            ("capacity", capacity)):
            if not (isinstance(value, int) and value > 0):
                raise ValueError(f"LatentKVCache: {name}={value!r} is invalid: it must be a "
                                 "positive int")
        self.kv_lora_rank = mla.kv_lora_rank
        self.rope_dim = mla.qk_rope_head_dim
        self.capacity = capacity
        self.latent_LBTC = torch.zeros(num_layers, batch_size, capacity,
                                       mla.kv_cache_values_per_token, dtype=dtype, device=device)
        self.lengths_B = torch.zeros(batch_size, dtype=torch.long)

    @property
    def num_layers(self) -> int:
        return self.latent_LBTC.shape[0]

    @property
    def batch_size(self) -> int:
        return self.latent_LBTC.shape[1]

    def bytes_per_token_per_layer(self) -> int:
        """(kv_lora_rank + qk_rope_head_dim) * element size: what one token adds to one layer."""
        return self.latent_LBTC.shape[-1] * self.latent_LBTC.element_size()

    def check_capacity(self, last_position: int) -> None:
        """ValueError unless position `last_position` fits in every request's row."""
        if last_position >= self.capacity:
            raise ValueError(
                f"LatentKVCache: position {last_position} is beyond capacity={self.capacity}; "
                "allocate the cache with capacity >= the longest prompt + max_new_tokens")

    def write(self, layer: int, positions_BS: torch.Tensor, c_kv_SBC: torch.Tensor,
              k_rope_SBR: torch.Tensor) -> None:
        """Store the new tokens' normalised latents [s, b, c] and roped keys [s, b, r] of
        `layer` at positions_BS [b, s] of each request's row (below capacity:
        `check_capacity`)."""
        rows_BS = torch.arange(self.batch_size, device=positions_BS.device).unsqueeze(1)
        latent_BSC = torch.cat([c_kv_SBC, k_rope_SBR], dim=-1).transpose(0, 1)
        self.latent_LBTC[layer][rows_BS, positions_BS] = latent_BSC.to(self.latent_LBTC.dtype)

    def read(self, layer: int, length: Optional[int] = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """(c_kv [B, t, c], k_r [B, t, r]) of `layer`, positions 0..length-1 (views)."""
        latent_BTC = self.latent_LBTC[layer, :, :length]
        return latent_BTC[..., :self.kv_lora_rank], latent_BTC[..., self.kv_lora_rank:]
