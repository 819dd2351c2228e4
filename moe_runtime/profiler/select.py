"""ESFT expert selection: per layer, experts by descending score until the cumulative score reaches p.

The expert whose score makes the cumulative sum cross ``p`` is included (the ESFT rule). Scores are
used per layer as stored in ``summary.json`` (no normalisation across layers). Experts with a zero
score are never selected, even if a layer's total stays below ``p``. Ties are broken by expert id.
"""

from __future__ import annotations

from ..errors import UsageError

__all__ = ["DEFAULT_TOP_P", "select_layer", "select_experts", "expert_config"]

DEFAULT_TOP_P = {"gate": 0.1, "token": 0.2}


def select_layer(scores: dict[int, float], top_p: float) -> list[int]:
    """Select experts of one layer.

    Args:
        scores: expert id -> score.
        top_p: cumulative threshold in (0, 1].

    Returns:
        Selected expert ids, highest score first.
    """
    ranked = sorted(scores.items(), key=lambda item: (-item[1], item[0]))
    chosen: list[int] = []
    total = 0.0
    for expert, score in ranked:
        if total >= top_p or score <= 0.0:
            break
        chosen.append(expert)
        total += score
    return chosen


def select_experts(summary: dict, score: str, top_p: float | None = None) -> dict[str, list[int]]:
    """Select experts for every layer of an ESFT ``summary.json`` dict.

    Raises:
        UsageError: unknown score kind, top-p outside (0, 1], or a summary without that score.
    """
    if score not in DEFAULT_TOP_P:
        raise UsageError(f"score '{score}': expected 'gate' or 'token'")
    top_p = DEFAULT_TOP_P[score] if top_p is None else top_p
    if not 0.0 < top_p <= 1.0:
        raise UsageError(f"top_p {top_p}: must be in (0, 1]")
    table = summary.get(f"{score}_scores")
    if not isinstance(table, dict):
        raise UsageError(f"summary has no '{score}_scores'")
    selected = {}
    for layer in sorted(table, key=int):
        selected[str(layer)] = select_layer({int(e): float(v) for e, v in table[layer].items()}, top_p)
    return selected


def expert_config(
    selected: dict[str, list[int]], *, shared_experts: bool = False, non_expert_modules: bool = False
) -> dict:
    """The official ESFT ``expert_cfg.json`` dict."""
    return {"experts": selected, "shared_experts": shared_experts, "non_expert_modules": non_expert_modules}
