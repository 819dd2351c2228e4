"""The opt-in packed copy of the experts: one 4 KiB-aligned record per (layer, expert), parameters
back to back, in the stored dtype.

    checkpoint (byte ranges, or tensors converted as transformers loads them, one layer at a time)
        -> <cache>/<checkpoint key>/experts.bin (+ experts.json: the layout), written to a temporary
           name and renamed; reused while the checkpoint files and the layout are unchanged

Made when asked for (``OffloadConfig(pack=True)``, ``--pack-experts``) or when a layout cannot be
expressed as byte ranges of the checkpoint (a transposed or interleaved conversion).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ...errors import UsageError
from ...io import atomic_write_json
from ...models import MoEModelInfo
from ...models.discovery import MoELayer
from .store import ALIGN, ByteRange, ExpertStore

if TYPE_CHECKING:
    from .store import _ExpertKey

__all__ = ["check_cache_dir", "checkpoint_key", "packed_ranges", "write_packed"]

_PACK_VERSION = 2


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def checkpoint_key(files: list[Path], dtype: torch.dtype) -> str:
    digest = hashlib.sha256(f"v{_PACK_VERSION}|{dtype}".encode())
    for file in files:
        stat = file.stat()
        digest.update(f"|{file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:24]


def _layout_of_pack(info: MoEModelInfo, shapes, dtype: torch.dtype) -> dict:
    """Offsets of every (layer, param) in the packed file; one aligned record per expert."""
    itemsize = torch.empty(0, dtype=dtype).element_size()
    layers, offset = {}, 0
    for layer in info.layers:
        params, within = {}, 0
        for name in layer.layout.param_names():
            nbytes = itemsize * int(torch.Size(shapes[layer.index][name]).numel())
            params[name] = (within, nbytes)
            within = _align(within + nbytes)
        record = max(within, ALIGN)
        layers[layer.index] = {"offset": offset, "record": record, "params": params}
        offset += record * layer.num_experts
    return layers


def _as_ranges(
    path: Path, layout: dict, info: MoEModelInfo
) -> dict[int, dict[str, list[tuple[ByteRange, ...]]]]:
    return {
        index: {
            name: [
                (ByteRange(str(path), entry["offset"] + expert * entry["record"] + within, nbytes),)
                for expert in range(info.by_index(index).num_experts)
            ]
            for name, (within, nbytes) in entry["params"].items()
        }
        for index, entry in layout.items()
    }


def packed_ranges(path: Path, info: MoEModelInfo, shapes, dtype) -> dict | None:
    """Ranges in an existing, complete packed file for this checkpoint, else None."""
    index = path.with_suffix(".json")
    if not (path.exists() and index.exists()):
        return None
    layout = _layout_of_pack(info, shapes, dtype)
    try:
        stored = json.loads(index.read_text())
    except (OSError, ValueError):
        return None
    expected = {
        str(k): {**v, "params": {n: list(p) for n, p in v["params"].items()}} for k, v in layout.items()
    }
    if stored.get("layers") != expected:
        return None
    end = max(
        entry["offset"] + entry["record"] * info.by_index(index).num_experts
        for index, entry in layout.items()
    )
    if path.stat().st_size < end:  # cut short since it was written: made again
        return None
    return _as_ranges(path, layout, info)


def _layer_tensors(
    net: nn.Module, layer: MoELayer, keys: list[_ExpertKey], mapping, converters
) -> dict[str, torch.Tensor]:
    """One layer's fused expert parameters, converted exactly as transformers loads them."""
    from safetensors import safe_open
    from transformers.core_model_loading import WeightRenaming, dot_natural_key

    pattern_to_converter = {p: c for c in converters for p in c.source_patterns}
    pending: dict[str, object] = {}
    out: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[_ExpertKey]] = {}
    for item in keys:
        by_file.setdefault(item.file, []).append(item)
    loaded: list[tuple[_ExpertKey, torch.Tensor]] = []
    for file, items in by_file.items():
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            loaded += [(item, handle.get_tensor(item.key)) for item in items]
    loaded.sort(key=lambda pair: dot_natural_key(pair[0].key))
    for item, tensor in loaded:
        if item.source_pattern is None:
            pending.setdefault(item.renamed, WeightRenaming(item.key, item.renamed))
            pending[item.renamed].add_tensor(item.renamed, item.key, item.key, tensor)
        else:
            conv = pending.setdefault(item.renamed, copy.deepcopy(pattern_to_converter[item.source_pattern]))
            conv.add_tensor(item.renamed, item.key, item.source_pattern, tensor)
    loaded.clear()
    for first, conv in pending.items():
        for name, value in conv.convert(first, model=net, config=net.config).items():
            value = value[0] if isinstance(value, list) else value
            if name.startswith(f"{layer.experts_name}."):
                out[name[len(layer.experts_name) + 1 :]] = value
    return out


def check_cache_dir(directory: Path) -> None:
    """The packed file's directory must be creatable and writable (a cache problem, not the model's)."""
    from ...io import write_probe_error

    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        error = exc
    else:
        error = write_probe_error(directory)
    if error is not None:
        raise UsageError(
            f"offload cache '{directory}': cannot write the packed expert file there ({error.strerror or error}); "
            "set MOE_RUNTIME_CACHE (or OffloadConfig.cache_dir) to a writable directory"
        )


def write_packed(
    path: Path, net, info, shapes, dtype, keys, direct: ExpertStore, mapping, converters
) -> dict:
    """Write the packed expert file (layer by layer, in ``dtype``) and its index; returns its ranges.

    A layer the checkpoint holds as byte ranges is copied expert by expert; any other layer is
    converted as transformers loads it (one layer's experts in memory at a time).
    """
    layout = _layout_of_pack(info, shapes, dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    total = sum(entry["record"] * info.by_index(i).num_experts for i, entry in layout.items())
    try:
        with open(tmp, "wb") as f:
            f.truncate(total)
            for layer in info.layers:
                entry = layout[layer.index]
                if layer.index in direct.ranges:
                    for expert in range(layer.num_experts):
                        for name in layer.layout.param_names():
                            value = direct.read_raw(layer.index, expert, name).to(dtype)
                            within, _ = entry["params"][name]
                            f.seek(entry["offset"] + expert * entry["record"] + within)
                            f.write(memoryview(value.reshape(-1).view(torch.uint8).numpy()))
                    continue
                tensors = _layer_tensors(net, layer, keys.get(layer.index, []), mapping, converters)
                for name in layer.layout.param_names():
                    if name not in tensors:
                        raise UsageError(
                            f"cannot offload {layer.experts_name}.{name}: the checkpoint does not map to it"
                        )
                    value = tensors[name].to(dtype).contiguous()
                    if tuple(value.shape) != (layer.num_experts, *shapes[layer.index][name]):
                        raise UsageError(
                            f"cannot offload {layer.experts_name}.{name}: converted shape {tuple(value.shape)}"
                        )
                    within, _ = entry["params"][name]
                    for expert in range(layer.num_experts):
                        f.seek(entry["offset"] + expert * entry["record"] + within)
                        f.write(memoryview(value[expert].reshape(-1).view(torch.uint8).numpy()))
                del tensors
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    index = {str(k): {**v, "params": {n: list(p) for n, p in v["params"].items()}} for k, v in layout.items()}
    atomic_write_json(
        path.with_suffix(".json"), {"version": _PACK_VERSION, "dtype": str(dtype), "layers": index}
    )
    return _as_ranges(path, layout, info)
