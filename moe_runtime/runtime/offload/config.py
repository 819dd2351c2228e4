"""Offloading settings and the expert budget (a share of routed experts, a byte size, or a share of the
fast tier's free memory), resolved to expert slots per layer against the fast tier's device."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ...errors import UsageError
from ...models import MoEModelInfo
from ...models.discovery import MoELayer
from .policies import POLICIES, PREFETCHERS

__all__ = [
    "OffloadConfig",
    "Budget",
    "BudgetError",
    "chunk_tokens_for",
    "fast_tier_slots",
    "free_memory",
    "parse_budget",
    "slots_per_layer",
]

TIERS = ("disk", "cpu")
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS.update({"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40})


@dataclass(frozen=True)
class Budget:
    """Fast-tier budget: ``share`` of every layer's routed experts, ``bytes`` over all layers, or
    ``free_share`` of the fast tier's free memory when the model is loaded (exactly one is set)."""

    share: float | None = None
    bytes: int | None = None
    free_share: float | None = None

    def __str__(self) -> str:
        if self.free_share is not None:
            return f"{self.free_share * 100:g}%free"
        return f"{self.share * 100:g}%" if self.share is not None else f"{self.bytes} bytes"


class BudgetError(UsageError):
    """A malformed budget; ``detail`` is the message without the word naming the option."""

    def __init__(self, detail: str) -> None:
        super().__init__(f"budget {detail}")
        self.detail = detail


def parse_budget(value: str | float | int | Budget) -> Budget:
    """``"25%"`` / ``0.25`` -> a share; ``"2GB"``, ``"512MiB"``, ``1000000`` (int) -> bytes;
    ``"80%free"`` -> a share of the fast tier's free memory (see :func:`fast_tier_slots`).

    Parse once, where the value enters (a command-line flag, a config), and pass the Budget on.

    Raises:
        BudgetError: malformed, or a share outside (0, 100%].
    """
    if isinstance(value, Budget):
        if sum(v is not None for v in (value.share, value.bytes, value.free_share)) != 1:
            raise BudgetError(f"{value!r}: a Budget takes exactly one of share, bytes or free_share")
        for share in (value.share, value.free_share):
            if share is not None and not 0 < share <= 1:
                raise BudgetError(f"{share!r}: a share must lie in (0%, 100%]")
        if value.bytes is not None and value.bytes <= 0:
            raise BudgetError(f"{value.bytes}: must be positive")
        return value
    if isinstance(value, bool):
        raise BudgetError(f"{value}: expected a share like 25% or a size like 2GB")
    if isinstance(value, float):
        share = value
    elif isinstance(value, int):
        if value <= 0:
            raise BudgetError(f"{value}: must be positive")
        return Budget(bytes=value)
    else:
        text = str(value).strip().lower().replace(" ", "")
        if text.endswith("%free"):
            try:
                free_share = float(text[: -len("%free")]) / 100
            except ValueError:
                raise BudgetError(f"'{value}': expected a share of free memory like 80%free") from None
            if not (0 < free_share <= 1):
                raise BudgetError(f"'{value}': a share of free memory must lie in (0%, 100%]")
            return Budget(free_share=free_share)
        if text.endswith("%"):
            try:
                share = float(text[:-1]) / 100
            except ValueError:
                raise BudgetError(f"'{value}': expected a share like 25% or a size like 2GB") from None
        else:
            match = re.fullmatch(r"(\d+(?:\.\d+)?)([kmgt]i?b|b)?", text)
            if not match:
                raise BudgetError(f"'{value}': expected a share like 25% or a size like 2GB")
            size = int(float(match[1]) * _UNITS[match[2] or ""])
            if size <= 0:
                raise BudgetError(f"'{value}': must be at least one byte (or a share like 25%)")
            return Budget(bytes=size)
    if not (0 < share <= 1):
        raise BudgetError(f"'{value}': a share must lie in (0%, 100%]")
    return Budget(share=share)


