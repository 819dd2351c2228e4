"""Expert offloading: routed experts on a slow tier, a budget of them resident, loads predicted ahead.

    engine = MultiAdapterEngine.from_pretrained("ckpt", offload=OffloadConfig(budget="25%", prefetch=("router",)))
    engine.add_adapter("arith", "adapters/arith")        # adapter experts stay resident in the arena
    engine.generate([...])                               # base experts come from per-layer slot caches
    engine.executor.stats.to_json()                      # hits, misses, prefetch accuracy, bytes, stalls

Modules: ``store`` (the slow tier on disk, a model loaded without its experts), ``cache`` (per-layer
slots and bookkeeping), ``policies`` (eviction and prefetch), ``executor`` (the experts function),
``config`` (budget and settings), ``simulate`` (trace-driven replay of the policies).
"""

from __future__ import annotations

from dataclasses import dataclass

from .cache import LayerCache, OffloadStats, SlotMap
from .config import Budget, OffloadConfig, parse_budget, slots_per_layer
from .executor import OffloadExecutor
from .policies import POLICIES, PREFETCHERS, make_policy
from .store import ExpertStore, load_offloaded_model

__all__ = [
    "Budget",
    "ExpertStore",
    "LayerCache",
    "OffloadConfig",
    "OffloadExecutor",
    "OffloadStats",
    "OffloadedExperts",
    "POLICIES",
    "PREFETCHERS",
    "SlotMap",
    "load_offloaded_model",
    "make_policy",
    "parse_budget",
    "slots_per_layer",
]


@dataclass
class OffloadedExperts:
    """What a serving engine needs to run a model loaded by :func:`load_offloaded_model`."""

    store: ExpertStore
    config: OffloadConfig

    def executor(self, arena) -> OffloadExecutor:
        return OffloadExecutor(arena, self.store, self.config)
