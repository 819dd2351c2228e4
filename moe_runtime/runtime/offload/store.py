"""The slow tier: where every routed expert lives on disk, and a model loaded without them.

    checkpoint safetensors ──(fused key [E, ...], no conversion)──> expert e = one byte range
                          └─(per-expert keys, or a converted layout)──> packed file, made once:
                                 one 4 KiB-aligned record per (layer, expert), params back to back

``load_offloaded_model`` builds the model on the meta device, loads every non-expert weight through
transformers' own key renaming and conversion (so every family's checkpoint names work), and leaves
the fused expert parameters on meta: they are never materialized. The packed file is written layer
by layer, so building it holds one layer's experts at a time.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ...errors import UsageError
from ...io import atomic_write_json
from ...models import MoEModelInfo, find_moe_layers
from ...models.discovery import MoELayer

__all__ = ["ALIGN", "ExpertStore", "ParamLocation", "load_offloaded_model", "default_cache_dir"]

ALIGN = 4096
_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}
_PACK_VERSION = 1


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass(frozen=True)
class ParamLocation:
    """Expert ``e`` of one fused parameter is ``nbytes`` at ``offset + e * stride`` of ``path``."""

    path: str
    offset: int
    stride: int
    nbytes: int

    def range_of(self, expert: int) -> tuple[int, int]:
        return self.offset + expert * self.stride, self.nbytes


@dataclass
class ExpertStore:
    """Disk locations of every routed expert of a model.

    Attributes:
        locations: ``{layer index: {param name: ParamLocation}}``.
        dtype: dtype of the stored expert weights (the model's).
        shapes: ``{layer index: {param name: per-expert shape}}``.
        kind: ``"checkpoint"`` (byte ranges of the safetensors files) or ``"packed"``.
        packed_path: the packed file, when one was needed.
    """

    locations: dict[int, dict[str, ParamLocation]]
    dtype: torch.dtype
    shapes: dict[int, dict[str, tuple[int, ...]]]
    kind: str
    packed_path: Path | None = None

    def read_expert(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        """One expert's fused slices, read synchronously (``{param name: slice}``)."""
        out = {}
        for name, loc in self.locations[layer].items():
            tensor = torch.empty(self.shapes[layer][name], dtype=self.dtype)
            offset, nbytes = loc.range_of(expert)
            buffer = memoryview(tensor.view(-1).view(torch.uint8).numpy())
            with open(loc.path, "rb", buffering=0) as f:
                got = os.preadv(f.fileno(), [buffer], offset)
            if got != nbytes:
                raise OSError(f"{loc.path}: short read at offset {offset} ({got} of {nbytes} bytes)")
            out[name] = tensor
        return out

    def expert_bytes(self, layer: int) -> int:
        return sum(loc.nbytes for loc in self.locations[layer].values())

    def submit(self, loader, layer: int, expert: int, name: str, dest: torch.Tensor, priority: int):
        """Queue the read of one expert's slice of ``name`` into ``dest``; returns ``(ticket, bytes)``."""
        loc = self.locations[layer][name]
        offset, nbytes = loc.range_of(expert)
        return loader.submit(loc.path, [(offset, nbytes)], dest, priority), nbytes


# checkpoint scanning -------------------------------------------------------------------------


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / name for name in names]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise UsageError(f"model '{path}': no safetensors files (expert offloading reads experts from them)")
    return files


