"""The ``cpu`` tier: every routed expert in host memory, a budget of them in the compute device's slots.

    checkpoint ──(ExpertLoader, once)──> HostStore: {layer: {param: [E, ...]}} in host memory
                                         (page-locked when CUDA is available)
    HostStore[layer][param][e] ──(HostCopier)──> LayerCache slot on the device

With a GPU the copies run on their own CUDA stream: each copy first waits for the work already
queued on the compute stream (a slot being overwritten may still be read by it), and records an
event; waiting for a copy makes the compute stream wait for that event (no host synchronization).
Without a GPU the compute device is the CPU: the slots are RAM like the store, a copy is a plain
``copy_`` done at once, and the tier serves as a faithful run of the cache, policies and prefetchers
with no disk involved (it saves no memory; use ``disk`` for that).

:class:`HostCopier` has the interface :class:`~moe_runtime.runtime.offload.cache.LayerCache` uses
of the :class:`~moe_runtime.ops.loader.ExpertLoader` (``submit``/``wait``/``promote``/``cancel``).
"""

from __future__ import annotations

import itertools

import torch
from tqdm.auto import tqdm

from ...models.discovery import MoEModelInfo
from .store import ExpertStore, PendingRead

__all__ = ["HostCopier", "HostStore", "move_resident"]


class HostStore:
    """Every routed expert of a model in host memory, read once from an :class:`ExpertStore`.

    Args:
        disk: where the experts are on disk.
        info: the model's MoE layers.
        loader: an ``ExpertLoader`` for the reads.
        pin: page-lock the host tensors (for asynchronous copies to a GPU).
    """

    def __init__(self, disk: ExpertStore, info: MoEModelInfo, loader, *, pin: bool = False) -> None:
        self.disk = disk
        self.dtype = disk.dtype
        self.shapes = disk.shapes
        self.tensors: dict[int, dict[str, torch.Tensor]] = {}
        layers = tqdm(
            list(disk.ranges), desc="experts to host memory", unit="layer", leave=False, disable=None
        )  # disable=None: no bar when stderr is not a terminal
        for layer in layers:
            count = info.by_index(layer).num_experts
            params = {
                name: torch.empty((count, *shape), dtype=disk.dtype, pin_memory=pin)
                for name, shape in disk.shapes[layer].items()
            }
            reads = [
                disk.submit(loader, layer, expert, name, tensor[expert], 0)
                for name, tensor in params.items()
                for expert in range(count)
            ]
            for read in reads:
                for ticket in read.tickets:
                    loader.wait(ticket)
                if read.finish is not None:
                    read.finish()
            self.tensors[layer] = params

    def read_expert(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        """One expert's fused slices (views of the host tensors)."""
        return {name: tensor[expert] for name, tensor in self.tensors[layer].items()}

    def expert_bytes(self, layer: int) -> int:
        return self.disk.expert_bytes(layer)

    def submit(
        self, copier, layer: int, expert: int, name: str, dest: torch.Tensor, priority: int
    ) -> PendingRead:
        """Queue the copy of one expert's slice of ``name`` into ``dest``."""
        source = self.tensors[layer][name][expert]
        return PendingRead([copier.submit(source, dest, priority)], source.numel() * source.element_size())


class HostCopier:
    """Copies host slices into device slots; the loader interface of the ``cpu`` tier.

    Args:
        device: the compute device (the slots' device).
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self._cuda = self.device.type == "cuda"
        self._stream = torch.cuda.Stream(device=self.device) if self._cuda else None
        self._events: dict[int, torch.cuda.Event] = {}
        self._tickets = itertools.count(1)

    def submit(self, source: torch.Tensor, dest: torch.Tensor, priority: int = 0) -> int:
        """Copy ``source`` into ``dest`` (asynchronously on a GPU); returns a ticket.

        Copies run in submission order; ``priority`` is accepted for the loader interface.
        """
        ticket = next(self._tickets)
        if self._cuda:
            self._stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._stream):
                dest.copy_(source, non_blocking=True)
                event = torch.cuda.Event()
                event.record(self._stream)
            self._events[ticket] = event
        else:
            dest.copy_(source)
        return ticket

    def wait(self, ticket: int, timeout_s: float | None = None) -> None:
        """Order the compute stream after the copy (GPU); a CPU copy is already done."""
        event = self._events.pop(ticket, None)
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    def promote(self, ticket: int, priority: int = 0) -> bool:
        return False  # copies already run in submission order

    def cancel(self, ticket: int) -> bool:
        return False  # a queued stream copy cannot be withdrawn; the next copy into the slot follows it

    def close(self) -> None:
        if self._cuda:
            self._stream.synchronize()
        self._events.clear()


def move_resident(model: torch.nn.Module, device: torch.device) -> None:
    """Move the materialized parameters and buffers of ``model`` to ``device`` (the meta experts stay)."""
    if device.type == "cpu":
        return
    for module in model.modules():
        for param in module._parameters.values():
            if param is not None and not param.is_meta:
                param.data = param.data.to(device)
        for name, buffer in module._buffers.items():
            if buffer is not None and not buffer.is_meta:
                module._buffers[name] = buffer.to(device)
