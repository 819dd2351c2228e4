"""The slow tier: where every routed expert lives on disk, and a model loaded without them.

    checkpoint safetensors ─(fused key [E, ...])──────────────> expert e = one byte range
                          ├─(per-expert keys that transformers stacks and concatenates:
                          │  experts.E.gate_proj + up_proj -> gate_up_proj[E])─> a few byte ranges
                          └─(a layout no byte ranges express, or pack=True)──> the packed copy
                                 (packed.py: one 4 KiB-aligned record per (layer, expert))
    a slice's ranges ──(loader, into the slot)──> widened in place when stored narrower (bf16 -> float32)

``load_offloaded_model`` builds the model on the meta device, loads every non-expert weight through
transformers' own key renaming and conversion (so every family's checkpoint names work), and leaves
the fused expert parameters on meta: they are never materialized.
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from ...errors import UsageError
from ...models import MoEModelInfo, find_moe_layers
from ...models.checkpoint_files import ShardHeader, check_shards
from ...ops.loader import widen_in_place

__all__ = [
    "ALIGN",
    "ByteRange",
    "ExpertStore",
    "PendingRead",
    "load_offloaded_model",
    "default_cache_dir",
    "widen_in_place",
]

ALIGN = 4096
_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass(frozen=True)
class ByteRange:
    """``nbytes`` at ``offset`` of the file ``path``."""

    path: str
    offset: int
    nbytes: int


@dataclass
class PendingRead:
    """Reads queued for one expert's slice of one parameter.

    Attributes:
        tickets: the loader's tickets (all must finish before ``finish`` runs).
        nbytes: bytes read from the slow tier (storage dtype).
        finish: run once the tickets finished without error: widens the stored values in place
            into the compute dtype (None when storage and compute dtypes agree).
    """

    tickets: list[int]
    nbytes: int
    finish: Callable[[], None] | None = None


@dataclass
class ExpertStore:
    """Where every routed expert of a model lives on disk, and the dtype it is served in.

    Expert ``e``'s slice of a fused parameter (e.g. ``gate_up_proj[e]``) is the bytes of its ranges
    read back to back: one range in a fused checkpoint or the packed file, several in a per-expert
    checkpoint (``gate_proj`` then ``up_proj`` of expert ``e``, wherever the hub put them).

    Attributes:
        ranges: ``{layer index: {param name: [ranges of expert 0, ranges of expert 1, ...]}}``.
        dtype: the compute dtype the slices are served in (slots, :meth:`read_expert`).
        shapes: ``{layer index: {param name: per-expert shape}}``.
        kind: ``"checkpoint"`` (byte ranges of the checkpoint's own files) or ``"packed"``.
        packed_path: the packed file, when one is used.
        storage_dtype: the dtype of the stored bytes (default ``dtype``); a narrower one is widened
            into the slot as it is read (see :func:`widen_in_place`).
    """

    ranges: dict[int, dict[str, list[tuple[ByteRange, ...]]]]
    dtype: torch.dtype
    shapes: dict[int, dict[str, tuple[int, ...]]]
    kind: str
    packed_path: Path | None = None
    storage_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        if self.storage_dtype is None:
            self.storage_dtype = self.dtype

    @property
    def widens(self) -> bool:
        """Whether stored values are converted as they are read."""
        return self.storage_dtype != self.dtype

    def files(self) -> list[str]:
        """The files the experts are read from."""
        return sorted(
            {r.path for layer in self.ranges.values() for p in layer.values() for e in p for r in e}
        )

    def read_expert(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        """One expert's fused slices in the compute dtype, read synchronously (``{param name: slice}``)."""
        return {name: self.read_raw(layer, expert, name).to(self.dtype) for name in self.ranges[layer]}

    def read_raw(self, layer: int, expert: int, name: str) -> torch.Tensor:
        """One expert's slice of ``name`` as stored (storage dtype)."""
        tensor = torch.empty(self.shapes[layer][name], dtype=self.storage_dtype)
        buffer = memoryview(tensor.view(-1).view(torch.uint8).numpy())
        done = 0
        for item in self.ranges[layer][name][expert]:
            with open(item.path, "rb", buffering=0) as f:
                got = os.preadv(f.fileno(), [buffer[done : done + item.nbytes]], item.offset)
            if got != item.nbytes:
                raise OSError(
                    f"{item.path}: short read at offset {item.offset} ({got} of {item.nbytes} bytes)"
                )
            done += item.nbytes
        return tensor

    def expert_bytes(self, layer: int) -> int:
        """Bytes read from disk for one expert of ``layer`` (storage dtype)."""
        return sum(r.nbytes for ranges in self.ranges[layer].values() for r in ranges[0])

    def submit(
        self, loader, layer: int, expert: int, name: str, dest: torch.Tensor, priority: int
    ) -> PendingRead:
        """Queue the reads of one expert's slice of ``name`` into ``dest`` (a slot, compute dtype)."""
        ranges = self.ranges[layer][name][expert]
        nbytes = sum(r.nbytes for r in ranges)
        if (
            self.widens
            and self.storage_dtype in (torch.bfloat16, torch.float16)
            and dest.dtype == torch.float32
            and len({r.path for r in ranges}) == 1
        ):  # one file: the loader's reader thread reads and widens
            spans = [(r.offset, r.nbytes) for r in ranges]
            ticket = loader.submit(ranges[0].path, spans, dest, priority, widen_from=self.storage_dtype)
            return PendingRead([ticket], nbytes)
        finish = None
        if not self.widens:
            raw = dest.view(-1).view(torch.uint8)
        elif torch.empty(0, dtype=self.storage_dtype).element_size() <= dest.element_size():
            # ranges in several files (a slice across a shard boundary): read into the slot's last
            # bytes, widened in place once all arrived
            raw = dest.view(-1).view(torch.uint8)
            raw = raw[raw.numel() - nbytes :]

            def finish() -> None:
                widen_in_place(dest, self.storage_dtype)
        else:  # narrowing (e.g. float32 stored, bf16 computed): through a buffer of the read's size
            staging = torch.empty(self.shapes[layer][name], dtype=self.storage_dtype)
            raw = staging.view(-1).view(torch.uint8)

            def finish() -> None:
                dest.copy_(staging)

        tickets, run, position = [], [], 0
        for item in [*ranges, None]:  # consecutive ranges of one file: one ticket
            if run and (item is None or item.path != run[0].path):
                size = sum(r.nbytes for r in run)
                target = raw[position : position + size]
                tickets.append(
                    loader.submit(run[0].path, [(r.offset, r.nbytes) for r in run], target, priority)
                )
                position += size
                run = []
            if item is not None:
                run.append(item)
        return PendingRead(tickets, nbytes, finish)


# checkpoint scanning -------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """Where packed expert files go: ``$MOE_RUNTIME_CACHE`` or ``~/.cache/moe_runtime``."""
    return Path(os.environ.get("MOE_RUNTIME_CACHE", Path.home() / ".cache" / "moe_runtime")) / "offload"


def stored_dtype(config, headers: list[ShardHeader]) -> torch.dtype:
    """The checkpoint's dtype: its config's, else its first floating tensor's."""
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(stored, torch.dtype):
        return stored
    if isinstance(stored, str) and isinstance(getattr(torch, stored, None), torch.dtype):
        return getattr(torch, stored)
    for header in headers:
        for entry in header.tensors.values():
            if entry["dtype"] in _ST_DTYPES:
                return _ST_DTYPES[entry["dtype"]]
    return torch.float32


def _resolve_dtype(config, headers: list[ShardHeader], dtype: torch.dtype | str | None) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype != "auto":
        return getattr(torch, dtype)
    return stored_dtype(config, headers)


class _Piece(NamedTuple):
    """One source of an expert's slice: its bytes, shape, stored dtype, and how many sources the slice has."""

    range: ByteRange
    shape: tuple[int, ...]
    dtype: torch.dtype
    count: int


@dataclass
class _ExpertKey:
    """A checkpoint tensor that feeds the experts of one layer."""

    key: str
    file: Path
    renamed: str
    source_pattern: str | None


def _per_expert_position(key: str, pattern: str, converter) -> tuple[int, int] | None:
    """``(expert, position)`` of a per-expert tensor whose converter only stacks experts and
    concatenates its sources along the expert's first dim (so the fused slice is the sources'
    bytes back to back), else None."""
    from transformers.core_model_loading import Concatenate, MergeModulelist

    ops = list(converter.operations)
    if not ops or not isinstance(ops[0], MergeModulelist) or ops[0].dim != 0:
        return None
    if any(not (isinstance(op, Concatenate) and op.dim == 1) for op in ops[1:]) or len(ops) > 2:
        return None
    if len(converter.source_patterns) > 1 and len(ops) != 2:
        return None
    regex = re.escape(pattern).replace(r"\*", r"(\d+)")
    match = re.search(regex, key)
    if match is None or not match.groups():
        return None
    return int(match.group(1)), list(converter.source_patterns).index(pattern)


def load_offloaded_model(
    model: str | Path,
    *,
    dtype: torch.dtype | str | None = None,
    cache_dir: str | Path | None = None,
    pack: bool = False,
) -> tuple[nn.Module, MoEModelInfo, ExpertStore]:
    """Load a causal LM with its routed experts left on disk (see :func:`_load_offloaded`).

    Raises:
        UsageError: not a loadable safetensors checkpoint (a shard missing or truncated), a weight
            is missing, or the experts cannot be mapped.
    """
    from safetensors import SafetensorError

    try:
        return _load_offloaded(model, dtype=dtype, cache_dir=cache_dir, pack=pack)
    except UsageError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError, struct.error) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise UsageError(f"model '{model}': cannot load for offloading ({first})") from exc


