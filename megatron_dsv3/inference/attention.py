"""MLA attention of new tokens against the latent cache: absorbed, and plain beside it.

Shape legend: s new tokens per request, b requests, t cached positions (0..t-1), h heads,
c kv_lora_rank, c' q_lora_rank, n qk_nope_head_dim, r qk_rope_head_dim, v v_head_dim, d hidden.

The query, the latent and the rope key come from the module's own projections and norms
(`linear_q_down`, `q_norm`, `linear_q_up` or `linear_q`, `linear_kv_down`, `kv_norm`), roped at
each token's own position with the module's `RotaryEmbedding` (YaRN frequencies; the YaRN
attention temperature is in `MLAConfig.softmax_scale`, as mla.py applies it). The new tokens'
normalised latent c_kv [c] and roped key k_r [r] go into the cache; then, with
W^UKV = linear_kv_up.weight viewed [h, n + v, c] = [W^UK ; W^UV] per head:

  absorbed (decode; DeepSeek's `attn_impl="absorb"`): nothing per head is ever materialised
  for the cached tokens:
      q_c[h]      = q_n[h] W^UK[h]                                  [c]   (W^UK into the query)
      score[h, j] = (q_c[h] . c_kv[j] + q_r[h] . k_r[j]) * scale
      o_c[h]      = sum_j softmax(score[h])_j c_kv[j]               [c]
      o[h]        = W^UV[h] o_c[h]                                  [v]   (W^UV into the output)
    since q_n[h] . (W^UK[h] c_kv[j]) = (q_n[h] W^UK[h]) . c_kv[j] and the value's up-projection
    commutes with the weighted sum. Per step it reads the cache once, c + r values per token.
    W^UV stays a per-head [v, c] map applied before `linear_proj`: folding it into W^O would
    make a [d, h * c] matrix, 4x the size of W^O at V3's widths.
  plain (the training computation, K and V expanded from the same cache): k_n, v =
    linear_kv_up(c_kv) for every cached token, k = [k_n ; k_r], softmax(q k^T * scale) v. It
    expands h * (n + v) values per cached token at every step, which is what the absorbed
    form avoids; kept as the reference the absorbed form must equal.

Both end with the module's `linear_proj`. Query i of request b sits at position
positions[b, i] and attends to the cached positions j <= positions[b, i]: causal within a
prefill, everything so far in decode, and never a right-pad position of a shorter prompt
(inference/cache.py). The scores, softmax and weighted sums run in fp32 as
attention/core.py's reference does, and the result is cast back to the activations' dtype.

With ModelConfig.fp8 = "deepseek" the projections called here run in FP8 as in training,
but the absorbed form reads linear_kv_up's weight as stored (bf16/fp32), so it matches the
FP8 model's plain path only to FP8's precision.

Tensor parallelism is not supported here (TP = 1): heads would split W^UKV's rows while the
latent stays replicated, which works the same but is not written or tested.
"""

from __future__ import annotations

import torch

from ..attention.mla import MultiLatentAttention
from ..attention.rope import RotaryEmbedding, apply_rope
from .cache import LatentKVCache

ATTENTION_MODES = ("absorbed", "plain")


def rope_at_positions(rotary: RotaryEmbedding, x_SB_R: torch.Tensor,
                      positions_BS: torch.Tensor) -> torch.Tensor:
    """x [s, b, ..., r] rotated at each token's own position positions_BS [b, s] (requests
    of a batch stand at different positions in decode). The angles are computed as
    RotaryEmbedding.cos_sin computes them (fp32 positions times inv_freq), so a request at
    positions 0..s-1 is rotated exactly as in the training forward."""
    s, b = x_SB_R.shape[:2]
    positions = positions_BS.t().reshape(-1).to(device=x_SB_R.device, dtype=torch.float32)
    angles_NR = torch.outer(positions, rotary.inv_freq.to(x_SB_R.device))  # [s * b, r/2]
    rotated = apply_rope(x_SB_R.reshape(s * b, *x_SB_R.shape[2:]), angles_NR.cos(),
                         angles_NR.sin())
    return rotated.view(x_SB_R.shape)


def _check_module(attn: MultiLatentAttention) -> None:
    if attn.num_local_heads != attn.cfg.num_heads:
        raise ValueError(
            f"inference: the MLA module holds {attn.num_local_heads} of {attn.cfg.num_heads} "
            "heads (tensor parallelism); cached inference runs at TP=1: build the model with "
            "init_distributed(tensor_parallel_size=1)")
    for name in ("linear_kv_up", "linear_proj"):
        if getattr(getattr(attn, name), "bias", None) is not None:
            raise ValueError(f"inference: MLA's {name} has a bias; the absorbed form folds "
                             "only its weight: build the model without linear biases")


