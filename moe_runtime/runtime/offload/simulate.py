"""Trace-driven cache simulation: replay recorded routing through the cache policies, no model run.

    profile --trace DIR  ->  per layer [tokens, K] expert ids
    tokens in order, ``tokens_per_step`` per step (1 = batch-1 decoding)
      per step, per MoE layer in order: the step's distinct experts -> the same SlotMap the runtime
      uses (passes, hits, misses, evictions); trajectory prefetches land in later layers' maps
    -> hits, misses, hit rate, prefetch accuracy per policy

The router prefetcher needs hidden states, which a trace does not keep: it is not simulated.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from ...errors import ConfigError, UsageError
from .cache import OffloadStats, SlotMap
from .config import Budget, BudgetError, parse_budget
from .policies import POLICIES, TrajectoryPrefetcher, make_policy

__all__ = ["DEFAULT_POLICIES", "load_trace", "replay", "replay_steps", "simulate"]

DEFAULT_POLICIES = ("lru", "lfu", "profile", "lru+trajectory", "lfu+trajectory", "profile+trajectory")


def load_trace(directory: str | Path, tasks: Sequence[str] | None = None):
    """Routing traces of a profile directory.

    Returns:
        ``(layers, num_experts, top_k, per-layer [tokens, K] arrays, scores {layer: {expert: count}})``;
        the tasks' traces are concatenated in the order given (default: the profile's order).

    Raises:
        UsageError: not a profile, no trace (profile without ``--trace``), or an unknown task.
    """
    from ...profiler import load_profile

    meta, profiles = load_profile(directory)
    names = list(tasks) if tasks else list(profiles)
    for name in names:
        if name not in profiles:
            raise ConfigError("task", f"'{name}': not in the profile {directory} (has {', '.join(profiles)})")
        if profiles[name].trace is None:
            raise UsageError(
                f"profile {directory}: task '{name}' has no trace (profile it with trace recording on)"
            )
    trace = [np.concatenate([profiles[n].trace[i] for n in names]) for i in range(len(meta.layers))]
    if not len(trace[0]):
        raise UsageError(f"profile {directory}: the trace of {', '.join(names)} holds no tokens")
    counts = sum(profiles[n].counts for n in names)
    scores = {layer: {e: float(c) for e, c in enumerate(row)} for layer, row in zip(meta.layers, counts)}
    return meta.layers, meta.num_experts, meta.top_k, trace, scores


def _parse_policy(spec: str) -> tuple[str, bool]:
    name, plus, extra = spec.partition("+")
    if name not in POLICIES or (plus and extra != "trajectory"):
        raise ConfigError(
            "policy", f"'{spec}': expected one of {', '.join(POLICIES)}, optionally with '+trajectory'"
        )
    return name, extra == "trajectory"


def replay(
    trace: Sequence[np.ndarray],
    layers: Sequence[int],
    num_experts: int,
    slots: int,
    policy: str,
    *,
    scores: dict[int, dict[int, float]] | None = None,
    tokens_per_step: int = 1,
) -> OffloadStats:
    """Replay a token trace through one policy.

    Args:
        trace: per MoE layer ``[tokens, K]`` expert ids (same token order in every layer).
        layers: MoE layer indices, in forward order.
        num_experts: experts per layer.
        slots: cache slots per layer.
        policy: ``lru``, ``lfu`` or ``profile``, optionally ``+trajectory``.
        scores: routing scores for the ``profile`` policy.
        tokens_per_step: tokens that go through the model together.

    Returns:
        The counters (``bytes_read`` counts experts loaded).
    """
    tokens = len(trace[0]) if len(trace) else 0
    steps = (
        [t[start : start + tokens_per_step] for t in trace] for start in range(0, tokens, tokens_per_step)
    )
    return replay_steps(steps, layers, num_experts, slots, policy, scores=scores)


def replay_steps(
    steps: Iterable[Sequence[np.ndarray]],
    layers: Sequence[int],
    num_experts: int,
    slots: int,
    policy: str,
    *,
    scores: dict[int, dict[int, float]] | None = None,
) -> OffloadStats:
    """Replay forward steps (per step, per MoE layer in order: the expert ids of its tokens).

    Same arguments and result as :func:`replay`; a step may hold any number of tokens (a prefill).
    """
    name, trajectory = _parse_policy(policy)
    stats = OffloadStats()
    evict = make_policy(name, slots=slots, scores=scores)
    maps = {layer: SlotMap(layer, slots, evict, stats) for layer in layers}
    predictor = TrajectoryPrefetcher(list(layers), num_experts) if trajectory else None
    loaded = sum(len(slot_map.warm()) for slot_map in maps.values())
    for step in steps:
        for layer, ids in zip(layers, step):
            ids = np.asarray(ids)
            if predictor is not None and predictor.limit is None and ids.ndim == 2:
                predictor.limit = ids.shape[1]  # as the runtime: at most top-k experts per layer
            ids = ids[(ids >= 0) & (ids < num_experts)]
            needed = sorted({int(e) for e in ids.reshape(-1)})
            slot_map = maps[layer]
            for p, (_, loads) in enumerate(slot_map.schedule(needed)):
                loaded += len(loads)
                stats.passes += 1
                if p == 0 and predictor is not None:
                    for later, experts in predictor.predict(layer, used=_as_tensor(ids)).items():
                        loaded += len(maps[later].prefetch(experts[:slots]))
        if predictor is not None:
            predictor.end_step()
    stats.bytes_read = loaded
    return stats


def _as_tensor(ids: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(ids).astype(np.int64))


def simulate(
    directory: str | Path,
    budget: Budget | str | float,
    *,
    policies: Sequence[str] = DEFAULT_POLICIES,
    tasks: Sequence[str] | None = None,
    tokens_per_step: int = 1,
) -> dict:
    """Hit rates of every policy on a profile's trace at a budget (a share of each layer's experts).

    Raises:
        UsageError: bad budget (bytes are not accepted: a trace has no weights), policy or trace.
    """
    parsed = parse_budget(budget)
    if parsed.share is None:
        raise UsageError(
            f"budget {parsed}: give a share of the experts (e.g. 25%); a trace has no weight sizes"
        )
    if tokens_per_step <= 0:
        raise UsageError(f"tokens_per_step must be positive, got {tokens_per_step}")
    for spec in policies:
        _parse_policy(spec)
    layers, num_experts, top_k, trace, scores = load_trace(directory, tasks)
    slots = max(1, math.floor(parsed.share * num_experts + 1e-9))
    if slots < top_k:
        raise BudgetError(
            f"{parsed}: {slots} expert(s) per layer, fewer than one token's working set (top-k = {top_k})"
        )
    results = {}
    for spec in policies:
        stats = replay(
            trace, layers, num_experts, slots, spec, scores=scores, tokens_per_step=tokens_per_step
        )
        results[spec] = {
            "hit_rate": stats.hit_rate,
            "hits": stats.hits,
            "misses": stats.misses,
            "experts_loaded": stats.bytes_read,
            "prefetches": stats.prefetches,
            "prefetch_accuracy": stats.prefetch_accuracy,
        }
    return {
        "budget": str(parsed),
        "slots_per_layer": slots,
        "num_experts": num_experts,
        "top_k": top_k,
        "tokens": int(len(trace[0])) if trace else 0,
        "tokens_per_step": tokens_per_step,
        "policies": results,
    }
