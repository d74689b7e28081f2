"""Inference with MLA's latent KV cache (docs/architecture.md 3.1, issue 13).

  cache.py      LatentKVCache: per layer, per token, the normalised latent c_kv and the roped
                key k_r only ([L, B, T, c + r], per-request lengths)
  attention.py  MLA of new tokens against the cache: absorbed (W^UK into the query, W^UV
                into the output) and plain (K/V expanded from the cache) beside it
  forward.py    the model's own layers on new tokens: prefill, decode_step
  generate.py   generate(): greedy or temperature / top-p sampling, stop tokens
"""

from .attention import ATTENTION_MODES, mla_attention
from .cache import LatentKVCache
from .forward import check_model, decode_step, forward_cached, new_cache, prefill
from .generate import generate, sample_next

__all__ = ["ATTENTION_MODES", "LatentKVCache", "check_model", "decode_step", "forward_cached",
           "generate", "mla_attention", "new_cache", "prefill", "sample_next"]
