"""Rollouts: G completions per prompt through the latent-cache generator, as training tensors.

Shape legend: B completions (P prompts x G, a prompt's G consecutive), S tokens of the
longest prompt + completion.

`sample_rollouts` repeats each prompt G times and samples all of them in one batched
`inference.generate` call (one prefill, then one cached decode step per new token: the fast
path, not a full forward per token). The completions become one right-padded batch
    input_ids_BS  prompt, completion, pad ...        (what the policy reads)
    labels_BS     input_ids shifted left by one      (position s scores token s + 1)
    mask_BS       1 where labels_BS is a completion token (its stop token included),
                  0 on prompt and padding labels
so that every per-token quantity (log-probs, ratios, KL) lives on the [B, S] label grid and
the mask leaves out the prompt and the padding. Positions start at 0 in every row, as the
generator's prefill and decode placed them, so the policy's log-probs of a completion are
those of the distribution it was sampled from (at temperature 1, top_p 1).

`token_logps` runs the policy's training forward (Megatron's, any TP size: the
vocab-parallel cross-entropy gives -log p(label) without gathering the vocabulary).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Optional, Sequence

import torch

from ..inference import generate


@dataclasses.dataclass
class Rollouts:
    """One batch of completions and what GRPO computes on it (see the module docstring).
    `old_logp_BS` / `ref_logp_BS` are filled by the trainer (None when not needed)."""

    input_ids_BS: torch.Tensor
    labels_BS: torch.Tensor
    mask_BS: torch.Tensor
    completion_lengths_B: torch.Tensor
    completions: list[str]
    group_size: int
    rewards_B: Optional[torch.Tensor] = None
    advantages_B: Optional[torch.Tensor] = None
    old_logp_BS: Optional[torch.Tensor] = None
    ref_logp_BS: Optional[torch.Tensor] = None
    generate_s: float = 0.0

    @property
    def batch_size(self) -> int:
        return self.input_ids_BS.shape[0]

    def rows(self, start: int, stop: int) -> "Rollouts":
        """Completions start..stop-1 (a micro-batch; the tensors are views)."""
        def cut(t):
            return None if t is None else t[start:stop]
        return dataclasses.replace(
            self, input_ids_BS=self.input_ids_BS[start:stop], labels_BS=self.labels_BS[start:stop],
            mask_BS=self.mask_BS[start:stop],
            completion_lengths_B=self.completion_lengths_B[start:stop],
            completions=self.completions[start:stop], rewards_B=cut(self.rewards_B),
            advantages_B=cut(self.advantages_B), old_logp_BS=cut(self.old_logp_BS),
            ref_logp_BS=cut(self.ref_logp_BS))


def pack(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
         group_size: int, pad_id: int, texts: Optional[list[str]] = None) -> Rollouts:
    """Prompts (B token lists, each prompt repeated for its group) and their completions'
    token lists -> the right-padded label-grid batch of the module docstring."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions: pass "
                         "each prompt once per completion")
    if any(len(c) == 0 for c in completions):
        raise ValueError("a completion is empty: generate returns at least one token per "
                         "request (max_new_tokens >= 1)")
    lengths = [len(p) + len(c) for p, c in zip(prompts, completions, strict=True)]
    input_ids_BS = torch.full((len(prompts), max(lengths)), pad_id, dtype=torch.long)
    mask_BS = torch.zeros(input_ids_BS.shape, dtype=torch.float32)
    for row, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        input_ids_BS[row, :lengths[row]] = torch.tensor(list(prompt) + list(completion))
        # label s is token s + 1: the completion's tokens are labels len(prompt)-1 ...
        mask_BS[row, len(prompt) - 1:lengths[row] - 1] = 1.0
    labels_BS = torch.full_like(input_ids_BS, pad_id)
    labels_BS[:, :-1] = input_ids_BS[:, 1:]
    return Rollouts(input_ids_BS, labels_BS, mask_BS,
                    torch.tensor([len(c) for c in completions]),
                    texts if texts is not None else [""] * len(prompts), group_size)


def sample_rollouts(model, prompts: Sequence[Sequence[int]], *, group_size: int,
                    max_new_tokens: int, stop_tokens: Sequence[int], decode,
                    temperature: float = 1.0, top_p: float = 1.0,
                    generator: Optional[torch.Generator] = None, pad_id: int = 0) -> Rollouts:
    """G completions of each prompt from `model` (eval mode, TP = 1; inference.generate),
    packed (`pack`); `decode(ids) -> str` gives each completion's text for the reward."""
    repeated = [list(p) for p in prompts for _ in range(group_size)]
    start = time.perf_counter()
    completions = generate(model, repeated, max_new_tokens=max_new_tokens,
                           temperature=temperature, top_p=top_p, generator=generator,
                           stop_tokens=stop_tokens, pad_id=pad_id)
    elapsed = time.perf_counter() - start
    rollouts = pack(repeated, completions, group_size, pad_id,
                    [decode(c) for c in completions])
    rollouts.generate_s = elapsed
    return rollouts


def token_logps(model, input_ids_BS: torch.Tensor, labels_BS: torch.Tensor,
                micro_batch_size: int) -> torch.Tensor:
    """log pi(labels_BS[b, s] | input_ids_BS[b, :s + 1]) [B, S], in micro-batches, fp32;
    differentiable when grad is enabled. Any TP size (Megatron's vocab-parallel CE)."""
    device = next(model.parameters()).device
    pieces = []
    for start in range(0, input_ids_BS.shape[0], micro_batch_size):
        ids = input_ids_BS[start:start + micro_batch_size].to(device)
        labels = labels_BS[start:start + micro_batch_size].to(device)
        out = model(ids, None, None, labels=labels)
        pieces.append(-out.lm_loss.float())
    return torch.cat(pieces)
