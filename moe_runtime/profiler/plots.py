"""Profile plots: a layers x experts heatmap per task and the cross-task overlap matrices."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

__all__ = ["plot_heatmap", "plot_overlap"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)


def plot_heatmap(
    scores: np.ndarray,
    layers: list[int],
    selected: set[tuple[int, int]],
    title: str,
    path: Path,
    *,
    vmax: float | None = None,
) -> Path:
    """Token-score heatmap ``scores: [L, E]``; ESFT-selected cells are outlined.

    Args:
        vmax: top of the colour scale; pass one value for every task's heatmap so that equal colours
            mean equal shares across tasks (None: this heatmap's own maximum).
    """
    plt = _pyplot()
    n_layers, n_experts = scores.shape
    fig, ax = plt.subplots(figsize=(min(18, 2.5 + 0.22 * n_experts), 1.2 + 0.35 * n_layers))
    image = ax.imshow(scores, aspect="auto", cmap="viridis", interpolation="nearest", vmin=0, vmax=vmax)
    for row, layer in enumerate(layers):
        for expert in range(n_experts):
            if (layer, expert) in selected:
                ax.add_patch(
                    plt.Rectangle((expert - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="red", lw=1.2)
                )
    ax.set_yticks(range(n_layers), [str(layer) for layer in layers])
    step = max(1, n_experts // 16)
    ax.set_xticks(range(0, n_experts, step))
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="token selection share")
    _save(fig, path)
    plt.close(fig)
    return path


def plot_overlap(names: list[str], jaccard: list[list[float]], jsd: list[list[float]], path: Path) -> Path:
    """Side-by-side matrices: Jaccard of ESFT-selected sets and Jensen-Shannon divergence."""
    plt = _pyplot()
    n = len(names)
    fig, axes = plt.subplots(1, 2, figsize=(4 + 1.4 * n, 1.5 + 0.6 * n))
    for ax, matrix, title, cmap in (
        (axes[0], np.asarray(jaccard), "Jaccard of selected experts", "Blues"),
        (axes[1], np.asarray(jsd), "Jensen-Shannon divergence (bits)", "Oranges"),
    ):
        image = ax.imshow(matrix, vmin=0, vmax=1, cmap=cmap)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        for i in range(n):
            for j in range(n):
                ax.text(
                    j,
                    i,
                    f"{matrix[i, j]:.2f}",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if matrix[i, j] > 0.6 else "black",
                )
        ax.set_xticks(range(n), names, rotation=45, ha="right")
        ax.set_yticks(range(n), names)
        ax.set_title(title)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path
