"""MTP speculative decoding (greedy only): the model's first MTP layer drafts the token after
the next, the main model verifies it in the same forward that feeds the next token.

Shape legend: b requests, s = 2 tokens per verify step (the accepted token and the draft),
d hidden, V vocabulary.

Why it works (mtp.py): MTP depth 1 at position i reads the main model's output h^0_i (after
its final norm) and the embedding of t_{i+1}, runs one transformer layer (MLA + MoE, causal
over the positions before it) and predicts t_{i+2} through the shared output head. Once the
main model has chosen t_{i+1} greedily from h^0_i, the MTP layer can guess t_{i+2} without
another main-model forward.

State at the start of a round, per request: the main latent cache holds positions 0..L-1, the
pending token x (the main model's greedy choice for position L, already emitted) is not cached
yet, the MTP layer's own latent cache (it has an MLA layer: its keys at position j come from
h^0_j and t_{j+1}) holds 0..L-1 too, and d is the MTP's draft for position L + 1. A round:

  1. verify: the main model on [x, d] at positions [L, L + 1] (one prefill-style forward on
     the cache) -> greedy g_0 (for L + 1) and g_1 (for L + 2), hidden states h^0_L, h^0_{L+1}.
  2. accept: n = 1 if d == g_0 else 0. Emitted: d and g_1 when accepted, else g_0: n + 1
     tokens from one main forward, exactly those greedy decoding emits (g_0 is what plain
     greedy chooses after x; g_1 what it chooses after d = g_0, from the same cache).
  3. roll back: the main cache's length becomes L + 1 + n; a rejected draft's latent at
     L + 1 lies beyond the length, is never attended to (queries see positions <= their own)
     and is overwritten by the next round.
  4. draft: the MTP layer on (h^0_L, g_0), (h^0_{L+1}, g_1) at positions [L, L + 1]: both
     inputs are right whenever the position is kept (the token after position j is g_j for
     every j <= L + n). The next draft is its greedy choice at index n, and the MTP cache's
     length becomes the main cache's (an entry past it, made from a rejected draft's hidden
     state, is rolled back the same way).

The prompt is prefilled the same way: the main model on the prompt, then the MTP layer on its
hidden states with the prompt shifted left by one and the first generated token last.

Cost of a round. At batch 1 a step of a 4.3B model is bound by the host's kernel launches
(benchmarks/RESULTS.md: ~15 ms a greedy step on an H200, ~2 ms of it HBM reads), so what a
round costs beyond a greedy step is the MTP layer's launches (one transformer layer, eh_proj,
its norms and the output head) and every wait for the GPU. A round therefore decides
everything on the device: g_0, g_1, the acceptance n, the next pending token and the next
draft (indexed by n there), and copies g_0, g_1 and n to the host once, after the MTP layer
is queued; the host then emits, counts and moves the lengths. Host-side positions and masks
travel through pinned memory without a wait (forward.on_device). The round in which every
request still generating has one token left runs no MTP layer (its draft would be unused).

Output: the same tokens as `generate(..., temperature=0)` for every request, up to argmax
ties within rounding: step 1 computes position L's logits in a forward of two tokens where
plain decoding computes them alone; the same arithmetic, but matmuls of other shapes may round
differently in the last bits (bit-identical on the CPU in fp32 in our tests; bf16 on a GPU can
flip a near-tie). Sampling (temperature > 0) is not supported: it needs the rejection-sampling
rule of speculative sampling, not built. Only depth 1 drafts: V3 ships one MTP layer; chaining
deeper layers needs each depth's cache corrected for the rejected drafts it was fed, not built
(a model with more depths drafts with its first, and says so in `SpeculativeStats.depths_used`).
Batches of prompts of different lengths are supported (each request at its own position, its
own acceptance); a finished request is frozen in its row as in `generate`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from ..model import DeepSeekV3Model
from .cache import LatentKVCache
from .forward import (check_model, forward_hidden, layer_step, new_cache, on_device,
                      right_padded)
from .generate import _check_arguments


@dataclass
class SpeculativeStats:
    """What the drafts bought.

    drafted:          drafts verified (one per round per unfinished request)
    accepted:         drafts equal to the main model's greedy choice
    main_forwards:    main-model forwards (the prefill included)
    request_forwards: sum over main forwards of the requests still generating in it
    new_tokens:       tokens emitted over all requests
    depths_used:      MTP depths that draft (1), of `depths` the model has
    """

    drafted: int = 0
    accepted: int = 0
    main_forwards: int = 0
    request_forwards: int = 0
    new_tokens: int = 0
    depths_used: int = 1
    depths: int = 1

    @property
    def acceptance_rate(self) -> float:
        """accepted / drafted (0 before any draft)."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_forward(self) -> float:
        """Tokens a request gets per main-model forward it takes part in (1.0 for plain
        greedy decoding; at most 2 with one draft a round)."""
        return self.new_tokens / self.request_forwards if self.request_forwards else 0.0

    def summary(self) -> str:
        return (f"speculative decoding (MTP depth {self.depths_used} of {self.depths}): "
                f"{self.accepted}/{self.drafted} drafts accepted "
                f"({100 * self.acceptance_rate:.1f}%), {self.new_tokens} tokens in "
                f"{self.main_forwards} main-model forwards, {self.tokens_per_forward:.2f} tokens "
                "per forward per request")


