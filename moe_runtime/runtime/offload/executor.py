"""Offloaded experts: every MoE layer runs from a cache of expert slots filled from disk.

    router -> top_k_index [T, K] (base ids)
           -> arena slot table [A, E]: (owner, expert) -> base expert e, or an adapter slot (resident)
           -> needed base experts -> cache.schedule: passes (hits stay, misses read at priority 0, waited on)
           -> prefetchers queue later layers' predicted experts (priority 1), overlapping this compute
           -> combined table: base e -> cache slot, adapter slot -> after the cache slots
           -> reroute_permute + segmented grouped GEMM over [cache slots | adapter chunks]

A batch that needs more distinct experts than the layer has slots runs in several passes (each
pass a group of half the slots, adapter experts in the first), whose outputs add up; the next
group's reads run while the current group computes.
Adapter experts stay resident in the multi-adapter arena; only base experts are offloaded.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
from torch import nn

from ...errors import UsageError
from ...models import state_of
from ...ops.experts_mm import Segment, segmented_experts
from ...ops.reroute import reroute_permute
from ..arena import ExpertArena, LayerSlots
from ..executor import OwnerRouting
from .cache import LayerCache, OffloadStats
from .config import OffloadConfig, fast_tier_slots, parse_budget
from .host import HostCopier, HostStore
from .policies import RouterPrefetcher, TrajectoryPrefetcher, make_policy
from .store import ExpertStore

__all__ = ["OffloadExecutor", "router_weights"]


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


class OffloadExecutor(OwnerRouting):
    """Runs every experts module of the arena's model from per-layer expert caches.

    Same interface as :class:`ReroutingExecutor` (owners per token, routed-LoRA terms, attach/detach).

    Args:
        arena: the model's expert arena (adapter experts; the base experts are not materialized).
        store: where the base experts live on disk.
        config: tier, budget, policy, prefetchers.
        loader: an ``ExpertLoader`` (default: a new one with ``config.num_threads`` threads); with
            the ``cpu`` tier it reads the experts into host memory once.
    """

    def __init__(self, arena: ExpertArena, store: ExpertStore, config: OffloadConfig, *, loader=None) -> None:
        from ...ops.loader import ExpertLoader

        config.validate()
        super().__init__(arena)
        threads = config.resolved_compute_threads()
        if threads is not None:
            torch.set_num_threads(threads)  # see OffloadConfig.compute_threads
        self.config = config
        info = arena.info
        self.device = config.device()
        self.num_slots = fast_tier_slots(info, parse_budget(config.budget), self.device)
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
        for index, slots in arena.layers.items():
            slots.base = self.caches[index].segment  # adapter chunks take the slots' shape and dtype
            if slots.table.is_meta:  # made beside the meta expert parameters: no adapter rows yet
                slots.table = (
                    torch.arange(slots.num_experts, dtype=torch.int32, device=self.device)[None]
                    .expand(slots.table.shape[0], -1)
                    .contiguous()
                )
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
        for cache in self.caches.values():
            cache.warm_load()

    # the ReroutingExecutor interface ----------------------------------------------------------

    def attach(self) -> None:
        for index, slots in self.arena.layers.items():
            state_of(slots.layer.experts).executor = functools.partial(self._run, self.caches[index], slots)

    def detach(self) -> None:
        for slots in self.arena.layers.values():
            state_of(slots.layer.experts).executor = None

    def close(self) -> None:
        """Detach and stop the loader threads."""
        self.detach()
        self.loader.close()

    # memory ----------------------------------------------------------------------------------

    def resident_expert_bytes(self) -> int:
        """Bytes of the cache slots (the base experts held in the fast tier)."""
        return sum(cache.resident_bytes() for cache in self.caches.values())

    def offloaded_bytes(self) -> int:
        """Bytes of all base routed experts (what a resident model would hold)."""
        return self.arena.info.routed_expert_bytes

    @contextlib.contextmanager
    def base_experts(self, experts: dict[int, list[int]]) -> Iterator[None]:
        """Temporarily give the experts modules real weights for the listed base experts.

        Adapter checks read the base experts they replace (fingerprint). The full-size tensors are
        allocated but only the listed experts' pages are written; the rest is never touched.
        """
        info = self.arena.info
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
        for layer in self.arena.info.layers:
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

    def _run(
        self,
        cache: LayerCache,
        slots: LayerSlots,
        experts: nn.Module,
        hidden: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
    ) -> torch.Tensor:
        """One layer: ``hidden [T, H]``, ``top_k_index [T, K]``, ``top_k_weights [T, K]`` -> ``[T, H]``."""
        if cache.layer == self._first:
            for prefetcher in self.prefetchers:
                prefetcher.end_step()
        owners = self.owners_for(cache.layer, hidden)
        num_experts = slots.num_experts
        table = slots.table  # [A, E]: base expert id, or an adapter slot >= E
        valid = (top_k_index >= 0) & (top_k_index < num_experts)
        logical = table[owners.unsqueeze(1), top_k_index.clamp(0, num_experts - 1)]
        base_ids = logical[valid & (logical < num_experts)]
        needed = torch.unique(base_ids).tolist()
        size = cache.slots
        chunks = [
            Segment(c.start - num_experts + size, c.up, c.down, c.up_bias, c.down_bias) for c in slots.chunks
        ]
        total_slots = size + slots.held_slots
        plan = cache.schedule(needed)

        def start() -> list[int] | None:
            """The next pass's experts, their reads queued (None after the last pass)."""
            item = next(plan, None)
            if item is None:
                return None
            cache.load(item[1], priority=0)
            return item[0]

        group, out, first = start(), None, True
        while group is not None:
            upcoming = start() if cache.overlaps else None  # its reads overlap this pass's compute
            cache.wait(group)
            if first:
                self._prefetch(cache.layer, hidden, base_ids)
            single = first and len(group) == len(needed)
            if single:  # every routed base expert is resident: the slot map as it stands
                slot_of = cache.slot_table
            else:
                slot_of = torch.full((num_experts,), -1, dtype=torch.int32)
                ids = torch.tensor(group, dtype=torch.int64)
                slot_of[ids] = cache.slot_table[ids]
            base = slot_of.to(table.device)[table.long().clamp(max=num_experts - 1)]
            if chunks:
                adapter = table - num_experts + size if first else torch.full_like(table, -1)
                combined = torch.where(table < num_experts, base, adapter)
            else:
                combined = base
            routed = reroute_permute(top_k_index, owners, combined, total_slots)
            partial = segmented_experts(experts, hidden, top_k_weights, routed, [cache.segment, *chunks])
            out = partial if out is None else out + partial
            self.stats.passes += 1
            group, first = (upcoming if cache.overlaps else start()), False
        return self.add_lora(cache.layer, out, hidden, top_k_index, top_k_weights)
