"""What users want to know from a profile: concentration per task and layer, overlap across tasks."""

from __future__ import annotations

import itertools

import numpy as np

from .select import DEFAULT_TOP_P, select_layer
from .store import ProfileMeta, TaskProfile

__all__ = ["concentration", "selected_pairs", "jaccard", "js_divergence", "overview", "format_report"]

COVERAGE_LEVELS = (0.5, 0.8, 0.9)


def concentration(scores: np.ndarray) -> dict[str, list[float]]:
    """Per-layer concentration of a ``[L, E]`` distribution (rows sum to 1, or 0 if unused).

    Returns:
        ``entropy_bits`` per layer, ``entropy_norm`` (entropy / log2 E, 1 = uniform) and
        ``cover_50/80/90``: the fewest experts whose scores reach that share of selections.
    """
    num_experts = scores.shape[1]
    out: dict[str, list[float]] = {"entropy_bits": [], "entropy_norm": []}
    for level in COVERAGE_LEVELS:
        out[f"cover_{int(level * 100)}"] = []
    for row in scores:
        total = row.sum()
        p = row / total if total > 0 else row
        nz = p[p > 0]
        entropy = float(-(nz * np.log2(nz)).sum())
        out["entropy_bits"].append(entropy)
        out["entropy_norm"].append(entropy / np.log2(num_experts) if num_experts > 1 else 0.0)
        cumulative = np.cumsum(np.sort(p)[::-1])
        for level in COVERAGE_LEVELS:
            reached = np.nonzero(cumulative >= level - 1e-12)[0]
            out[f"cover_{int(level * 100)}"].append(int(reached[0]) + 1 if reached.size else num_experts)
    return out


def selected_pairs(scores: np.ndarray, layers: list[int], top_p: float) -> set[tuple[int, int]]:
    """(layer, expert) pairs chosen by the ESFT cumulative rule on ``[L, E]`` scores."""
    pairs = set()
    for layer, row in zip(layers, scores):
        pairs.update((layer, e) for e in select_layer(dict(enumerate(map(float, row))), top_p))
    return pairs


def jaccard(a: set, b: set) -> float:
    """|a & b| / |a | b| (1.0 for two empty sets)."""
    union = a | b
    return len(a & b) / len(union) if union else 1.0


def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence in bits (0 = same, 1 = disjoint) of two distributions."""
    p = p / p.sum() if p.sum() > 0 else p
    q = q / q.sum() if q.sum() > 0 else q
    m = 0.5 * (p + q)

    def kl(x: np.ndarray) -> float:
        mask = x > 0
        return float((x[mask] * np.log2(x[mask] / m[mask])).sum())

    return 0.5 * kl(p) + 0.5 * kl(q)


def overview(meta: ProfileMeta, tasks: dict[str, TaskProfile], *, top_p: float | None = None) -> dict:
    """Concentration per task and the cross-task overlap matrices (ESFT token scores).

    Args:
        meta: the profile's model facts.
        tasks: task name -> profile.
        top_p: threshold for the selected sets (default: the token-score default, 0.2).
    """
    top_p = DEFAULT_TOP_P["token"] if top_p is None else top_p
    names = list(tasks)
    scores = {name: tasks[name].token_scores(meta.top_k) for name in names}
    selected = {name: selected_pairs(scores[name], meta.layers, top_p) for name in names}
    total_experts = len(meta.layers) * meta.num_experts
    per_task = {}
    for name in names:
        conc = concentration(scores[name])
        per_task[name] = {
            "tokens": tasks[name].tokens,
            "examples": tasks[name].examples,
            "selected_experts": len(selected[name]),
            "selected_fraction": len(selected[name]) / total_experts,
            "layers": meta.layers,
            **conc,
        }
    n = len(names)
    jac = np.eye(n)
    jsd = np.zeros((n, n))
    for i, j in itertools.combinations(range(n), 2):
        jac[i, j] = jac[j, i] = jaccard(selected[names[i]], selected[names[j]])
        per_layer = [js_divergence(a, b) for a, b in zip(scores[names[i]], scores[names[j]])]
        jsd[i, j] = jsd[j, i] = float(np.mean(per_layer))
    pairs = list(itertools.combinations(range(n), 2))
    return {
        "top_p": top_p,
        "tasks": per_task,
        "task_names": names,
        "jaccard": jac.tolist(),
        "js_divergence": jsd.tolist(),
        "mean_pairwise_jaccard": float(np.mean([jac[i, j] for i, j in pairs])) if pairs else None,
        "mean_pairwise_jsd": float(np.mean([jsd[i, j] for i, j in pairs])) if pairs else None,
    }


def format_report(meta: ProfileMeta, view: dict) -> str:
    """A terminal table: one row per task, then the overlap matrix."""
    lines = [
        f"model {meta.model_type} ({meta.fingerprint[:19]}), {len(meta.layers)} MoE layers x "
        f"{meta.num_experts} experts, top-{meta.top_k}",
        "",
        f"{'task':<16}{'tokens':>9}{'entropy':>9}{'cov50':>7}{'cov80':>7}{'cov90':>7}"
        f"{'selected@' + format(view['top_p'], 'g'):>14}",
    ]
    for name, row in view["tasks"].items():
        lines.append(
            f"{name:<16}{row['tokens']:>9}{np.mean(row['entropy_norm']):>9.2f}"
            f"{np.mean(row['cover_50']):>7.1f}{np.mean(row['cover_80']):>7.1f}{np.mean(row['cover_90']):>7.1f}"
            f"{row['selected_experts']:>7} ({row['selected_fraction']:.0%})"
        )
    lines.append(
        "(entropy: normalised, 1 = uniform; covNN: experts covering NN% of selections, mean over layers)"
    )
    names = view["task_names"]
    if len(names) > 1:
        lines += ["", "overlap: Jaccard of selected experts (upper) / Jensen-Shannon divergence (lower)"]
        width = max(8, max(len(n) for n in names) + 1)
        lines.append(" " * 16 + "".join(f"{n[: width - 1]:>{width}}" for n in names))
        for i, name in enumerate(names):
            cells = []
            for j in range(len(names)):
                value = view["jaccard"][i][j] if j >= i else view["js_divergence"][i][j]
                cells.append(f"{value:>{width}.2f}")
            lines.append(f"{name:<16}" + "".join(cells))
        lines.append(
            f"mean pairwise Jaccard {view['mean_pairwise_jaccard']:.3f}, mean JS divergence {view['mean_pairwise_jsd']:.3f}"
        )
    return "\n".join(lines)
