"""Cache policies: which resident expert to evict, which to pin, which to load before it is needed.

Eviction policies keep per-layer state and pick a victim among candidates (resident experts the
current batch does not need):

    lru       least recently used (the common baseline, per layer)
    lfu       least frequently used (ties: least recently used)
    profile   pins the experts a routing profile uses most (loaded up front), LRU for the rest

Prefetchers predict experts of later layers and queue their loads at low priority (1):

    router      layer l+1's router applied to the hidden state entering layer l's experts
    trajectory  cosine-match the current step's per-layer expert activations against recent steps,
                prefetch the best match's experts of the next layers (MoE-Infinity / fMoE idea)
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch

from ...errors import UsageError

__all__ = [
    "EvictionPolicy",
    "LRUPolicy",
    "LFUPolicy",
    "ProfilePolicy",
    "RouterPrefetcher",
    "TrajectoryPrefetcher",
    "POLICIES",
    "PREFETCHERS",
    "make_policy",
]


class EvictionPolicy:
    """Least recently used, per layer; the base of the other policies.

    The cache calls ``insert`` when an expert becomes resident, ``access`` with the experts a step
    used (in ascending id order, after any inserts), ``evict`` when one leaves, and ``victim`` to
    choose which of ``candidates`` to evict.
    """

    name = "lru"

    def __init__(self) -> None:
        self._recency: dict[int, OrderedDict[int, None]] = {}

    def _order(self, layer: int) -> OrderedDict[int, None]:
        return self._recency.setdefault(layer, OrderedDict())

    def insert(self, layer: int, expert: int) -> None:
        self._order(layer)[expert] = None

    def access(self, layer: int, experts: Sequence[int]) -> None:
        order = self._order(layer)
        for expert in experts:
            order[expert] = None
            order.move_to_end(expert)

    def evict(self, layer: int, expert: int) -> None:
        self._order(layer).pop(expert, None)

    def victim(self, layer: int, candidates: Sequence[int]) -> int:
        allowed = set(candidates)
        for expert in self._order(layer):
            if expert in allowed:
                return expert
        return min(allowed)

    def pinned(self, layer: int) -> list[int]:
        """Experts to load up front and never evict while others can go."""
        return []


LRUPolicy = EvictionPolicy


class LFUPolicy(EvictionPolicy):
    """Least frequently used (counts kept across evictions); ties go to the least recently used."""

    name = "lfu"

    def __init__(self) -> None:
        super().__init__()
        self._counts: dict[tuple[int, int], int] = {}

    def access(self, layer: int, experts: Sequence[int]) -> None:
        super().access(layer, experts)
        for expert in experts:
            self._counts[layer, expert] = self._counts.get((layer, expert), 0) + 1

    def victim(self, layer: int, candidates: Sequence[int]) -> int:
        rank = {e: i for i, e in enumerate(self._order(layer))}
        return min(candidates, key=lambda e: (self._counts.get((layer, e), 0), rank.get(e, -1)))


class ProfilePolicy(EvictionPolicy):
    """Pins the experts routing profiles use most; LRU among the others.

    Args:
        scores: ``{layer: {expert: score}}`` (e.g. ESFT token scores summed over the active tasks).
        slots: cache slots per layer.
        pin_share: share of each layer's slots given to pinned experts.
    """

    name = "profile"

    def __init__(self, scores: dict[int, dict[int, float]], slots: int, pin_share: float = 0.5) -> None:
        super().__init__()
        count = int(slots * pin_share)
        self._pins = {
            layer: sorted(sorted(s, key=lambda e: (-s[e], e))[:count]) for layer, s in scores.items() if count
        }

    def pinned(self, layer: int) -> list[int]:
        return self._pins.get(layer, [])

    def victim(self, layer: int, candidates: Sequence[int]) -> int:
        pins = set(self.pinned(layer))
        free = [e for e in candidates if e not in pins]
        return super().victim(layer, free or candidates)


POLICIES = ("lru", "lfu", "profile")
PREFETCHERS = ("router", "trajectory")


def make_policy(
    name: str, *, slots: int, scores: dict[int, dict[int, float]] | None = None
) -> EvictionPolicy:
    """An eviction policy by name.

    Raises:
        UsageError: unknown name, or ``profile`` without routing scores.
    """
    if name == "lru":
        return EvictionPolicy()
    if name == "lfu":
        return LFUPolicy()
    if name == "profile":
        if not scores:
            raise UsageError("policy 'profile' needs routing profile scores (give a profile)")
        return ProfilePolicy(scores, slots)
    raise UsageError(f"unknown cache policy '{name}' (choose from {', '.join(POLICIES)})")


class RouterPrefetcher:
    """Predicts the next MoE layer's experts with its router applied to the current hidden state.

    Args:
        routers: ``{layer index: router weight [E, H]}`` for the layers that have a linear router.
        order: MoE layer indices in forward order.
        top_k: experts predicted per token.
        lookahead: later MoE layers predicted from each layer (more lead time, less accuracy).
    """

    name = "router"

    def __init__(
        self, routers: dict[int, torch.Tensor], order: list[int], top_k: int, lookahead: int = 1
    ) -> None:
        self.routers = routers
        self.later = {layer: order[i + 1 : i + 1 + lookahead] for i, layer in enumerate(order)}
        self.top_k = top_k

    def predict(
        self, layer: int, hidden: torch.Tensor, used: torch.Tensor | None = None
    ) -> dict[int, list[int]]:
        """``{later layer: experts}`` for ``hidden [T, H]`` entering ``layer``'s experts, most likely first."""
        out = {}
        for nxt in self.later.get(layer, []):
            weight = self.routers.get(nxt)
            if weight is None or hidden.shape[0] == 0:
                continue
            logits = hidden.to(weight.dtype) @ weight.T
            top = logits.topk(min(self.top_k, logits.shape[-1]), dim=-1).indices.reshape(-1)
            votes = torch.bincount(top, minlength=logits.shape[-1])
            order = votes.argsort(descending=True, stable=True)
            out[nxt] = order[: int((votes > 0).sum())].tolist()  # most selected first
        return out

    def end_step(self) -> None:
        pass


