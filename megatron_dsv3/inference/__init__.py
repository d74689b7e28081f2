"""Inference with MLA's latent KV cache (docs/architecture.md 3.1, issue 13).

  cache.py      LatentKVCache: per layer, per token, the normalised latent c_kv and the roped
                key k_r only ([L, B, T, c + r], per-request lengths)
  attention.py  MLA of new tokens against the cache: absorbed (W^UK into the query, W^UV
                into the output) and plain (K/V expanded from the cache) beside it
  forward.py    the model's own layers on new tokens: prefill, decode_step
  generate.py   generate(): greedy or temperature / top-p sampling, stop tokens
  speculative.py  generate_speculative(): greedy decoding with the first MTP layer's drafts
                verified by the main model (its own latent cache, rollback of rejections)
  cli.py        python -m megatron_dsv3.inference generate | chat --checkpoint F
"""

from .attention import ATTENTION_MODES, mla_attention
from .cache import LatentKVCache
from .forward import (check_model, decode_step, forward_cached, forward_hidden, new_cache,
                      prefill)
from .generate import generate, sample_next
from .speculative import SpeculativeStats, generate_speculative

__all__ = ["ATTENTION_MODES", "LatentKVCache", "SpeculativeStats", "check_model",
           "decode_step", "forward_cached", "forward_hidden", "generate",
           "generate_speculative", "mla_attention", "new_cache", "prefill", "sample_next"]
