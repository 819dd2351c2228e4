"""The fast tier of one MoE layer: ``slots`` expert slots, an expert -> slot map and its policy.

    needed experts of a step ──> one pass if they fit the slots, else passes of half the slots
        (resident ones first); per pass: hits stay, misses take a free slot or evict the policy's
        victim (never an expert of this pass or the one computing), loads go to the loader at
        priority 0 (the next pass's while the current one computes) and are waited on
    predicted experts ──> loaded at priority 1 into free or evictable slots (never the current pass)

:class:`SlotMap` is the bookkeeping alone (the trace simulator replays it without weights);
:class:`LayerCache` adds the slot tensors ``[slots, ...]`` per fused parameter and the reads.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from ...models.discovery import MoELayer
from ...ops.experts_mm import Segment
from .policies import EvictionPolicy
from .store import ExpertStore, PendingRead

__all__ = ["LayerCache", "OffloadStats", "PhaseStats", "SlotMap"]


_COUNTERS = ("hits", "misses", "prefetches", "prefetch_hits", "bytes_read", "stall_s", "passes")


@dataclass
class OffloadStats:
    """Counters summed over layers.

    Attributes:
        hits: needed experts found resident (or already being loaded by a prefetch).
        misses: needed experts loaded on demand.
        prefetches: loads issued by a prefetcher.
        prefetch_hits: needed experts that were resident because a prefetcher loaded them.
        bytes_read: bytes requested from the slow tier.
        stall_s: time the forward waited for reads.
        passes: expert passes run (more than one per layer when a batch needs more experts than slots).
        phases: the same counters split by the phase tag of the forwards that moved them
            (``"prefill"``, ``"decode"``: see :meth:`phase`).
    """

    hits: int = 0
    misses: int = 0
    prefetches: int = 0
    prefetch_hits: int = 0
    bytes_read: int = 0
    stall_s: float = 0.0
    passes: int = 0
    phases: dict[str, PhaseStats] = field(default_factory=dict, repr=False)

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    @property
    def prefetch_accuracy(self) -> float:
        """Share of prefetched experts that were used before being evicted."""
        return self.prefetch_hits / self.prefetches if self.prefetches else 0.0

    def counters(self) -> dict[str, int | float]:
        """The counters alone (no phases): a snapshot to subtract from a later one."""
        return {name: getattr(self, name) for name in _COUNTERS}

    @contextlib.contextmanager
    def phase(self, name: str, tokens: int = 0) -> Iterator[PhaseStats]:
        """Count what the block moves under ``name`` as well (``phases[name]``), with its wall time.

        The serving engine tags every forward: ``"prefill"`` (prompts, including the base-model
        forward of adapter ``"auto"`` and ``prompt_logits``) and ``"decode"`` (one token per row),
        so a caller splits bytes read, misses and stalls between them::

            stats = engine.offload.stats
            stats.phases["prefill"].bytes_read, stats.phases["decode"].bytes_read
            stats.phases["decode"].seconds / stats.phases["decode"].tokens

        A phase gets the difference of the counters over the block: reads queued in the block
        (prefetches for later layers included), minus queued prefetches the block cancelled.
        ``tokens``: the real (unpadded) tokens the block's forward runs.
        """
        before, start = self.counters(), time.perf_counter()
        record = self.phases.setdefault(name, PhaseStats())
        try:
            yield record
        finally:
            record.seconds += time.perf_counter() - start
            record.forwards += 1
            record.tokens += tokens
            for key, value in self.counters().items():
                setattr(record, key, getattr(record, key) + value - before[key])

    def to_json(self) -> dict:
        out = {**self.counters(), "hit_rate": self.hit_rate, "prefetch_accuracy": self.prefetch_accuracy}
        if self.phases:
            out["phases"] = {name: record.to_json() for name, record in self.phases.items()}
        return out


@dataclass
class PhaseStats(OffloadStats):
    """:class:`OffloadStats` of the forwards run under one phase tag, with their count, tokens and time.

    Attributes:
        forwards: forwards run under the tag.
        tokens: real (unpadded) tokens they ran.
        seconds: their wall time (the model's forward, reads and stalls included).
    """

    forwards: int = 0
    tokens: int = 0
    seconds: float = 0.0

    def to_json(self) -> dict:
        return {
            **super().to_json(),
            "forwards": self.forwards,
            "tokens": self.tokens,
            "seconds": self.seconds,
        }


class SlotMap:
    """Which expert sits in which slot of one layer, decided by an eviction policy.

    Args:
        layer: decoder layer index (the policy's key).
        slots: slots in the fast tier.
        policy: eviction policy (shared by all layers).
        stats: counters to update.
    """

    def __init__(self, layer: int, slots: int, policy: EvictionPolicy, stats: OffloadStats) -> None:
        self.layer = layer
        self.slots = slots
        self.policy = policy
        self.stats = stats
        self.slot_of: dict[int, int] = {}
        self.expert_in: list[int | None] = [None] * slots
        self.prefetched: set[int] = set()

    def passes(self, needed: Sequence[int]) -> list[list[int]]:
        """Split a step's needed experts into groups, resident experts first.

        One group when they all fit the slots. Otherwise groups of half the slots, so that the next
        group's reads (see :meth:`schedule`) run while the current group computes.
        """
        if len(needed) <= self.slots:
            return [sorted(needed)]
        size = max(1, self.slots // 2)
        ordered = [e for e in needed if e in self.slot_of] + [e for e in needed if e not in self.slot_of]
        return [sorted(ordered[i : i + size]) for i in range(0, len(ordered), size)]

    def schedule(self, needed: Sequence[int]) -> Iterator[tuple[list[int], list[tuple[int, int]]]]:
        """The passes of a step, in order: ``(group, loads)`` with ``loads`` the reads to start.

        The first item acquires the first group. With :attr:`overlaps`, each later item acquires
        the next group while protecting the current one, and the consumer takes it before the
        current group computes (so the reads overlap the compute); without (one slot), after. The
        runtime and the trace simulator both walk this, so their counters agree.
        """
        groups = self.passes(needed)
        yield groups[0], self.acquire(groups[0])
        for current, nxt in zip(groups, groups[1:]):
            yield nxt, self.acquire(nxt, protect=current if self.overlaps else ())

    @property
    def overlaps(self) -> bool:
        """Whether two passes fit the slots at once (the next one loads while one computes)."""
        return self.slots >= 2

    def acquire(self, group: Sequence[int], protect: Sequence[int] = ()) -> list[tuple[int, int]]:
        """Make ``group`` resident; returns the ``(expert, slot)`` loads it needs (the misses).

        Experts of ``group`` and ``protect`` are never evicted for it.
        """
        loads, keep = [], set(group) | set(protect)
        for expert in sorted(group):
            if expert in self.slot_of:
                self.stats.hits += 1
                if expert in self.prefetched:
                    self.stats.prefetch_hits += 1
                    self.prefetched.discard(expert)
            else:
                self.stats.misses += 1
                loads.append((expert, self._place(expert, keep)))
        self.policy.access(self.layer, sorted(group))
        return loads

    def prefetch(self, experts: Sequence[int], protect: Sequence[int] = ()) -> list[tuple[int, int]]:
        """Place predicted experts where room allows; returns their ``(expert, slot)`` loads."""
        keep = set(protect) | set(experts)
        loads = []
        for expert in experts:
            if expert in self.slot_of:
                continue
            if None not in self.expert_in and not any(e not in keep for e in self.slot_of):
                break
            loads.append((expert, self._place(expert, keep)))
            self.prefetched.add(expert)
            self.stats.prefetches += 1
        return loads

    def warm(self) -> list[tuple[int, int]]:
        """Place the policy's pinned experts (at start); returns their loads."""
        pins = [e for e in self.policy.pinned(self.layer) if e not in self.slot_of][: self.slots]
        return [(e, self._place(e, set(pins))) for e in pins]

    def _place(self, expert: int, protect: set[int]) -> int:
        if None in self.expert_in:
            slot = self.expert_in.index(None)
        else:
            candidates = [e for e in self.slot_of if e not in protect]
            if not candidates:
                raise RuntimeError(f"layer {self.layer}: no evictable slot (all {self.slots} slots in use)")
            victim = self.policy.victim(self.layer, candidates)
            slot = self.slot_of.pop(victim)
            self._moved(victim, None)
            self.policy.evict(self.layer, victim)
            self.prefetched.discard(victim)
            self._reuse(slot)
        self.slot_of[expert] = slot
        self.expert_in[slot] = expert
        self._moved(expert, slot)
        self.policy.insert(self.layer, expert)
        return slot

    def drop(self, expert: int) -> None:
        """Forget an expert whose load failed (its slot becomes free)."""
        slot = self.slot_of.pop(expert, None)
        if slot is not None:
            self.expert_in[slot] = None
            self._moved(expert, None)
            self.policy.evict(self.layer, expert)
            self.prefetched.discard(expert)

    def _reuse(self, slot: int) -> None:
        """Called before an evicted expert's slot is given to another expert."""

    def _moved(self, expert: int, slot: int | None) -> None:
        """Called when an expert gets a slot (or loses it: ``None``)."""


class LayerCache(SlotMap):
    """Expert slots of one MoE layer, filled from the slow tier through the loader.

    Args:
        layer: the MoE layer (its fused parameters are not materialized).
        store: the slow tier: an ``ExpertStore`` (disk) or a ``HostStore`` (host memory).
        slots: slots in the fast tier.
        policy: eviction policy.
        stats: counters.
        loader: an ``ExpertLoader`` (disk) or a ``HostCopier`` (host memory).
        device: where the slots live (the compute device).
    """

    def __init__(
        self,
        layer: MoELayer,
        store: ExpertStore,
        slots: int,
        policy: EvictionPolicy,
        stats: OffloadStats,
        loader,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__(layer.index, slots, policy, stats)
        self.moe_layer = layer
        self.store = store
        self.loader = loader
        self.tensors = {
            name: torch.empty((slots, *shape), dtype=store.dtype, device=device)
            for name, shape in store.shapes[layer.index].items()
        }
        # slot -> (priority, [PendingRead]) of its outstanding reads
        self.tickets: dict[int, tuple[int, list[PendingRead]]] = {}
        # expert -> slot, or -1 (on the host: the executor indexes it with Python lists)
        self.slot_table = torch.full((layer.num_experts,), -1, dtype=torch.int32)
        names = layer.layout
        self.segment = Segment(
            start=0,
            up=self.tensors[names.up_name],
            down=self.tensors["down_proj"],
            up_bias=self.tensors.get(f"{names.up_name}_bias"),
            down_bias=self.tensors.get("down_proj_bias"),
        )

    def _moved(self, expert: int, slot: int | None) -> None:
        self.slot_table[expert] = -1 if slot is None else slot

    def resident_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def load(self, loads: list[tuple[int, int]], priority: int) -> None:
        """Queue the reads of ``(expert, slot)`` pairs."""
        for expert, slot in loads:
            reads = []
            for name, dest in self.tensors.items():
                read = self.store.submit(self.loader, self.layer, expert, name, dest[slot], priority)
                reads.append(read)
                self.stats.bytes_read += read.nbytes
            self.tickets[slot] = (priority, reads)

    def wait(self, group: Sequence[int]) -> None:
        """Wait for the reads of ``group``'s experts (already acquired)."""
        start = time.perf_counter()
        try:
            for expert in group:
                self._wait(expert)
        finally:
            self.stats.stall_s += time.perf_counter() - start

    def prefetch_load(self, experts: Sequence[int], protect: Sequence[int] = ()) -> None:
        self.load(self.prefetch(experts, protect), priority=1)

    def warm_load(self) -> None:
        self.load(self.warm(), priority=1)

    def _wait(self, expert: int) -> None:
        """Wait for an expert's reads; a failed prefetch is read again on demand, a failed demand read raises."""
        slot = self.slot_of[expert]
        priority, reads = self.tickets.pop(slot, (0, []))
        for read in reads:
            for ticket in read.tickets:
                self.loader.promote(ticket)
        error = self._finish(expert, reads)
        if error is not None and priority > 0:
            self.load([(expert, slot)], priority=0)
            error = self._finish(expert, self.tickets.pop(slot)[1])
        if error is not None:
            self.drop(expert)
            raise error

    def _finish(self, expert: int, reads: list[PendingRead]) -> OSError | None:
        """Wait for every ticket (even after a failure, so no read still writes into the slot), then
        convert the stored values to the compute dtype where they differ."""
        error = None
        try:
            for read in reads:
                for ticket in read.tickets:
                    try:
                        self.loader.wait(ticket)
                    except OSError as exc:
                        error = error or exc
        except BaseException:
            for read in reads:
                for ticket in read.tickets:
                    self.loader.cancel(ticket)
            self.drop(expert)
            raise
        if error is None:
            for read in reads:
                if read.finish is not None:
                    read.finish()
        return error

    def _reuse(self, slot: int) -> None:
        _, reads = self.tickets.pop(slot, (0, []))
        for read in reads:
            cancelled = [self.loader.cancel(ticket) for ticket in read.tickets]
            if all(cancelled):
                self.stats.bytes_read -= read.nbytes
            for ticket, done in zip(read.tickets, cancelled):
                if not done:
                    with contextlib.suppress(OSError):  # the expert is being evicted anyway
                        self.loader.wait(ticket)
