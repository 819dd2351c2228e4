"""The serving expert arena: base and adapter experts of each MoE layer in equal-sized slots.

    slots 0..E-1          the model's own fused expert parameters, used in place (never copied)
    slots E..S-1          adapters' tuned experts, in chunk tensors appended as the arena grows
    slot table [A, E]     row 0 = the base model (e -> e); row a = one adapter: e -> its slot if it
                          tuned e, else e. Every adapter owns the same row in every layer.

Loading an adapter takes free slots first (left by unloaded adapters) and appends, per layer, one
chunk with exactly the missing number of slots; a layer left with more than ``max_chunks`` chunks is
repacked into one exact chunk (each chunk is one more grouped-GEMM segment per forward). Unloading
frees its slots (kept for the next load) and its row. All slots of a layer have one shape, so there
is no padding per adapter and no fragmentation: memory held is the base model plus the live tuned
experts, plus any free slots, which :meth:`ExpertArena.trim` (drop entirely free chunks) or
:meth:`ExpertArena.compact` (repack into one exact chunk per layer) give back.
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from ..errors import AdapterError
from ..models import MoEModelInfo
from ..models.discovery import MoELayer
from ..models.weights import expert_segment, fuse_slices
from ..ops.experts_mm import Segment


class TunedExperts(Protocol):
    """What the arena takes from an adapter: its checked tuned experts.

    Attributes:
        experts: ``(layer, expert) -> {classic tensor name: tensor}`` (e.g. an ESFT adapter after
            its check against the served model).
    """

    experts: dict[tuple[int, int], dict[str, torch.Tensor]]


__all__ = ["ArenaMemory", "ExpertArena", "LayerSlots"]

BASE_OWNER = 0


def _segment_tensors(seg: Segment) -> list[torch.Tensor]:
    return [t for t in (seg.up, seg.down, seg.up_bias, seg.down_bias) if t is not None]


class LayerSlots:
    """Slot pool and slot table of one MoE layer.

    Args:
        layer: the MoE layer.
        base: segment 0, the base experts as slots ``0..E-1`` (default: the layer's own fused
            parameters); adapter chunks take its shape, dtype and device.
    """

    def __init__(self, layer: MoELayer, base: Segment | None = None) -> None:
        self.layer = layer
        self.num_experts = layer.num_experts
        self.base = base or expert_segment(layer)
        self.chunks: list[Segment] = []
        self.free: list[int] = []  # min-heap of free adapter slots
        self.table = torch.arange(self.num_experts, dtype=torch.int32, device=self.base.up.device)[None]
        self.segments: list[Segment] = [self.base]

    @property
    def num_slots(self) -> int:
        """Slots ``S`` (base + every chunk), the group count of the grouped GEMM."""
        return self.num_experts + sum(chunk.size for chunk in self.chunks)

    @property
    def held_slots(self) -> int:
        """Adapter slots held in chunks, live or free."""
        return self.num_slots - self.num_experts

    def slot_bytes(self) -> int:
        """Bytes of the chunk tensors (adapter slots only; the base is the model's)."""
        return sum(t.numel() * t.element_size() for chunk in self.chunks for t in _segment_tensors(chunk))

    def ensure_rows(self, rows: int) -> None:
        """Grow the table to ``rows`` owners; new rows are the identity (base experts)."""
        if rows > self.table.shape[0]:
            extra = self.table[:1].expand(rows - self.table.shape[0], -1)
            self.table = torch.cat([self.table, extra]).contiguous()

    def allocate(self, count: int) -> list[int]:
        """Take ``count`` slots: free ones first, then one new chunk of exactly the rest."""
        taken = [heapq.heappop(self.free) for _ in range(min(count, len(self.free)))]
        missing = count - len(taken)
        if missing:
            start = self.num_slots
            self.chunks.append(self._new_chunk(start, missing))
            self.segments = [self.base, *self.chunks]
            taken += range(start, start + missing)
        return taken

    def _new_chunk(self, start: int, size: int) -> Segment:
        def empty(like: torch.Tensor | None) -> torch.Tensor | None:
            if like is None:
                return None
            return torch.empty((size, *like.shape[1:]), dtype=like.dtype, device=like.device)

        base = self.base
        return Segment(start, empty(base.up), empty(base.down), empty(base.up_bias), empty(base.down_bias))

    def _chunk_of(self, slot: int) -> Segment:
        starts = [chunk.start for chunk in self.chunks]
        chunk = self.chunks[bisect.bisect_right(starts, slot) - 1]
        if not (self.num_experts <= slot < chunk.start + chunk.size):
            raise IndexError(f"layer {self.layer.index}: slot {slot} is not an adapter slot")
        return chunk

    def write(self, slot: int, fused: dict[str, torch.Tensor]) -> None:
        """Copy one expert's fused slices (``{param name: slice}``) into an adapter slot."""
        chunk, layout = self._chunk_of(slot), self.layer.layout
        pos = slot - chunk.start
        targets = {layout.up_name: chunk.up, "down_proj": chunk.down}
        if layout.has_bias:
            targets.update({f"{layout.up_name}_bias": chunk.up_bias, "down_proj_bias": chunk.down_bias})
        with torch.no_grad():
            for name, target in targets.items():
                value = fused[name]
                if tuple(value.shape) != tuple(target.shape[1:]):
                    raise AdapterError(
                        f"layer {self.layer.index}: {name} slice of shape {tuple(value.shape)} does not fit "
                        f"a slot of shape {tuple(target.shape[1:])}"
                    )
                target[pos].copy_(value)

    def set_row(self, owner: int, slots: dict[int, int]) -> None:
        """Point ``owner``'s row at its slots (``{expert id: slot}``); other experts stay base."""
        row = torch.arange(self.num_experts, dtype=torch.int32)
        for expert, slot in slots.items():
            row[expert] = slot
        self.table[owner] = row.to(self.table.device)

    def reset_row(self, owner: int) -> None:
        self.table[owner] = self.table[BASE_OWNER]

    def release(self, slots: list[int]) -> None:
        """Return slots to the free list (the next allocation takes them first)."""
        for slot in slots:
            heapq.heappush(self.free, slot)

    def trim(self) -> dict[int, int]:
        """Drop the chunks whose slots are all free; the slots after them move down.

        Returns:
            ``{old slot: new slot}`` for every adapter slot still held.
        """
        free = set(self.free)
        dropped = [c for c in self.chunks if all(s in free for s in range(c.start, c.start + c.size))]
        if not dropped:
            return {s: s for s in range(self.num_experts, self.num_slots)}
        mapping, shift = {}, 0
        for chunk in self.chunks:
            if any(chunk is d for d in dropped):
                shift += chunk.size
                continue
            for slot in range(chunk.start, chunk.start + chunk.size):
                mapping[slot] = slot - shift
            chunk.start -= shift
        self._renumber(mapping)
        self.chunks = [c for c in self.chunks if not any(c is d for d in dropped)]
        self.free = [mapping[s] for s in self.free if s in mapping]
        heapq.heapify(self.free)
        self.segments = [self.base, *self.chunks]
        return mapping

    def _renumber(self, mapping: dict[int, int]) -> None:
        """Rewrite the slot table through ``{old adapter slot: new}`` (base slots unchanged)."""
        lookup = torch.arange(self.num_slots, dtype=torch.int32)
        for old, new in mapping.items():
            lookup[old] = new
        self.table = lookup.to(self.table.device)[self.table.long()]

    def compact(self) -> dict[int, int]:
        """Repack the live adapter slots into one chunk of exactly their number.

        Returns:
            ``{old slot: new slot}`` for every live adapter slot.
        """
        free = set(self.free)
        live = [s for s in range(self.num_experts, self.num_slots) if s not in free]
        if len(self.chunks) <= 1 and not free:
            return {s: s for s in live}
        mapping = {old: self.num_experts + i for i, old in enumerate(live)}
        new = self._new_chunk(self.num_experts, len(live)) if live else None
        if new is not None:
            with torch.no_grad():
                for i, old in enumerate(live):
                    chunk = self._chunk_of(old)
                    for src, dst in zip(_segment_tensors(chunk), _segment_tensors(new)):
                        dst[i].copy_(src[old - chunk.start])
        self._renumber(mapping)
        self.chunks = [new] if new is not None else []
        self.free = []
        self.segments = [self.base, *self.chunks]
        return mapping


@dataclass(frozen=True)
class ArenaMemory:
    """What the arena holds beyond the base model (summed over layers).

    Attributes:
        adapters: loaded adapters.
        live_slots: adapter slots in use.
        free_slots: adapter slots held but unused (reused by the next load).
        slot_bytes: bytes of all adapter slots (chunk tensors).
        live_bytes: bytes of the live slots (the tuned experts' own size).
        table_bytes: bytes of the slot tables.
        chunks: chunk tensors (segments beyond the base, summed over layers).
    """

    adapters: int
    live_slots: int
    free_slots: int
    slot_bytes: int
    live_bytes: int
    table_bytes: int
    chunks: int

    @property
    def held_bytes(self) -> int:
        """Everything the arena adds to the base model."""
        return self.slot_bytes + self.table_bytes


class ExpertArena:
    """Per-layer slot pools and the owner ids of the loaded adapters.

    Args:
        info: the model's MoE layers (the base weights are used in place).
        max_chunks: when a load leaves a layer with more chunks than this, the layer is repacked
            into one exact-size chunk (a copy of that layer's adapter slots only). Every chunk is one
            more segment, i.e. more grouped-GEMM calls per forward; 1 (the default) keeps the
            forward at base + one segment. None never repacks (loads copy nothing but the new experts).
        base_segment: segment 0 of a layer (default: its own fused parameters); an offload tier
            gives its cache slots, whose shape, dtype and device the adapter chunks then take.
    """

    def __init__(
        self,
        info: MoEModelInfo,
        *,
        max_chunks: int | None = 1,
        base_segment: Callable[[MoELayer], Segment] | None = None,
    ) -> None:
        self.info = info
        self.max_chunks = max_chunks
        self.layers: dict[int, LayerSlots] = {
            layer.index: LayerSlots(layer, base_segment(layer) if base_segment else None)
            for layer in info.layers
        }
        self._owners: dict[str, int] = {}
        self._free_owners: list[int] = []
        self._num_rows = 1
        self._slots: dict[str, dict[int, list[int]]] = {}  # name -> layer -> slots, in expert order

    @property
    def names(self) -> list[str]:
        """Loaded adapter names, in load order."""
        return list(self._owners)

    def owner(self, name: str | None) -> int:
        """Row of ``name`` in every slot table (``None`` is the base model, row 0).

        Raises:
            AdapterError: no adapter of that name is loaded.
        """
        if name is None:
            return BASE_OWNER
        try:
            return self._owners[name]
        except KeyError:
            loaded = ", ".join(self._owners) or "none"
            raise AdapterError(f"adapter '{name}' is not loaded (loaded: {loaded})") from None

    def check_new_name(self, name: str) -> None:
        """Refuse a name that is empty or already loaded (the one place names are checked)."""
        if not name:
            raise AdapterError("adapter name must not be empty")
        if name in self._owners:
            raise AdapterError(f"adapter '{name}' is already loaded")

    def add(self, name: str, adapter: TunedExperts) -> int:
        """Load a checked adapter's tuned experts into free or new slots.

        Args:
            name: the name requests use.
            adapter: tuned experts checked against this model (an ESFT adapter after its check).

        Returns:
            The adapter's owner id.

        Raises:
            AdapterError: the name is taken, or the adapter changes weights other than routed
                experts (shared experts, attention, ...), which cannot differ per request in one batch.
        """
        self.check_new_name(name)
        if adapter.others:
            key = sorted(adapter.others)[0]
            raise AdapterError(
                f"{adapter.path}: {key}: tunes shared-expert or non-expert weights, which are not servable "
                "in a mixed batch (only routed experts can differ per request; merge it into the model instead)"
            )
        by_layer: dict[int, list[int]] = {}
        for layer_index, expert in adapter.experts:
            by_layer.setdefault(layer_index, []).append(expert)
        owner = heapq.heappop(self._free_owners) if self._free_owners else self._num_rows
        self._num_rows = max(self._num_rows, owner + 1)
        taken: dict[int, list[int]] = {}
        try:
            for layer_index, experts in sorted(by_layer.items()):
                slots = self.layers[layer_index]
                experts.sort()
                taken[layer_index] = slots.allocate(len(experts))
                for expert, slot in zip(experts, taken[layer_index]):
                    fused = fuse_slices(slots.layer.layout, adapter.experts[(layer_index, expert)])
                    slots.write(slot, fused)
                if self.max_chunks is not None and len(slots.chunks) > self.max_chunks:
                    mapping = slots.compact()
                    self._apply({layer_index: mapping})
                    taken[layer_index] = [mapping[s] for s in taken[layer_index]]
            for layer_index, slots in self.layers.items():
                slots.ensure_rows(self._num_rows)
                ids = sorted(by_layer.get(layer_index, []))
                slots.set_row(owner, dict(zip(ids, taken.get(layer_index, []))))
        except BaseException:
            self._release(owner, taken)
            raise
        self._owners[name] = owner
        self._slots[name] = taken
        return owner

    # routed-LoRA adapters ---------------------------------------------------------------------

    def add_owner(self, name: str) -> int:
        """Give an adapter without tuned experts (routed LoRA) an owner row mapping every expert to
        the base expert; :meth:`remove` frees it like any other.

        Raises:
            AdapterError: the name is empty or taken.
        """
        self.check_new_name(name)
        owner = heapq.heappop(self._free_owners) if self._free_owners else self._num_rows
        self._num_rows = max(self._num_rows, owner + 1)
        for slots in self.layers.values():
            slots.ensure_rows(self._num_rows)
            slots.set_row(owner, {})
        self._owners[name] = owner
        self._slots[name] = {}
        return owner

    # ----------------------------------------------------------------------------------------

    def remove(self, name: str) -> None:
        """Unload an adapter: free its slots and its owner row.

        Raises:
            AdapterError: no adapter of that name is loaded.
        """
        owner = self.owner(name)
        del self._owners[name]
        self._release(owner, self._slots.pop(name))

    def _release(self, owner: int, taken: dict[int, list[int]]) -> None:
        for layer_index, slots in self.layers.items():
            if slots.table.shape[0] > owner:
                slots.reset_row(owner)
            if taken.get(layer_index):
                slots.release(taken[layer_index])
        heapq.heappush(self._free_owners, owner)

    def trim(self) -> None:
        """Give back the chunks left entirely free by unloaded adapters (slots renumbered)."""
        self._apply({index: slots.trim() for index, slots in self.layers.items()})

    def compact(self) -> None:
        """Repack every layer's live adapter slots into one exact-size chunk (one segment)."""
        self._apply({index: slots.compact() for index, slots in self.layers.items()})

    def _apply(self, mappings: dict[int, dict[int, int]]) -> None:
        """Renumber the recorded slots of every loaded adapter (``{layer: {old: new}}``)."""
        for taken in self._slots.values():
            for layer_index, slots in taken.items():
                if layer_index in mappings:
                    taken[layer_index] = [mappings[layer_index][s] for s in slots]

    def slots_of(self, name: str) -> dict[int, list[int]]:
        """``{layer: slots}`` held by an adapter (in expert-id order)."""
        self.owner(name)
        return {layer: list(slots) for layer, slots in self._slots[name].items()}

    def memory(self) -> ArenaMemory:
        """Memory accounting over all layers."""
        live = sum(len(s) for taken in self._slots.values() for s in taken.values())
        live_bytes = sum(
            len(s) * self.layers[layer].layer.expert_bytes
            for taken in self._slots.values()
            for layer, s in taken.items()
        )
        return ArenaMemory(
            adapters=len(self._owners),
            live_slots=live,
            free_slots=sum(len(slots.free) for slots in self.layers.values()),
            slot_bytes=sum(slots.slot_bytes() for slots in self.layers.values()),
            live_bytes=live_bytes,
            table_bytes=sum(s.table.numel() * s.table.element_size() for s in self.layers.values()),
            chunks=sum(len(slots.chunks) for slots in self.layers.values()),
        )
