"""The demo's one-page summary: task score before/after tuning per adapter, and the forgetting bar."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["plot_demo_summary"]


def plot_demo_summary(rows: list[dict], path: Path) -> Path:
    """Write the summary PNG atomically.

    Args:
        rows: one per adapter: ``task``, ``base_score`` and ``tuned_score`` (exact match, 0-1),
            ``general_loss_change`` (nats/token on the held-out general set; > 0 is forgetting).
        path: where the PNG goes.
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    names = [row["task"] for row in rows]
    xs = range(len(rows))
    fig, (score_ax, forget_ax) = plt.subplots(1, 2, figsize=(4 + 2.2 * len(rows), 3.6))
    width = 0.38
    base = [100 * row["base_score"] for row in rows]
    tuned = [100 * row["tuned_score"] for row in rows]
    for offset, values, label, colour in (
        (-width / 2, base, "base model", "#9e9e9e"),
        (width / 2, tuned, "ESFT adapter", "#1f77b4"),
    ):
        bars = score_ax.bar([x + offset for x in xs], values, width, label=label, color=colour)
        score_ax.bar_label(bars, fmt="%.0f%%", fontsize=8)
    score_ax.set_xticks(list(xs), names)
    score_ax.set_ylim(0, 112)
    score_ax.set_ylabel("exact match on held-out prompts (%)")
    score_ax.set_title("task score: before and after ESFT")
    score_ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, fontsize=8, frameon=False)

    changes = [row["general_loss_change"] for row in rows]
    bars = forget_ax.bar(list(xs), changes, 0.5, color=["#d62728" if c > 0 else "#2ca02c" for c in changes])
    forget_ax.bar_label(bars, fmt="%+.3f", fontsize=8)
    forget_ax.axhline(0, color="black", lw=0.8)
    forget_ax.set_xticks(list(xs), names)
    top = max([abs(c) for c in changes] + [0.01]) * 1.25
    forget_ax.set_ylim(-top if min(changes) < 0 else 0, top)
    forget_ax.set_ylabel("general loss change (nats/token)")
    forget_ax.set_title("forgetting: held-out loss, all domains")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path