def _header(file: Path) -> tuple[dict, int]:
    """The safetensors header and the file offset where tensor data starts."""
    with open(file, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header, 8 + size


def default_cache_dir() -> Path:
    """Where packed expert files go: ``$MOE_RUNTIME_CACHE`` or ``~/.cache/moe_runtime``."""
    return Path(os.environ.get("MOE_RUNTIME_CACHE", Path.home() / ".cache" / "moe_runtime")) / "offload"


def _checkpoint_key(files: list[Path], dtype: torch.dtype) -> str:
    digest = hashlib.sha256(f"v{_PACK_VERSION}|{dtype}".encode())
    for file in files:
        stat = file.stat()
        digest.update(f"|{file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:24]


def _resolve_dtype(config, files: list[Path], dtype: torch.dtype | str | None) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype != "auto":
        return getattr(torch, dtype)
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(stored, torch.dtype):
        return stored
    if isinstance(stored, str) and isinstance(getattr(torch, stored, None), torch.dtype):
        return getattr(torch, stored)
    header, _ = _header(files[0])
    for entry in header.values():
        if entry["dtype"] in _ST_DTYPES:
            return _ST_DTYPES[entry["dtype"]]
    return torch.float32


@dataclass
class _ExpertKey:
    """A checkpoint tensor that feeds the experts of one layer."""

    key: str
    file: Path
    renamed: str
    source_pattern: str | None


def load_offloaded_model(
    model: str | Path,
    *,
    dtype: torch.dtype | str | None = None,
    cache_dir: str | Path | None = None,
) -> tuple[nn.Module, MoEModelInfo, ExpertStore]:
    """Load a causal LM with its routed experts left on disk (see :func:`_load_offloaded`).

    Raises:
        UsageError: not a loadable safetensors checkpoint, a weight is missing, or the experts
            cannot be mapped.
    """
    from safetensors import SafetensorError

    try:
        return _load_offloaded(model, dtype=dtype, cache_dir=cache_dir)
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
) -> tuple[nn.Module, MoEModelInfo, ExpertStore]:
    """Load a causal LM with its routed experts left on disk.

    Non-expert weights (attention, norms, embeddings, routers, shared experts) are loaded into RAM;
    the fused expert parameters stay on the meta device and an :class:`ExpertStore` says where
    each expert lives on disk.

    Args:
        model: a local checkpoint directory or ``demo``.
        dtype: parameter dtype; default keeps the checkpoint's.
        cache_dir: where a packed expert file goes if the checkpoint needs one
            (default :func:`default_cache_dir`).

    Returns:
        ``(model, info, store)``.

    Raises:
        UsageError: not a safetensors checkpoint, a weight is missing, or the experts cannot be mapped.
    """
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

    path = resolve_model_path(model)
    files = _safetensors_files(path)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    dtype = _resolve_dtype(config, files, dtype)
    with torch.device("meta"):
        net = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if (path / "generation_config.json").is_file():  # as from_pretrained: it wins over config.json (eos)
        net.generation_config = GenerationConfig.from_pretrained(path, local_files_only=True)
    info = find_moe_layers(net)
    mapping = get_model_conversion_mapping(net)
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    meta_state = net.state_dict()
    by_prefix = {f"{layer.experts_name}.": layer for layer in info.layers}

    from safetensors import safe_open

    handles = [safe_open(str(file), framework="pt", device="cpu") for file in files]
    locations: dict[int, dict[str, ParamLocation]] = {}
    to_pack: dict[int, list[_ExpertKey]] = {}
    rest = {}
    try:
        for file, handle in zip(files, handles):
            header, data_start = _header(file)
            for key in handle.keys():  # noqa: SIM118 - a safetensors handle, not a dict
                renamed, pattern = rename_source_key(
                    key, renamings, converters, net.base_model_prefix, meta_state
                )
                layer = next((lay for p, lay in by_prefix.items() if renamed.startswith(p)), None)
                if layer is None:
                    rest[key] = handle.get_slice(key)
                    continue
                param = renamed[len(layer.experts_name) + 1 :]
                entry = header[key]
                target = getattr(layer.experts, param, None)
                if (
                    pattern is None
                    and target is not None
                    and tuple(entry["shape"]) == tuple(target.shape)
                    and _ST_DTYPES.get(entry["dtype"]) == dtype
                ):
                    begin, end = entry["data_offsets"]
                    per_expert = (end - begin) // layer.num_experts
                    locations.setdefault(layer.index, {})[param] = ParamLocation(
                        str(file), data_start + begin, per_expert, per_expert
                    )
                else:
                    to_pack.setdefault(layer.index, []).append(_ExpertKey(key, file, renamed, pattern))
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
    shapes = {
        layer.index: {p: tuple(getattr(layer.experts, p).shape[1:]) for p in layer.layout.param_names()}
        for layer in info.layers
    }
    packed_path = None
    needs_pack = [
        layer
        for layer in info.layers
        if set(locations.get(layer.index, {})) != set(layer.layout.param_names())
    ]
    if needs_pack:
        cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        packed_path = cache / _checkpoint_key(files, dtype) / "experts.bin"
        packed = _packed_locations(packed_path, info, shapes, dtype)
        if packed is None:
            _check_cache_dir(packed_path.parent)
            packed = _write_packed(
                packed_path, net, info, shapes, dtype, to_pack, locations, mapping, converters
            )
        for layer in needs_pack:
            locations[layer.index] = packed[layer.index]
    store = ExpertStore(
        locations=locations,
        dtype=dtype,
        shapes=shapes,
        kind="packed" if needs_pack else "checkpoint",
        packed_path=packed_path,
    )
    return net.eval(), info, store


# the packed file ---------------------------------------------------------------------------


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


def _as_locations(path: Path, layout: dict) -> dict[int, dict[str, ParamLocation]]:
    return {
        index: {
            name: ParamLocation(str(path), entry["offset"] + within, entry["record"], nbytes)
            for name, (within, nbytes) in entry["params"].items()
        }
        for index, entry in layout.items()
    }


def _packed_locations(path: Path, info: MoEModelInfo, shapes, dtype) -> dict | None:
    """Locations in an existing, complete packed file for this checkpoint, else None."""
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
    return _as_locations(path, layout)


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


def _check_cache_dir(directory: Path) -> None:
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


def _write_packed(path: Path, net, info, shapes, dtype, to_pack, direct, mapping, converters) -> dict:
    """Write the packed expert file (layer by layer) and its index; returns its locations."""
    layout = _layout_of_pack(info, shapes, dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    total = sum(entry["record"] * info.by_index(i).num_experts for i, entry in layout.items())
    store = ExpertStore(direct, dtype, shapes, "checkpoint")
    try:
        with open(tmp, "wb") as f:
            f.truncate(total)
            for layer in info.layers:
                entry = layout[layer.index]
                tensors = _layer_tensors(net, layer, to_pack.get(layer.index, []), mapping, converters)
                for name in layer.layout.param_names():
                    if name not in tensors and name in direct.get(layer.index, {}):
                        continue
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
                for name in layer.layout.param_names():
                    if name in tensors or name not in direct.get(layer.index, {}):
                        continue
                    within, _ = entry["params"][name]
                    for expert in range(layer.num_experts):  # a directly readable param: copy its bytes
                        value = store.read_expert(layer.index, expert)[name]
                        f.seek(entry["offset"] + expert * entry["record"] + within)
                        f.write(memoryview(value.reshape(-1).view(torch.uint8).numpy()))
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
    return _as_locations(path, layout)
