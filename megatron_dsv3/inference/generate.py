"""generate(): prompts in, new token ids out, through the latent cache.

One batch from start to end: the prompts are prefilled together (right-padded, one forward),
then every request decodes one token per step until it emits a stop token or has
`max_new_tokens` new tokens; the batch stops when every request has. A finished request keeps
its row (it is fed `pad_id` and its outputs are dropped) so that the batch keeps its shape;
requests do not join or leave mid-batch (that is continuous batching, with a paged cache).

Token choice per step, from the fp32 next-token logits:
  temperature == 0    greedy: argmax (the first of equal maxima)
  temperature > 0     softmax(logits / temperature), cut to the top-p nucleus (the fewest most
                      probable tokens whose probabilities sum to >= top_p, renormalised), one
                      draw from `generator` (same seed, same batch: same tokens)
Greedy tokens of a request do not depend on the batch it is in (tests/test_inference.py);
sampled ones do, since the batch's rows share the generator's stream.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch

from ..model import DeepSeekV3Model
from .attention import ATTENTION_MODES
from .forward import check_model, decode_step, new_cache, on_device, prefill


def sample_next(logits_BV: torch.Tensor, *, temperature: float = 0.0, top_p: float = 1.0,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Next token ids [B] from logits [B, V] (module docstring: greedy, temperature, top-p);
    the draw runs on the generator's device (a CPU generator works with GPU logits)."""
    logits_BV = logits_BV.float()
    if temperature == 0:
        return logits_BV.argmax(dim=-1)
    probs_BV = (logits_BV / temperature).softmax(dim=-1)
    if top_p < 1.0:
        sorted_BV, order_BV = probs_BV.sort(dim=-1, descending=True)
        # keep a token when the more probable ones before it sum to less than top_p: the
        # first token always stays
        before_BV = sorted_BV.cumsum(dim=-1) - sorted_BV
        sorted_BV = sorted_BV.masked_fill(before_BV >= top_p, 0.0)
        probs_BV = torch.zeros_like(probs_BV).scatter_(1, order_BV, sorted_BV)
    if generator is not None and generator.device != probs_BV.device:
        # a CPU generator with logits on a GPU: draw where the generator lives
        return torch.multinomial(probs_BV.to(generator.device), 1,
                                 generator=generator).squeeze(1).to(logits_BV.device)
    return torch.multinomial(probs_BV, 1, generator=generator).squeeze(1)


