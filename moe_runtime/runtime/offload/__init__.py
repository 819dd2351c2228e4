"""Expert offloading: routed experts on a slow tier, a budget of them resident, loads predicted ahead.

    engine = MultiAdapterEngine.from_pretrained("ckpt", offload=OffloadConfig(budget="25%", prefetch=("router",)))
    engine.add_adapter("arith", "adapters/arith")        # adapter experts stay resident in the arena
    engine.generate([...])                               # base experts come from per-layer slot caches
    engine.offload.stats.to_json()                      # hits, misses, prefetch accuracy, bytes, stalls
    engine.offload.stats.phases["prefill"].bytes_read   # the same split by phase: prefill, decode

Modules: ``store`` (the slow tier on disk, a model loaded without its experts), ``cache`` (per-layer
slots and bookkeeping), ``policies`` (eviction and prefetch), ``tier`` (the base experts the executor runs),
``config`` (budget and settings), ``simulate`` (trace-driven replay of the policies).
"""

from __future__ import annotations

from dataclasses import dataclass

from .cache import LayerCache, OffloadStats, PhaseStats, SlotMap
from .config import Budget, BudgetError, OffloadConfig, parse_budget, slots_per_layer
from .policies import POLICIES, PREFETCHERS, make_policy
from .store import ExpertStore, load_offloaded_model
from .tier import OffloadTier, scoped_threads

__all__ = [
    "Budget",
    "BudgetError",
    "ExpertStore",
    "LayerCache",
    "OffloadConfig",
    "OffloadTier",
    "OffloadStats",
    "OffloadedExperts",
    "PhaseStats",
    "POLICIES",
    "PREFETCHERS",
    "SlotMap",
    "load_offloaded_model",
    "make_policy",
    "parse_budget",
    "scoped_threads",
    "slots_per_layer",
]


@dataclass
class OffloadedExperts:
    """What a serving engine needs to run a model loaded by :func:`load_offloaded_model`."""

    store: ExpertStore
    config: OffloadConfig

    def tier(self, info) -> OffloadTier:
        """The engine's base experts: caches filled from ``store`` (starts the reader threads)."""
        return OffloadTier(info, self.store, self.config)
