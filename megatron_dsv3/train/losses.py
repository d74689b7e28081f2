"""The losses a training step reports: their names and the vector step 4 of a step sums them
in (one micro-batch's `step_sums`), shared by the step without and with a pipeline."""

from __future__ import annotations

import torch

# The values of step 4's host sync, in order: the DP-mean losses (LOSS_NAMES, then each MTP
# depth's CE, `depth_ce_names`), the global gradient norm, then the two flags max-reduced over
# every rank. "mtp_ce" is the depths' mean.
LOSS_NAMES = ("loss", "lm_loss", "mtp_loss", "mtp_ce", "balance_loss")
LOSS_LABELS = {"loss": "total loss", "lm_loss": "next-token CE", "mtp_loss": "weighted MTP loss",
                "mtp_ce": "MTP CE", "balance_loss": "balance loss"}


def depth_ce_names(depths: int) -> tuple[str, ...]:
    """The metric names of each MTP depth's unweighted CE: mtp_ce_depth1, ..."""
    return tuple(f"mtp_ce_depth{k}" for k in range(1, depths + 1))


def step_sums(loss, lm, mtp, depth_ce, balance) -> torch.Tensor:
    """One micro-batch's losses as step 4 sums them: LOSS_NAMES, then each depth's CE."""
    mean_ce = depth_ce.mean() if depth_ce.numel() else torch.zeros_like(lm)
    return torch.cat([torch.stack([loss, lm, mtp, mean_ce, balance]).float(), depth_ce.float()])