def mla_attention(attn: MultiLatentAttention, x_SBD: torch.Tensor, cache: LatentKVCache,
                  layer: int, positions_BS: torch.Tensor, length: int,
                  mode: str = "absorbed") -> torch.Tensor:
    """One MLA layer on new tokens: x [s, b, d] (after the layer's input norm) at positions
    [b, s] (on x's device) -> the attention output [s, b, d] (after linear_proj); their
    latents are written into `cache` at `layer` first. `length` = max(positions) + 1, passed
    in so that a decode step syncs with the host once, not once per layer."""
    if mode not in ATTENTION_MODES:
        raise ValueError(f"attention={mode!r} is invalid: choose one of {ATTENTION_MODES}")
    _check_module(attn)
    mla, h = attn.cfg, attn.num_local_heads
    s, b = x_SBD.shape[:2]
    q_SBHN, q_rope_SBHR, c_kv_SBC, k_rope_SBR = attn.project(x_SBD)
    q_rope_SBHR = rope_at_positions(attn.rotary, q_rope_SBHR, positions_BS)
    cache.write(layer, positions_BS, attn.kv_norm(c_kv_SBC),
                rope_at_positions(attn.rotary, k_rope_SBR, positions_BS))

    c_kv_BTC, k_rope_BTR = cache.read(layer, length)
    visible_BST = torch.arange(length, device=x_SBD.device) <= positions_BS.unsqueeze(-1)
    attend = _absorbed if mode == "absorbed" else _plain
    context_SBHV = attend(attn, q_SBHN, q_rope_SBHR, c_kv_BTC, k_rope_BTR, visible_BST)
    out, _ = attn.linear_proj(context_SBHV.reshape(s, b, h * mla.v_head_dim).to(x_SBD.dtype))
    return out


def _softmax(scores_BHST: torch.Tensor, visible_BST: torch.Tensor) -> torch.Tensor:
    return scores_BHST.masked_fill(~visible_BST.unsqueeze(1), float("-inf")).softmax(dim=-1)


def _absorbed(attn, q_SBHN, q_rope_SBHR, c_kv_BTC, k_rope_BTR, visible_BST) -> torch.Tensor:
    mla, h = attn.cfg, attn.num_local_heads
    w_uk_HNC, w_uv_HVC = attn.linear_kv_up.weight.float().view(
        h, mla.qk_nope_head_dim + mla.v_head_dim, mla.kv_lora_rank).split(
        [mla.qk_nope_head_dim, mla.v_head_dim], dim=1)
    c_kv_BTC = c_kv_BTC.float()
    q_SBHC = torch.einsum("sbhn,hnc->sbhc", q_SBHN.float(), w_uk_HNC)
    scores_BHST = (torch.einsum("sbhc,btc->bhst", q_SBHC, c_kv_BTC)
                   + torch.einsum("sbhr,btr->bhst", q_rope_SBHR.float(), k_rope_BTR.float()))
    probs_BHST = _softmax(scores_BHST * mla.softmax_scale, visible_BST)
    context_SBHC = torch.einsum("bhst,btc->sbhc", probs_BHST, c_kv_BTC)
    return torch.einsum("sbhc,hvc->sbhv", context_SBHC, w_uv_HVC)


def _plain(attn, q_SBHN, q_rope_SBHR, c_kv_BTC, k_rope_BTR, visible_BST) -> torch.Tensor:
    mla, h = attn.cfg, attn.num_local_heads
    b, t = c_kv_BTC.shape[:2]
    kv, _ = attn.linear_kv_up(c_kv_BTC)
    k_BTHN, v_BTHV = kv.view(b, t, h, mla.qk_nope_head_dim + mla.v_head_dim).split(
        [mla.qk_nope_head_dim, mla.v_head_dim], dim=-1)
    key_BTHD = torch.cat([k_BTHN, k_rope_BTR.unsqueeze(2).expand(b, t, h, -1)], dim=-1)
    query_SBHD = torch.cat([q_SBHN, q_rope_SBHR], dim=-1)
    scores_BHST = torch.einsum("sbhd,bthd->bhst", query_SBHD.float(), key_BTHD.float())
    probs_BHST = _softmax(scores_BHST * mla.softmax_scale, visible_BST)
    return torch.einsum("bhst,bthv->sbhv", probs_BHST, v_BTHV.float())