def _check_arguments(model: DeepSeekV3Model, prompts, max_new_tokens, temperature, top_p,
                     stop_tokens, attention, pad_id) -> list[torch.Tensor]:
    """The prompts as 1-d long tensors; ValueError naming the argument and the fix."""
    cfg = model.config.dsv3
    if attention not in ATTENTION_MODES:
        raise ValueError(f"attention={attention!r} is invalid: choose 'absorbed' (attention "
                         "in the latent space, the decode path) or 'plain' (K/V expanded "
                         "from the cache, the training computation)")
    if isinstance(prompts, torch.Tensor) or not isinstance(prompts, Sequence) or not prompts:
        raise ValueError("prompts must be a non-empty list of requests, each a list or 1-d "
                         "tensor of token ids (one request: [ids])")
    if not (isinstance(max_new_tokens, int) and max_new_tokens >= 1):
        raise ValueError(f"max_new_tokens={max_new_tokens!r} is invalid: it must be an int >= 1")
    if not temperature >= 0:
        raise ValueError(f"temperature={temperature!r} is invalid: it must be >= 0 (0 is "
                         "greedy decoding)")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p!r} is invalid: it must lie in (0, 1] (1 keeps every "
                         "token; 0.9 samples from the smallest set holding 90% of the "
                         "probability)")
    if not (isinstance(pad_id, int) and 0 <= pad_id < cfg.vocab_size):
        raise ValueError(f"pad_id={pad_id!r} is invalid: it must be a token id in [0, "
                         f"{cfg.vocab_size}) (any id works: pad positions are never attended "
                         "to)")
    for token in stop_tokens:
        if not 0 <= token < cfg.vocab_size:
            raise ValueError(f"stop_tokens holds {token}, outside the vocabulary [0, "
                             f"{cfg.vocab_size}): pass the tokenizer's end-of-text ids")
    out = []
    for index, prompt in enumerate(prompts):
        ids = torch.as_tensor(prompt, dtype=torch.long).cpu()
        if ids.dim() != 1:
            raise ValueError(f"prompts[{index}] has shape {tuple(ids.shape)}: each request is "
                             "a 1-d sequence of token ids (split a [b, s] batch into rows)")
        if ids.numel() == 0:
            raise ValueError(f"prompts[{index}] is empty: a request needs at least one token "
                             "to condition on (e.g. the tokenizer's beginning-of-text id)")
        if ids.numel() > cfg.max_seq_len:
            raise ValueError(
                f"prompts[{index}] has {ids.numel()} tokens, more than the model's "
                f"max_seq_len={cfg.max_seq_len}: shorten it (keep at most its last "
                f"{cfg.max_seq_len} tokens, fewer to leave room for max_new_tokens)")
        if ids.numel() + max_new_tokens > cfg.max_seq_len:
            raise ValueError(
                f"prompts[{index}] has {ids.numel()} tokens and max_new_tokens="
                f"{max_new_tokens}: together more than the model's max_seq_len="
                f"{cfg.max_seq_len}; lower max_new_tokens to "
                f"{cfg.max_seq_len - ids.numel()} or shorten the prompt")
        bad = (ids < 0) | (ids >= cfg.vocab_size)
        if bool(bad.any()):
            raise ValueError(f"prompts[{index}] holds token {int(ids[bad][0])}, outside the "
                             f"vocabulary [0, {cfg.vocab_size}): encode it with the model's "
                             "tokenizer")
        out.append(ids)
    return out


@torch.no_grad()
def generate(model: DeepSeekV3Model, prompts: Sequence[Sequence[int] | torch.Tensor], *,
             max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
             generator: Optional[torch.Generator] = None, stop_tokens: Iterable[int] = (),
             attention: str = "absorbed", pad_id: int = 0) -> list[list[int]]:
    """The new token ids of each request (at most max_new_tokens; a request that emits one of
    `stop_tokens` ends with it). `model` in eval mode, TP=1, on the CPU or a GPU;
    `attention`: "absorbed" (the latent-space decode) or "plain" (K/V expanded from the same
    cache); the prompt plus max_new_tokens must fit in the model's max_seq_len."""
    stop_tokens = tuple(int(t) for t in stop_tokens)
    check_model(model)
    ids = _check_arguments(model, prompts, max_new_tokens, temperature, top_p, stop_tokens,
                           attention, pad_id)
    lengths = [len(p) for p in ids]
    cache = new_cache(model, len(ids), max(lengths) + max_new_tokens)
    logits_BSV = prefill(model, cache, ids, attention, pad_id)
    rows = torch.arange(len(ids), device=logits_BSV.device)
    last = torch.tensor(lengths, device=logits_BSV.device) - 1
    logits_BV = logits_BSV[rows, last]

    stop = torch.tensor(stop_tokens, dtype=torch.long)
    new_tokens: list[list[int]] = [[] for _ in ids]
    done = torch.zeros(len(ids), dtype=torch.bool)
    for step in range(max_new_tokens):
        # the tokens stay where the logits are for the next step; their host copy (the step's
        # one sync) decides what is emitted and which requests are done
        chosen_B = sample_next(logits_BV, temperature=temperature, top_p=top_p,
                               generator=generator)
        next_B = chosen_B.cpu()
        for row in (~done).nonzero().flatten().tolist():
            new_tokens[row].append(int(next_B[row]))
        done |= torch.isin(next_B, stop)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        if bool(done.any()):
            chosen_B = chosen_B.masked_fill(on_device(done, chosen_B.device), pad_id)
        logits_BV = decode_step(model, cache, chosen_B, attention)
    return new_tokens