def mtp_layer_of(model: DeepSeekV3Model):
    """The model's first MTP layer (an MTPLayer); ValueError naming the fix without one."""
    from ..attention.mla import MultiLatentAttention

    depth = model.config.mtp_num_layers or 0
    if depth == 0 or getattr(model, "mtp", None) is None:
        raise ValueError("speculative decoding drafts with the model's MTP layer, and this "
                         "model has none (mtp.num_layers=0): use generate(), or a checkpoint "
                         "trained or converted with MTP (hf-to-dsv3 keeps config.json's "
                         "num_nextn_predict_layers unless --mtp-layers 0)")
    layer = model.mtp.layers[0]
    if not isinstance(layer.transformer_layer.self_attention, MultiLatentAttention):
        raise ValueError(f"the MTP layer's self_attention is a "
                         f"{type(layer.transformer_layer.self_attention).__name__}: cached "
                         "inference reads MultiLatentAttention's weights (build with "
                         "megatron_dsv3.specs)")
    return layer


def new_mtp_cache(model: DeepSeekV3Model, batch_size: int, capacity: int) -> LatentKVCache:
    """An empty latent cache for the first MTP layer's MLA (one layer)."""
    weight = model.embedding.word_embeddings.weight
    return LatentKVCache(model.config.dsv3.mla, 1, batch_size, capacity, dtype=weight.dtype,
                         device=weight.device)


@torch.no_grad()
def mtp_logits(model: DeepSeekV3Model, mtp_cache: LatentKVCache, h_SBD: torch.Tensor,
               next_tokens_BS: torch.Tensor, positions_BS: torch.Tensor,
               attention: str = "absorbed") -> torch.Tensor:
    """The first MTP layer on the main model's hidden states [s, b, d] (after its final norm)
    at positions [b, s], each with the token that follows it [b, s] -> logits [b, s, V] for
    the token after that (mtp.py's h'^1 = eh_proj([enorm(Emb(t_{i+1})); hnorm(h^0_i)]), then
    the layer, its final norm, the shared output head). Writes the latents into `mtp_cache`
    and leaves its lengths to the caller."""
    layer = mtp_layer_of(model)
    length = int(positions_BS.max()) + 1
    mtp_cache.check_capacity(length - 1)
    positions_BS = on_device(positions_BS, mtp_cache.latent_LBTC.device)
    emb_SBD = model.embedding(input_ids=next_tokens_BS, position_ids=None)
    x_SBD, _ = layer.eh_proj(torch.cat([layer.enorm(emb_SBD), layer.hnorm(h_SBD)], dim=-1))
    x_SBD = layer_step(layer.transformer_layer, x_SBD, mtp_cache, 0, positions_BS, length,
                       attention)
    logits_SBV, _ = model.output_layer(layer.final_layernorm(x_SBD))
    return logits_SBV.transpose(0, 1)


def choose_drafts(logits_BV: torch.Tensor, positions_B: torch.Tensor) -> torch.Tensor:
    """The drafted tokens [B] from the MTP's logits [B, V] for positions positions_B [B] (both
    on the model's device; the result stays there, or is moved there): greedy. (A seam: the
    tests replace it to force acceptances and rejections.)"""
    return logits_BV.float().argmax(dim=-1)


