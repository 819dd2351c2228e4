"""Offloaded base experts: every MoE layer's base experts come from a cache of slots filled from a slow tier.

    router -> top_k_index [T, K] (base ids)
           -> arena slot table [A, E]: (owner, expert) -> base expert e, or an adapter slot (resident)
           -> needed base experts -> cache.schedule: passes (hits stay, misses read at priority 0, waited on)
           -> prefetchers queue later layers' predicted experts (priority 1), overlapping this compute
           -> per pass, a combined table: base e -> cache slot, adapter slot -> after the cache slots,
              over the segments [cache slots | adapter chunks]   (the executor runs each pass)

A batch that needs more distinct experts than the layer has slots runs in several passes (each
pass a group of half the slots, adapter experts in the first), whose outputs add up; the next
group's reads run while the current group computes. Adapter experts stay resident in the arena;
only base experts are offloaded. :class:`OffloadTier` is the executor's
:class:`~moe_runtime.runtime.executor.BaseExperts` for this case.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import torch
from torch import nn

from ...errors import UsageError
from ...models import MoEModelInfo
from ...models.discovery import MoELayer
from ...ops.experts_mm import Segment
from ..arena import LayerSlots
from .cache import LayerCache, OffloadStats
from .config import OffloadConfig, chunk_tokens_for, fast_tier_slots
from .host import HostCopier, HostStore
from .policies import RouterPrefetcher, TrajectoryPrefetcher, make_policy
from .store import ExpertStore

__all__ = ["OffloadTier", "router_weights", "scoped_threads"]


def router_weights(info) -> dict[int, torch.Tensor]:
    """``{layer: [E, H]}`` linear router weights, for the layers whose router has one."""
    out = {}
    for layer in info.layers:
        if layer.router is None:
            continue
        for name, param in layer.router.named_parameters():
            if (
                "bias" not in name
                and param.dim() == 2
                and param.shape == (layer.num_experts, layer.hidden_size)
            ):
                out[layer.index] = param.detach()
                break
    return out


def _check_scores(scores: dict[int, dict[int, float]] | None, info) -> None:
    """Profile scores must name this model's MoE layers and experts (a profile of another model does not)."""
    if not scores:
        return
    sizes = {layer.index: layer.num_experts for layer in info.layers}
    for layer, row in scores.items():
        if layer not in sizes:
            raise UsageError(
                f"routing profile: layer {layer} is not an MoE layer of this model "
                f"(MoE layers {info.layer_indices}); was it made for another model?"
            )
        bad = [e for e in row if not 0 <= e < sizes[layer]]
        if bad:
            raise UsageError(
                f"routing profile: layer {layer} names expert {bad[0]}, this model has {sizes[layer]} "
                "experts there; was it made for another model?"
            )


