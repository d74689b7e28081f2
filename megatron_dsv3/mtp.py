"""Multi-token prediction (docs/architecture.md): the MTP module, its loss and lambda.

Module k (1..D) at position i combines the previous depth's representation with the
embedding of the token k positions ahead, then runs one transformer layer:
  h'^k_i = M_k [ RMSNorm(Emb(t_{i+k})) ; RMSNorm(h^{k-1}_i) ]     (M_k: 2d -> d, `eh_proj`)
  h^k    = TransformerLayer_k(h'^k),   P^k_{i+k+1} = OutHead(RMSNorm_k(h^k_i))
The embedding and output head are the main model's (shared). The concatenation order
[embedding ; hidden] is DeepSeek's released checkpoint layout (enorm, hnorm, eh_proj).
h^0 is the main model's output after its final norm, as in Megatron and vLLM.

`MTPLayer` plugs into Megatron's `MultiTokenPredictionBlock` through its layer spec (the
block runs the D layers in sequence and concatenates their outputs along the sequence);
`DeepSeekV3Model` turns the outputs into per-depth losses, and the training step weighs
them with `MTPConfig.loss_weight(tokens_seen)` (`weighted_lm_loss`):
  L_MTP = (lambda / D) * sum_k CE_k,  CE_k over the positions whose target t_{i+k+1} exists;
  the loss of a micro-batch is mean CE + L_MTP.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .config import ModelConfig, from_megatron_config
from .layers import LinearBackend, gather_last_dim_from_tp, normal_init, tp_group_of
from .sharded_checkpoint import ShardedCheckpointable


def shift_left(x: torch.Tensor, k: int, fill: int | float = 0) -> torch.Tensor:
    """x [b, s] -> y with y[:, i] = x[:, i + k] and `fill` where i + k >= s."""
    if k == 0:
        return x
    filler = torch.full_like(x[:, :k], fill)
    return torch.cat([x[:, k:], filler], dim=1)


@dataclass
class MTPSubmodules:
    backend: LinearBackend
    transformer_layer: object  # ModuleSpec of the layer inside the module


class MTPLayer(ShardedCheckpointable, torch.nn.Module):
    """One MTP depth, called by Megatron's MultiTokenPredictionBlock."""

    def __init__(self, config, submodules: MTPSubmodules, layer_number: int = 1,
                 vp_stage: Optional[int] = None, pg_collection=None, name: Optional[str] = None,
                 **unused):
        super().__init__()
        from megatron.core.transformer.spec_utils import build_module

        cfg: ModelConfig = from_megatron_config(config)
        backend = submodules.backend
        self.layer_number = layer_number
        self.tp_group = tp_group_of(pg_collection)
        d = cfg.hidden_size
        self.enorm = backend.norm(config=config, hidden_size=d, eps=cfg.norm_eps)
        self.hnorm = backend.norm(config=config, hidden_size=d, eps=cfg.norm_eps)
        self.eh_proj = backend.column(2 * d, d, config=config,
                                      init_method=normal_init(cfg.init_std),
                                      tp_group=self.tp_group)
        self.transformer_layer = build_module(
            submodules.transformer_layer, config=config, layer_number=layer_number,
            pg_collection=pg_collection, vp_stage=vp_stage, is_mtp_layer=True)
        self.final_layernorm = backend.norm(config=config, hidden_size=d, eps=cfg.norm_eps)

    @property
    def mtp_model_layer(self) -> torch.nn.Module:
        """Megatron's name for the transformer layer inside an MTP layer: its schedules set
        `current_microbatch` on it before every forward (cuda_graphs.set_current_microbatch,
        which asserts the attribute)."""
        return self.transformer_layer

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                hidden_states: torch.Tensor, attention_mask=None, padding_mask=None,
                embedding=None, **unused):
        """input_ids/position_ids [b, s] of the previous depth, hidden_states [s, b, d].

        Returns the new hidden states and the ids shifted one further, for the next depth.
        """
        input_ids = shift_left(input_ids, 1)
        position_ids = None if position_ids is None else shift_left(position_ids, 1)
        emb = embedding(input_ids=input_ids, position_ids=position_ids)  # [s, b, d]
        joint = torch.cat([self.enorm(emb), self.hnorm(hidden_states)], dim=-1)
        h, _ = self.eh_proj(joint)
        h = gather_last_dim_from_tp(h, self.tp_group)
        h, _ = self.transformer_layer(hidden_states=h, attention_mask=attention_mask)
        return self.final_layernorm(h), input_ids, position_ids, padding_mask


def mtp_targets(labels: torch.Tensor, depth: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets and mask [b, s] of depth k: position i predicts t_{i+k+1} = labels[i+k]."""
    targets = shift_left(labels, depth)
    valid = shift_left(torch.ones_like(labels, dtype=torch.bool), depth, fill=False)
    return targets, valid


def mtp_depth_ce(per_token_losses: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[D]: each depth's mean cross-entropy over its valid positions.

    per_token_losses, valid: [D, b, s] (cross-entropy of each depth; which positions count).
    """
    valid = valid.to(per_token_losses.dtype)
    return (per_token_losses * valid).sum(dim=(1, 2)) / valid.sum(dim=(1, 2)).clamp(min=1)


def mtp_loss(per_token_losses: torch.Tensor, valid: torch.Tensor, weight: float) -> torch.Tensor:
    """(lambda / D) * sum_k mean over valid positions of CE_k (`mtp_depth_ce`)."""
    return weight * mtp_depth_ce(per_token_losses, valid).mean()


def weighted_lm_loss(out, mtp_lambda: float) -> tuple[torch.Tensor, ...]:
    """The training loss of one micro-batch from the model's LMOutput: (loss to backpropagate,
    next-token CE, weighted MTP loss, each depth's unweighted MTP CE [D], detached), with
    loss = mean CE + (lambda / D) sum_k CE_k (`mtp_loss`); without MTP the weighted loss is 0
    and the per-depth CE empty."""
    lm = out.lm_loss.float().mean()
    if out.mtp_losses is None:
        return lm, lm, torch.zeros((), device=lm.device), torch.zeros(0, device=lm.device)
    depth_ce = mtp_depth_ce(out.mtp_losses.float(), out.mtp_valid)
    mtp = mtp_lambda * depth_ce.mean()
    return lm + mtp, lm, mtp, depth_ce.detach()