def slots_per_layer(info: MoEModelInfo, budget: Budget) -> int:
    """Expert slots every MoE layer gets (the same number in each layer).

    A ``free_share`` budget needs the fast tier's free memory: use :func:`fast_tier_slots`.

    Raises:
        UsageError: the budget holds fewer experts per layer than one token needs (top-k).
    """
    if budget.free_share is not None:
        raise ValueError("a share of free memory is resolved by fast_tier_slots, which knows the device")
    num_experts = min(layer.num_experts for layer in info.layers)
    if budget.share is not None:
        slots = max(1, math.floor(budget.share * num_experts + 1e-9))
    else:
        per_slot = sum(layer.expert_bytes for layer in info.layers)
        slots = min(budget.bytes // per_slot, num_experts)
    top_k = max(layer.top_k for layer in info.layers)
    if slots < top_k:
        raise UsageError(
            f"expert budget {budget}: {slots} expert(s) per layer, fewer than one token's working set "
            f"(top-k = {top_k}); give at least {math.ceil(top_k / num_experts * 100)}% "
            f"or {top_k * sum(layer.expert_bytes for layer in info.layers)} bytes"
        )
    return int(slots)


def free_memory(device: torch.device) -> int:
    """Bytes the fast tier can still take on ``device``.

    A GPU: the driver's free memory (``torch.cuda.mem_get_info``: device-wide, so other processes'
    use counts) plus what this process's caching allocator holds unused. The CPU: available RAM.
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    import psutil

    return int(psutil.virtual_memory().available)


def chunk_tokens_for(layer: MoELayer, dtype: torch.dtype, chunk_bytes: int) -> int:
    """Tokens of one chunk whose intermediates stay within ``chunk_bytes`` (at least 1).

    Per token: top-k routed entries, each holding its gathered input and its down output (``H``
    values each), its up output (``2I`` gated, else ``I``) and its activation (``I``), in ``dtype``.
    """
    hidden = layer.hidden_size
    experts = layer.experts
    up = getattr(experts, layer.layout.up_name)
    per_entry = 2 * hidden + (up[0].numel() + experts.down_proj[0].numel()) // hidden
    per_token = max(1, layer.top_k) * per_entry * torch.empty((), dtype=dtype).element_size()
    return max(1, chunk_bytes // per_token)


def fast_tier_slots(
    info: MoEModelInfo,
    budget: Budget,
    device: torch.device,
    free: Callable[[torch.device], int] | None = None,
) -> int:
    """Expert slots per layer for ``budget`` on the fast tier's ``device`` (``free``: :func:`free_memory`).

    A share of free memory (``80%free``) becomes that many bytes of ``free(device)``. On a GPU every
    budget must fit the free memory: slots that do not fit are refused here, with the numbers, rather
    than as an out-of-memory error in the middle of loading.

    Raises:
        UsageError: as :func:`slots_per_layer`, or the slots do not fit the GPU's free memory.
    """
    free = free or free_memory
    per_slot = sum(layer.expert_bytes for layer in info.layers)
    if budget.free_share is not None:
        available = free(device)
        size = int(budget.free_share * available)
        top_k = max(layer.top_k for layer in info.layers)
        if size // per_slot < top_k:
            raise UsageError(
                f"expert budget {budget}: {size} bytes of the {available} free on {device} hold "
                f"{size // per_slot} expert(s) per layer, fewer than one token's working set (top-k = {top_k})"
            )
        return slots_per_layer(info, Budget(bytes=size))
    slots = slots_per_layer(info, budget)
    if device.type == "cuda":
        available = free(device)
        if slots * per_slot > available:
            raise UsageError(
                f"expert budget {budget}: {slots} expert(s) per layer need {slots * per_slot} bytes on "
                f"{device}, which has {available} free; give a smaller budget (or a share of free memory, "
                "e.g. 80%free)"
            )
    return slots


@dataclass
class OffloadConfig:
    """How routed experts are offloaded.

    Attributes:
        tier: ``"disk"`` (experts read from the checkpoint files, fast tier RAM) or ``"cpu"``
            (every expert in host memory, page-locked with a GPU; fast tier the compute device:
            the GPU when there is one, else the CPU, where the tier saves no memory and serves to
            run the cache and policies without disk reads). See :mod:`.host`.
        budget: fast-tier budget (a string, share or byte count is parsed once, on construction;
            see :func:`parse_budget`).
        policy: eviction policy (``lru``, ``lfu``, ``profile``).
        prefetch: prefetchers to run (``router``, ``trajectory``).
        profile_scores: ``{layer: {expert: score}}`` for the ``profile`` policy.
        num_threads: loader reader threads.
        cache_dir: where a packed expert file goes (``pack``, or a layout no byte ranges express).
        pack: read the experts from a packed copy (one aligned record per expert, made once under
            ``cache_dir``) instead of the checkpoint's own files; costs the experts' bytes again on disk.
        compute_device: the ``cpu`` tier's compute device (``"cpu"``, ``"cuda"``, ``"cuda:1"``); None
            (the default) takes the current GPU when there is one, else the CPU. The ``disk`` tier
            computes on the CPU.
        compute_threads: torch intra-op threads while serving from the disk tier (the ``cpu``
            tier has no reader threads and leaves torch as is). ``"auto"``
            keeps one core free for the loader (at most the available cores minus one, never more
            than torch already uses): OpenMP compute threads spin at every barrier, so a compute
            thread pre-empted by a reader stalls all of them (measured here on 2 cores: 1 compute
            thread served about 10% faster than 2 on a quiet machine, and 2 compute threads ran 7x
            slower when other work shared the cores). ``None`` leaves torch as is.
        chunk_tokens: tokens of a layer's batch run through its experts at a time (within each pass,
            after its experts are read, so reads do not depend on it): bounds the intermediate
            activations of an offloaded MoE layer whatever the prompt length. None (the default)
            derives it per layer from ``chunk_bytes``.
        chunk_bytes: bound on one chunk's intermediates (``"256MiB"``, bytes): per token, top-k
            routed entries of about ``2H + 3I`` values in the compute dtype (gathered input, up and
            activation, down output); see :func:`chunk_tokens_for`.
        slot_dtype: ``"compute"`` (default): slots hold experts in the compute dtype, widened once as
            they are read. ``"storage"`` (disk tier): slots keep the checkpoint's narrower dtype (half
            the slot memory for bf16 stored, float32 computed) and each pass widens only its own
            experts into a temporary of the compute dtype; results are identical (widening is exact).
    """

    tier: str = "disk"
    budget: Budget | str | float | int = "25%"
    policy: str = "lru"
    prefetch: tuple[str, ...] = ()
    profile_scores: dict[int, dict[int, float]] | None = field(default=None, repr=False)
    num_threads: int = 2
    cache_dir: str | None = None
    pack: bool = False
    compute_threads: int | str | None = "auto"
    compute_device: str | None = None
    chunk_tokens: int | None = None
    chunk_bytes: int | str = "256MiB"
    slot_dtype: str = "compute"

    def __post_init__(self) -> None:
        self.budget = parse_budget(self.budget)
        if isinstance(self.chunk_bytes, str):
            size = parse_budget(self.chunk_bytes).bytes
            if size is None:
                raise UsageError(f"offload: chunk_bytes '{self.chunk_bytes}' must be a size like 256MiB")
            self.chunk_bytes = size
        if isinstance(self.prefetch, str):  # one prefetcher named alone
            self.prefetch = (self.prefetch,)
        self.prefetch = tuple(self.prefetch)

    def resolved_compute_threads(self) -> int | None:
        """The intra-op thread count to serve with, or None to leave torch's setting."""
        if self.compute_threads is None or self.tier != "disk":
            return None
        if self.compute_threads == "auto":
            try:
                cores = len(os.sched_getaffinity(0))
            except AttributeError:  # not Linux
                cores = os.cpu_count() or 1
            return max(1, min(torch.get_num_threads(), cores - 1))
        return int(self.compute_threads)

    def device(self) -> torch.device:
        """The compute device: the fast tier's slots and the resident weights live there."""
        if self.compute_device is not None:
            device = torch.device(self.compute_device)
            return (
                torch.device("cuda", torch.cuda.current_device())
                if device == torch.device("cuda")
                else device
            )
        if self.tier == "cpu" and torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def validate(self) -> None:
        """Raises UsageError on a bad tier, policy, prefetcher or budget."""
        if self.tier not in TIERS:
            raise UsageError(f"offload tier '{self.tier}': choose from {', '.join(TIERS)}")
        if self.policy not in POLICIES:
            raise UsageError(f"unknown cache policy '{self.policy}' (choose from {', '.join(POLICIES)})")
        for name in self.prefetch:
            if name not in PREFETCHERS:
                raise UsageError(f"unknown prefetcher '{name}' (choose from {', '.join(PREFETCHERS)})")
        if self.compute_device is not None:
            try:
                device = torch.device(self.compute_device)
            except RuntimeError:
                raise UsageError(f"offload: unknown compute device '{self.compute_device}'") from None
            if device.type not in ("cpu", "cuda") or (device.type == "cuda" and self.tier != "cpu"):
                raise UsageError(
                    f"offload: compute device '{self.compute_device}' with tier '{self.tier}': the disk tier "
                    "computes on the cpu, the cpu tier on the cpu or a cuda device"
                )
            if device.type == "cuda" and not torch.cuda.is_available():
                raise UsageError(f"offload: compute device '{self.compute_device}': CUDA is not available")
        if self.num_threads <= 0:
            raise UsageError("offload: num_threads must be positive")
        if self.chunk_tokens is not None and (
            isinstance(self.chunk_tokens, bool)
            or not isinstance(self.chunk_tokens, int)
            or self.chunk_tokens <= 0
        ):
            raise UsageError(
                f"offload: chunk_tokens must be a positive int or None, got {self.chunk_tokens!r}"
            )
        if (
            isinstance(self.chunk_bytes, bool)
            or not isinstance(self.chunk_bytes, int)
            or self.chunk_bytes <= 0
        ):
            raise UsageError(f"offload: chunk_bytes must be a positive size, got {self.chunk_bytes!r}")
        if self.slot_dtype not in ("compute", "storage"):
            raise UsageError(f"offload: slot dtype '{self.slot_dtype}': choose compute or storage")
        if self.slot_dtype == "storage" and self.tier != "disk":
            raise UsageError("offload: slots in the storage dtype go with the disk tier")
        if self.compute_threads not in (None, "auto") and (
            not isinstance(self.compute_threads, int) or self.compute_threads <= 0
        ):
            raise UsageError(
                f"offload: compute_threads must be a positive int, 'auto' or None, got {self.compute_threads!r}"
            )
