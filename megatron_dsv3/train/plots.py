"""The two figures a training run leaves in its folder (written by rank 0 at the end).

  plot_loss_curve(records, path)     train loss and its parts (next-token CE, MTP CE, the
                                     weighted total), validation loss at the eval steps
  plot_expert_load(loads, records, path)
                                     left: each routed expert's share of the tokens per MoE
                                     layer over the last steps (a heatmap, 1/E is balanced);
                                     right: max/mean load per layer over training

`records` are the per-step metric dicts of `metrics.jsonl` (keys as `step.py` makes them).
matplotlib runs headless (Agg); nothing here touches torch.distributed.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

IMBALANCE_PREFIX = "moe/"
IMBALANCE_SUFFIX = "/imbalance"


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    return [s for s, _ in points], [v for _, v in points]


def _smooth(values: list[float], window: int) -> np.ndarray:
    """Trailing moving average over `window` points (fewer at the start)."""
    values = np.asarray(values, dtype=np.float64)
    cumsum = np.concatenate([[0.0], np.cumsum(values)])
    end = np.arange(1, values.size + 1)
    start = np.maximum(end - max(window, 1), 0)
    return (cumsum[end] - cumsum[start]) / (end - start)


def plot_loss_curve(records: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 5))
    window = max(1, len(records) // 50)
    for key, label, style in (("loss", "train loss (total)", "-"),
                              ("lm_loss", "next-token CE", "-"),
                              ("mtp_ce", "MTP CE (depth mean, unweighted)", "--")):
        steps, values = _series(records, key)
        if steps:
            ax.plot(steps, values, style, alpha=0.25, linewidth=0.8)
            ax.plot(steps, _smooth(values, window), style, color=ax.lines[-1].get_color(),
                    label=label + (f" ({window}-step mean)" if window > 1 else ""))
    steps, values = _series(records, "val_loss")
    if steps:
        ax.plot(steps, values, "o-", color="black", label="validation next-token CE")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title("Training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_expert_load(layer_names: list[str], loads: np.ndarray, records: list[dict],
                     path: Path, *, window_steps: int) -> None:
    """loads [layers, E]: token-expert assignments summed over the last `window_steps`."""
    fig, (ax_map, ax_curve) = plt.subplots(1, 2, figsize=(13, 4 + 0.3 * len(layer_names)),
                                           gridspec_kw={"width_ratios": [1.2, 1]})
    if loads.size:
        share = loads / np.maximum(loads.sum(axis=1, keepdims=True), 1)
        num_experts = share.shape[1]
        image = ax_map.imshow(share, aspect="auto", cmap="viridis")
        fig.colorbar(image, ax=ax_map, label=f"share of tokens (balanced = 1/{num_experts})")
        ax_map.set_yticks(range(len(layer_names)), layer_names)
        ax_map.set_xticks(range(num_experts))
        ax_map.set_xlabel("routed expert")
        if num_experts <= 32:
            for (i, j), value in np.ndenumerate(share):
                ax_map.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if value < share.mean() else "black")
    ax_map.set_title(f"Expert load, last {window_steps} steps")

    for name in layer_names:
        steps, values = _series(records, f"{IMBALANCE_PREFIX}{name}{IMBALANCE_SUFFIX}")
        if steps:
            ax_curve.plot(steps, values, label=name)
    ax_curve.axhline(1.0, color="gray", linestyle=":", label="balanced")
    ax_curve.set_xlabel("optimizer step")
    ax_curve.set_ylabel("max load / mean load")
    ax_curve.set_title("Load imbalance per MoE layer")
    ax_curve.grid(alpha=0.3)
    ax_curve.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