def _load_offloaded(
    model: str | Path,
    *,
    dtype: torch.dtype | str | None = None,
    cache_dir: str | Path | None = None,
    pack: bool = False,
) -> tuple[nn.Module, MoEModelInfo, ExpertStore]:
    """Load a causal LM with its routed experts left on disk.

    Non-expert weights (attention, norms, embeddings, routers, shared experts) are loaded into RAM
    in ``dtype``; the fused expert parameters stay on the meta device and an :class:`ExpertStore`
    says where each expert lives: byte ranges of the checkpoint's own files (fused tensors, or
    per-expert tensors that transformers stacks and concatenates), read and widened to ``dtype``
    on demand. Only a layout no byte ranges express (a transposed or interleaved conversion), or
    ``pack=True``, makes a packed copy of the experts (in the stored dtype).

    Args:
        model: a local checkpoint directory or ``demo``.
        dtype: compute dtype of every weight; default keeps the checkpoint's.
        cache_dir: where a packed expert file goes (default :func:`default_cache_dir`).
        pack: read the experts from a packed copy (one aligned record per expert), made once.

    Returns:
        ``(model, info, store)``.

    Raises:
        UsageError: not a safetensors checkpoint, a weight is missing, or the experts cannot be mapped.
    """
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import (
        WeightConverter,
        WeightRenaming,
        convert_and_load_state_dict_in_model,
        rename_source_key,
    )
    from transformers.modeling_utils import LoadStateDictConfig

    from ...models.loading import resolve_model_path
    from .packed import check_cache_dir, checkpoint_key, packed_ranges, write_packed

    path = resolve_model_path(model)
    headers = check_shards(path)
    files = [h.file for h in headers]
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    dtype = _resolve_dtype(config, headers, dtype)
    with torch.device("meta"):
        net = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if (path / "generation_config.json").is_file():  # as from_pretrained: it wins over config.json (eos)
        net.generation_config = GenerationConfig.from_pretrained(path, local_files_only=True)
    info = find_moe_layers(net)
    mapping = get_model_conversion_mapping(net)
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    pattern_to_converter = {p: c for c in converters for p in c.source_patterns}
    meta_state = net.state_dict()
    by_prefix = {f"{layer.experts_name}.": layer for layer in info.layers}
    shapes = {
        layer.index: {p: tuple(getattr(layer.experts, p).shape[1:]) for p in layer.layout.param_names()}
        for layer in info.layers
    }

    handles = [safe_open(str(h.file), framework="pt", device="cpu") for h in headers]
    # {layer: {param: {expert: {position in the slice: _Piece}}}}
    pieces: dict[int, dict[str, dict[int, dict[int, _Piece]]]] = {}
    keys: dict[int, list[_ExpertKey]] = {}
    rest = {}
    try:
        for header, handle in zip(headers, handles):
            file = header.file
            for key in handle.keys():  # noqa: SIM118 - a safetensors handle, not a dict
                renamed, pattern = rename_source_key(
                    key, renamings, converters, net.base_model_prefix, meta_state
                )
                layer = next((lay for p, lay in by_prefix.items() if renamed.startswith(p)), None)
                if layer is None:
                    rest[key] = handle.get_slice(key)
                    continue
                param = renamed[len(layer.experts_name) + 1 :]
                keys.setdefault(layer.index, []).append(_ExpertKey(key, file, renamed, pattern))
                entry = header.tensors[key]
                begin, end = entry["data_offsets"]
                stored = _ST_DTYPES.get(entry["dtype"])
                if param not in shapes[layer.index] or stored is None:
                    continue
                if pattern is None:  # a fused tensor: expert e is the e-th equal part
                    if tuple(entry["shape"]) != (layer.num_experts, *shapes[layer.index][param]):
                        continue
                    per = (end - begin) // layer.num_experts
                    for expert in range(layer.num_experts):
                        item = ByteRange(str(file), header.data_start + begin + expert * per, per)
                        slot = pieces.setdefault(layer.index, {}).setdefault(param, {}).setdefault(expert, {})
                        slot[0] = _Piece(item, tuple(entry["shape"][1:]), stored, 1)
                    continue
                found = _per_expert_position(key, pattern, pattern_to_converter[pattern])
                if found is None:
                    continue
                expert, position = found
                item = ByteRange(str(file), header.data_start + begin, end - begin)
                count = len(pattern_to_converter[pattern].source_patterns)
                slot = pieces.setdefault(layer.index, {}).setdefault(param, {}).setdefault(expert, {})
                slot[position] = _Piece(item, tuple(entry["shape"]), stored, count)
        load_config = LoadStateDictConfig(
            pretrained_model_name_or_path=str(path),
            device_map={"": "cpu"},
            dtype=dtype,
            dtype_plan=net._get_dtype_plan(dtype),
            weight_mapping=mapping,
        )
        loading_info, _ = convert_and_load_state_dict_in_model(net, rest, load_config)
        expert_params = {
            f"{layer.experts_name}.{p}" for layer in info.layers for p in layer.layout.param_names()
        }
        loading_info.missing_keys -= expert_params
        type(net)._finalize_model_loading(net, load_config, loading_info)
    finally:
        rest.clear()
        for handle in handles:
            handle.__exit__(None, None, None)
    missing = [n for n, p in list(net.named_parameters()) + list(net.named_buffers()) if p.is_meta]
    missing = [n for n in missing if n not in expert_params]
    if missing:
        raise UsageError(f"model '{model}': weight {missing[0]} is not in the checkpoint")
    ranges, storage = _direct_ranges(info, shapes, pieces)
    needs_pack = [layer for layer in info.layers if pack or layer.index not in ranges]
    packed_path = None
    if needs_pack:
        # the packed copy keeps the stored dtype (widened as it is read, like the checkpoint)
        pack_dtype = storage if storage is not None else stored_dtype(config, headers)
        cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        packed_path = cache / checkpoint_key(files, pack_dtype) / "experts.bin"
        packed = packed_ranges(packed_path, info, shapes, pack_dtype)
        if packed is None:
            check_cache_dir(packed_path.parent)
            direct = ExpertStore(
                ranges, pack_dtype, shapes, "checkpoint", storage_dtype=storage or pack_dtype
            )
            packed = write_packed(
                packed_path, net, info, shapes, pack_dtype, keys, direct, mapping, converters
            )
        ranges = {**ranges, **{layer.index: packed[layer.index] for layer in needs_pack}}
        storage = pack_dtype
    store = ExpertStore(
        ranges=ranges,
        dtype=dtype,
        shapes=shapes,
        kind="packed" if needs_pack else "checkpoint",
        packed_path=packed_path,
        storage_dtype=storage if storage is not None else dtype,
    )
    return net.eval(), info, store