class TrajectoryPrefetcher:
    """Matches the current step's expert activations against recent steps (cosine similarity).

    Each step (one forward) leaves an activation matrix ``[L, E]`` (tokens per expert). At layer
    ``l`` the rows ``0..l`` of the current step are compared with the same rows of every stored
    step; the best match's experts in the next ``lookahead`` layers are predicted.

    Args:
        order: MoE layer indices in forward order.
        num_experts: experts per layer.
        history: steps kept.
        lookahead: later layers predicted at each layer.
        limit: at most this many experts predicted per layer (the most used in the match first); the
            runtime uses top-k (more evicts useful experts for little gain).
    """

    name = "trajectory"

    def __init__(
        self,
        order: list[int],
        num_experts: int,
        *,
        history: int = 64,
        lookahead: int = 1,
        limit: int | None = None,
    ) -> None:
        self.order = order
        self.pos = {layer: i for i, layer in enumerate(order)}
        self.num_experts = num_experts
        self.history = history
        self.lookahead = lookahead
        self.limit = limit
        self._past = torch.zeros(0, len(order), num_experts, dtype=torch.float32)
        self._current = torch.zeros(len(order), num_experts, dtype=torch.float32)

    def observe(self, layer: int, experts: torch.Tensor) -> None:
        """Record the expert ids (any shape) used at ``layer`` in the current step."""
        ids = experts.reshape(-1).to("cpu", torch.int64)
        ids = ids[(ids >= 0) & (ids < self.num_experts)]
        self._current[self.pos[layer]] += torch.bincount(ids, minlength=self.num_experts).float()

    def predict(
        self, layer: int, hidden: torch.Tensor | None = None, used: torch.Tensor | None = None
    ) -> dict[int, list[int]]:
        if used is not None:
            self.observe(layer, used)
        i = self.pos[layer]
        if not len(self._past) or i + 1 >= len(self.order):
            return {}
        cur = torch.nn.functional.normalize(self._current[: i + 1].reshape(1, -1), dim=-1)
        past = torch.nn.functional.normalize(self._past[:, : i + 1].reshape(len(self._past), -1), dim=-1)
        best = int((past @ cur.T).argmax())
        out = {}
        for j in range(i + 1, min(i + 1 + self.lookahead, len(self.order))):
            row = self._past[best, j]
            ids = [int(e) for e in row.argsort(descending=True) if row[e] > 0]
            out[self.order[j]] = sorted(ids[: self.limit] if self.limit else ids)
        return out

    def end_step(self) -> None:
        """Close the current step: keep it in the history."""
        if self._current.any():
            self._past = torch.cat([self._past, self._current[None]])[-self.history :]
        self._current = torch.zeros_like(self._current)