@contextlib.contextmanager
def scoped_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``threads`` torch intra-op threads (None: as is); restored afterwards."""
    if threads is None or threads == torch.get_num_threads():
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class OffloadTier:
    """Base experts served from per-layer caches of expert slots filled from a slow tier.

    Args:
        info: the model's MoE layers (their expert parameters are not materialized).
        store: where the base experts live on disk.
        config: tier, budget, policy, prefetchers, compute threads.
        loader: an ``ExpertLoader`` (default: a new one with ``config.num_threads`` threads); with
            the ``cpu`` tier it reads the experts into host memory once.
    """

    def __init__(self, info: MoEModelInfo, store: ExpertStore, config: OffloadConfig, *, loader=None) -> None:
        from ...ops.loader import ExpertLoader

        config.validate()
        self.compute_dtype = store.dtype
        # slots in the stored dtype: each pass widens its own experts (see _narrow_pass)
        self.widens_per_pass = config.slot_dtype == "storage" and store.widens
        if self.widens_per_pass:
            store = dataclasses.replace(store, dtype=store.storage_dtype)
        self.info = info
        self.config = config
        self.offloaded_to = config.tier
        self.compute_threads = config.resolved_compute_threads()
        self.device = config.device()
        self.num_slots = fast_tier_slots(info, config.budget, self.device)
        self.stats = OffloadStats()
        _check_scores(config.profile_scores, info)
        self.policy = make_policy(config.policy, slots=self.num_slots, scores=config.profile_scores)
        if config.tier == "cpu":  # every expert read once into host memory; slots filled by copies
            reader = loader if loader is not None else ExpertLoader(config.num_threads)
            try:
                store = HostStore(store, info, reader, pin=self.device.type == "cuda")
            finally:
                if loader is None:
                    reader.close()
            self.loader = HostCopier(self.device)
        else:
            self.loader = loader if loader is not None else ExpertLoader(config.num_threads)
        self.store = store
        self.caches = {
            layer.index: LayerCache(
                layer, store, self.num_slots, self.policy, self.stats, self.loader, self.device
            )
            for layer in info.layers
        }
        order = info.layer_indices
        self.prefetchers = []
        for name in config.prefetch:
            if name == "router":
                top_k = max(layer.top_k for layer in info.layers)
                self.prefetchers.append(RouterPrefetcher(router_weights(info), order, top_k))
            else:
                num_experts = max(layer.num_experts for layer in info.layers)
                self.prefetchers.append(
                    TrajectoryPrefetcher(order, num_experts, limit=max(layer.top_k for layer in info.layers))
                )
        self._first = order[0]
        # tokens per chunk of every layer's batch (intermediates bounded whatever the prompt length)
        self.chunks = {
            layer.index: config.chunk_tokens or chunk_tokens_for(layer, store.dtype, config.chunk_bytes)
            for layer in info.layers
        }
        for cache in self.caches.values():
            cache.warm_load()

    # the BaseExperts interface ----------------------------------------------------------------

    def segment(self, layer: MoELayer) -> Segment:
        """The cache slots of the layer (adapter chunks take their shape, dtype and device); with slots
        in the storage dtype, a view of their shape in the compute dtype that holds no memory."""
        segment = self.caches[layer.index].segment
        if not self.widens_per_pass:
            return segment

        def like(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            return torch.empty((), dtype=self.compute_dtype, device=t.device).expand(t.shape)

        return Segment(
            0, like(segment.up), like(segment.down), like(segment.up_bias), like(segment.down_bias)
        )

    def chunk_tokens(self, layer: MoELayer) -> int:
        """Tokens run through the layer's experts at a time, within each pass (``OffloadConfig.chunk_tokens``)."""
        return self.chunks[layer.index]

    def phase(self, name: str, tokens: int = 0) -> contextlib.AbstractContextManager:
        """Count the block's reads, misses and stalls under ``name`` too (see :meth:`OffloadStats.phase`)."""
        return self.stats.phase(name, tokens)

    def threads(self) -> contextlib.AbstractContextManager:
        """The compute threads serving from this tier wants (see ``OffloadConfig.compute_threads``)."""
        return scoped_threads(self.compute_threads)

    def close(self) -> None:
        """Stop the loader threads."""
        self.loader.close()

    # memory ----------------------------------------------------------------------------------

    def resident_expert_bytes(self) -> int:
        """Bytes of the cache slots (the base experts held in the fast tier)."""
        return sum(cache.resident_bytes() for cache in self.caches.values())

    def offloaded_bytes(self) -> int:
        """Bytes of all base routed experts (what a resident model would hold)."""
        return self.info.routed_expert_bytes

    @contextlib.contextmanager
    def materialized(self, experts: dict[int, list[int]]) -> Iterator[None]:
        """Temporarily give the experts modules real weights for the listed base experts.

        Adapter checks read the base experts they replace (fingerprint). The full-size tensors are
        allocated but only the listed experts' pages are written; the rest is never touched.
        """
        info = self.info
        saved = []
        try:
            for index, ids in experts.items():
                layer = info.by_index(index)
                module = layer.experts
                for name in layer.layout.param_names():
                    original = module._parameters[name]
                    value = torch.empty(original.shape, dtype=original.dtype)
                    saved.append((module, name, original))
                    module._parameters[name] = nn.Parameter(value, requires_grad=False)
                for expert in ids:
                    for name, tensor in self.store.read_expert(index, expert).items():
                        module._parameters[name].data[expert].copy_(tensor)
            yield
        finally:
            for module, name, original in reversed(saved):
                module._parameters[name] = original

    def expert_parts(self, name: str, tensor: torch.Tensor) -> Iterator[torch.Tensor]:
        """The contents of an offloaded fused expert parameter, one expert at a time from disk.

        For :func:`~moe_runtime.models.model_fingerprint` of the base model (``parts``).
        """
        for layer in self.info.layers:
            for param_name in layer.layout.param_names():
                if name == f"{layer.experts_name}.{param_name}":
                    for expert in range(layer.num_experts):
                        yield self.store.read_expert(layer.index, expert)[param_name]
                    return
        raise ValueError(f"'{name}' is not materialized and is not an offloaded expert parameter")

    # one layer -------------------------------------------------------------------------------

    def _prefetch(self, index: int, hidden: torch.Tensor, used: torch.Tensor) -> None:
        for prefetcher in self.prefetchers:
            for layer, experts in prefetcher.predict(index, hidden, used).items():
                cache = self.caches.get(layer)
                if cache is not None and experts:
                    cache.prefetch_load(experts[: cache.slots])

    def passes(
        self, slots: LayerSlots, hidden: torch.Tensor, owners: torch.Tensor, top_k_index: torch.Tensor
    ) -> Iterator[tuple[torch.Tensor, list[Segment]]]:
        """The passes of one layer: ``(combined slot table [A, E], [cache slots, *adapter chunks])``."""
        cache = self.caches[slots.layer.index]
        if cache.layer == self._first:
            for prefetcher in self.prefetchers:
                prefetcher.end_step()
        num_experts = slots.num_experts
        table = slots.table  # [A, E]: base expert id, an adapter slot >= E, or -1 (entry dropped)
        valid = (top_k_index >= 0) & (top_k_index < num_experts)
        logical = table[owners.unsqueeze(1), top_k_index.clamp(0, num_experts - 1)]
        base_ids = logical[valid & (logical >= 0) & (logical < num_experts)]
        needed = torch.unique(base_ids).tolist()
        size = cache.slots
        chunks = [
            Segment(c.start - num_experts + size, c.up, c.down, c.up_bias, c.down_bias) for c in slots.chunks
        ]
        plan = cache.schedule(needed)

        def start() -> list[int] | None:
            """The next pass's experts, their reads queued (None after the last pass)."""
            item = next(plan, None)
            if item is None:
                return None
            cache.load(item[1], priority=0)
            return item[0]

        group, first = start(), True
        while group is not None:
            upcoming = start() if cache.overlaps else None  # its reads overlap this pass's compute
            cache.wait(group)
            if first:
                self._prefetch(cache.layer, hidden, base_ids)
            if first and len(group) == len(needed):  # every routed base expert is resident
                slot_of = cache.slot_table
            else:
                slot_of = torch.full((num_experts,), -1, dtype=torch.int32)
                ids = torch.tensor(group, dtype=torch.int64)
                slot_of[ids] = cache.slot_table[ids]
            base = slot_of.to(table.device)[table.long().clamp(0, num_experts - 1)]
            if chunks:
                adapter = table - num_experts + size if first else torch.full_like(table, -1)
                combined = torch.where(table < num_experts, base, adapter)
            else:
                combined = torch.where(table < num_experts, base, -1)
            combined = torch.where(table >= 0, combined, -1)
            if self.widens_per_pass:
                yield self._narrow_pass(cache, group, combined, slots.chunks, num_experts)
            else:
                yield combined, [cache.segment, *chunks]
            self.stats.passes += 1
            group, first = (upcoming if cache.overlaps else start()), False

    def _narrow_pass(
        self,
        cache: LayerCache,
        group: list[int],
        combined: torch.Tensor,
        adapter: list[Segment],
        num_experts: int,
    ) -> tuple[torch.Tensor, list[Segment]]:
        """A pass over slots in the storage dtype: its group's slots widened into a compact segment
        ``[n, ...]`` of the compute dtype, the table renumbered (cache slot -> position, adapter
        slots shifted down by the slots left out)."""
        size = cache.slots
        used = sorted(cache.slot_of[e] for e in group) or [0]
        index = torch.tensor(used, dtype=torch.long)
        remap = torch.full((size,), -1, dtype=torch.int32)
        remap[index] = torch.arange(len(used), dtype=torch.int32)
        table = combined.long()
        cached = remap.to(table.device)[table.clamp(0, size - 1)]
        table = torch.where(table < 0, -1, torch.where(table < size, cached, table - size + len(used)))

        def widened(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.index_select(0, index.to(t.device)).to(self.compute_dtype)

        seg = cache.segment
        segment = Segment(0, widened(seg.up), widened(seg.down), widened(seg.up_bias), widened(seg.down_bias))
        chunks = [
            Segment(c.start - num_experts + len(used), c.up, c.down, c.up_bias, c.down_bias) for c in adapter
        ]
        return table.to(torch.int32), [segment, *chunks]