def _direct_ranges(info: MoEModelInfo, shapes, pieces) -> tuple[dict, torch.dtype | None]:
    """The layers whose every expert slice is byte ranges of the checkpoint, and their storage dtype.

    A slice qualifies when all its sources were found and their shapes, stacked along the first
    dim, give the slice's shape (what Concatenate(dim=1) after MergeModulelist(dim=0) produces).
    A store has one storage dtype: layers stored in another one are left out (they get packed).
    """
    ranges, dtypes = {}, {}
    for layer in info.layers:
        params = pieces.get(layer.index, {})
        out, layer_dtypes = {}, set()
        for name, shape in shapes[layer.index].items():
            experts, per_expert = params.get(name, {}), []
            for expert in range(layer.num_experts):
                parts = experts.get(expert, {})
                count = next(iter(parts.values())).count if parts else 0
                if not parts or sorted(parts) != list(range(count)):
                    break
                ordered = [parts[i] for i in range(count)]
                if any(p.shape[1:] != tuple(shape[1:]) for p in ordered):
                    break
                if sum(p.shape[0] for p in ordered) != shape[0]:
                    break
                layer_dtypes.update(p.dtype for p in ordered)
                per_expert.append(_merge_adjacent([p.range for p in ordered]))
            else:
                out[name] = per_expert
        if set(out) == set(shapes[layer.index]) and len(layer_dtypes) == 1:
            ranges[layer.index] = out
            dtypes[layer.index] = layer_dtypes.pop()
    if not dtypes:
        return {}, None
    counts: dict[torch.dtype, int] = {}
    for value in dtypes.values():
        counts[value] = counts.get(value, 0) + 1
    storage = max(counts, key=counts.get)
    return {i: r for i, r in ranges.items() if dtypes[i] == storage}, storage


def _merge_adjacent(items: list[ByteRange]) -> tuple[ByteRange, ...]:
    """Join ranges where one ends where the next begins in the same file (gate then up, as written)."""
    out: list[ByteRange] = []
    for item in items:
        if out and out[-1].path == item.path and out[-1].offset + out[-1].nbytes == item.offset:
            out[-1] = ByteRange(item.path, out[-1].offset, out[-1].nbytes + item.nbytes)
        else:
            out.append(item)
    return tuple(out)