@torch.no_grad()
def generate_speculative(model: DeepSeekV3Model,
                         prompts: Sequence[Sequence[int] | torch.Tensor], *,
                         max_new_tokens: int, stop_tokens: Iterable[int] = (),
                         attention: str = "absorbed", pad_id: int = 0
                         ) -> tuple[list[list[int]], SpeculativeStats]:
    """Greedy decoding with MTP drafts (module docstring): the new token ids of each request,
    as `generate(model, prompts, max_new_tokens=..., temperature=0)` returns them, and the
    SpeculativeStats (acceptance rate, tokens per main-model forward). `model` in eval mode,
    TP=1, with at least one MTP layer; the other arguments as in `generate`.

    One host sync per round (module docstring, "Cost of a round"): the round's tokens, its
    acceptance and the next draft are decided on the device and copied to the host together;
    the host then emits them and moves the lengths."""
    stop_tokens = tuple(int(t) for t in stop_tokens)
    check_model(model)
    mtp_layer_of(model)
    ids = _check_arguments(model, prompts, max_new_tokens, 0.0, 1.0, stop_tokens, attention,
                           pad_id)
    batch, lengths = len(ids), [len(p) for p in ids]
    stats = SpeculativeStats(depths=model.config.mtp_num_layers)
    capacity = max(lengths) + max_new_tokens
    cache, mtp_cache = new_cache(model, batch, capacity), new_mtp_cache(model, batch, capacity)
    device = cache.latent_LBTC.device
    rows_B = torch.arange(batch, device=device)
    new_tokens: list[list[int]] = [[] for _ in ids]
    done_B = torch.zeros(batch, dtype=torch.bool)

    def emit(row: int, tokens: list[int]) -> None:
        for token in tokens:
            new_tokens[row].append(token)
            if token in stop_tokens or len(new_tokens[row]) == max_new_tokens:
                done_B[row] = True
                return

    # prefill: the prompts right-padded, the main model, then the MTP layer on the prompt
    # shifted left by one with the first generated token after each prompt's last position
    tokens_BS, positions_BS = right_padded(ids, pad_id)
    tokens_BS = tokens_BS.to(device)
    h_SBD = forward_hidden(model, cache, tokens_BS, positions_BS, attention)
    logits_SBV, _ = model.output_layer(h_SBD)
    last_B = on_device(torch.tensor(lengths) - 1, device)
    next_B = logits_SBV.transpose(0, 1)[rows_B, last_B].float().argmax(dim=-1)  # device
    following_BS = torch.cat([tokens_BS[:, 1:], tokens_BS[:, :1]], dim=1)
    following_BS[rows_B, last_B] = next_B
    drafts_BV = mtp_logits(model, mtp_cache, h_SBD, following_BS, positions_BS,
                           attention)[rows_B, last_B]
    draft_B = choose_drafts(drafts_BV, last_B + 2).to(device)
    stats.main_forwards, stats.request_forwards = 1, batch
    for row, token in enumerate(next_B.tolist()):  # the prefill's sync
        emit(row, [token])
    cache.lengths_B = torch.tensor(lengths, dtype=torch.long)
    mtp_cache.lengths_B = cache.lengths_B.clone()

    while not bool(done_B.all()):
        active_B = ~done_B
        done_dev_B = on_device(done_B, device)
        positions_BS = cache.lengths_B.unsqueeze(1) + torch.arange(2)
        # 1. verify [x, d] -> greedy g_0, g_1; 2. accept (on the device: no sync yet)
        fed_BS = torch.stack([next_B, draft_B], dim=1).masked_fill(done_dev_B.unsqueeze(1),
                                                                   pad_id)
        h_SBD = forward_hidden(model, cache, fed_BS, positions_BS, attention)
        logits_SBV, _ = model.output_layer(h_SBD)
        greedy_BS = logits_SBV.transpose(0, 1).float().argmax(dim=-1)
        kept_B = ((draft_B == greedy_BS[:, 0]) & ~done_dev_B).long()  # 0 or 1
        next_B = greedy_BS[rows_B, kept_B]
        # 4. the next draft, unless every request still generating ends in this round (it
        # emits at least one token: those with one left)
        last_round = all(max_new_tokens - len(new_tokens[row]) == 1
                         for row in active_B.nonzero().flatten().tolist())
        if not last_round:
            drafts_BV = mtp_logits(model, mtp_cache, h_SBD,
                                   greedy_BS.masked_fill(done_dev_B.unsqueeze(1), pad_id),
                                   positions_BS, attention)[rows_B, kept_B]
            draft_B = choose_drafts(drafts_BV, on_device(positions_BS[:, 0], device) + 2
                                    + kept_B).to(device)
        # the round's one sync: g_0, g_1 and whether the draft was kept, for every request
        greedy_BS_host, kept_host_B = torch.cat([greedy_BS, kept_B.unsqueeze(1)],
                                                dim=1).cpu().split([2, 1], dim=1)
        kept_host_B = kept_host_B.squeeze(1)
        stats.main_forwards += 1
        stats.request_forwards += int(active_B.sum())
        stats.drafted += int(active_B.sum())
        stats.accepted += int(kept_host_B.sum())
        for row in active_B.nonzero().flatten().tolist():
            emit(row, greedy_BS_host[row, :int(kept_host_B[row]) + 1].tolist())
        # 3. roll back by length: a request finished now or before keeps its lengths (its row
        # is then fed pad_id at the same positions, within the capacity)
        cache.lengths_B = cache.lengths_B + (1 + kept_host_B) * ~done_B
        mtp_cache.lengths_B = cache.lengths_B.clone()
    stats.new_tokens = sum(len(tokens) for tokens in new_tokens)
    return new_tokens, stats
