"""Merge an adapter into its base model and write a standard checkpoint (``moe-runtime export``).

    base checkpoint dir --meta skeleton (LazyCheckpoint)--> method.merge(adapter), step by step
        (ESFT: one MoE layer per step): read the parameters of the step (plain reads + transformers'
        conversion), merge into them
        step's parameters --transformers' reverse conversion--> the checkpoint's own names and layout
        (per-expert ``experts.<e>.w1.weight`` or fused ``experts.gate_up_proj``, as the base stores
        them) --keep those that differ from the stored tensors--> changed; the step is released
    source shards, tensor by tensor (pread) --replace changed / copy the rest--> shards of at most
        max_shard_bytes, each written as soon as it is full, + model.safetensors.index.json
    config.json (dtype), generation_config.json, tokenizer and other small files are copied

The output loads with ``AutoModelForCausalLM.from_pretrained`` alone. In memory at a time: the
changed tensors, one step's parameters and one output shard (fingerprint checks read the rest one
tensor at a time); the base model is never loaded whole, unless its model holds tensors the files
do not store (buffers made at init), then it is. Files are read with ``pread``, not memory-mapped
(a mapped file stays resident as it is read). Everything is written under a temporary name and
renamed into place at the end.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..errors import AdapterError, UsageError
from ..io import atomic_dir, atomic_write_json, check_output_dir
from ..models import resolve_model_path
from ..tuning.registry import read_adapter_dir
from .lazy import open_base
from .tensor_files import TensorFile, write_tensors

__all__ = ["DTYPES", "export_merged", "parse_size", "unmap_freed_tensors"]

DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
INDEX = "model.safetensors.index.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt")
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def unmap_freed_tensors(threshold: int = 1 << 20) -> bool:
    """Make glibc serve allocations of ``threshold`` bytes and more with their own memory maps, which
    go back to the system when freed (process-wide; the ``export`` command calls it first).

    By default glibc raises that threshold as large blocks are freed and then serves them from its
    heap, which it keeps: streaming a checkpoint tensor by tensor would then grow the process by
    every differently sized tensor it ever held. Returns False where this is not glibc.
    """
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, threshold))  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def parse_size(text: str) -> int:
    """Bytes from ``'5GB'``, ``'500MiB'`` or ``'1000000'``.

    Raises:
        UsageError: not a positive size.
    """
    value = text.strip().upper()
    digits = value.rstrip("KMGIB")
    unit = value[len(digits) :]
    try:
        size = int(float(digits) * _UNITS[unit])
    except (ValueError, KeyError):
        raise UsageError(
            f"size '{text}': expected a number with an optional unit (B, KB, MB, GB, KiB, MiB, GiB)"
        ) from None
    if size <= 0:
        raise UsageError(f"size '{text}': must be positive")
    return size


def source_weights(path: Path) -> dict[str, list[str]]:
    """Source safetensors files in order, each with its tensor names in file order."""
    index = path / INDEX
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UsageError(f"{index}: unreadable index ({exc})") from None
        files = sorted(set(weight_map.values()))
    elif (path / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise UsageError(
            f"model '{path}': export needs a safetensors checkpoint (no {INDEX} or model.safetensors)"
        )
    out = {}
    for name in files:
        try:
            with safe_open(str(path / name), "pt") as handle:
                out[name] = list(handle.keys())
        except (SafetensorError, OSError, ValueError) as exc:
            raise UsageError(
                f"{path / name}: unreadable safetensors file ({str(exc).splitlines()[0]})"
            ) from None
    return out


def _to_checkpoint_names(model, changed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The changed parameters under the checkpoint's own names and layout (transformers' reverse of
    the conversion it applied at load time: fused experts back to per-expert tensors, renamings)."""
    from transformers.core_model_loading import revert_weight_conversion

    return revert_weight_conversion(model, dict(changed))


class _ShardWriter:
    """Collects tensors and writes a shard each time ``max_bytes`` would be passed."""

    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.directory, self.max_bytes = directory, max_bytes
        self.current: dict[str, torch.Tensor] = {}
        self.current_bytes = 0
        self.files: list[tuple[Path, list[str]]] = []
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.current and self.current_bytes + size > self.max_bytes:
            self.flush()
        self.current[name] = tensor.contiguous()
        self.current_bytes += size
        self.total += size

    def flush(self) -> None:
        if not self.current:
            return
        file = self.directory / f".shard-{len(self.files):05d}.safetensors"
        write_tensors(file, self.current, metadata={"format": "pt"})
        self.files.append((file, list(self.current)))
        self.current, self.current_bytes = {}, 0

    def finish(self) -> int:
        """Name the shards ``model-0000i-of-0000N.safetensors``, write the index; the shard count."""
        self.flush()
        count, weight_map = len(self.files), {}
        for i, (file, names) in enumerate(self.files):
            final = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            file.rename(self.directory / final)
            weight_map.update(dict.fromkeys(names, final))
        atomic_write_json(
            self.directory / INDEX, {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        )
        return count


def _copy_small_files(source: Path, out: Path, dtype: torch.dtype | None) -> None:
    for file in sorted(source.iterdir()):
        if not file.is_file() or file.name.endswith(_WEIGHT_SUFFIXES) or file.name == INDEX:
            continue
        if file.name == "config.json" and dtype is not None:
            config = json.loads(file.read_text())
            name = str(dtype).removeprefix("torch.")
            for key in ("dtype", "torch_dtype"):
                if key in config or key == "dtype":
                    config[key] = name
            atomic_write_json(out / file.name, config)
        else:
            shutil.copy2(file, out / file.name)


def _changed_only(
    source: Path, model: str | Path, converted: dict[str, torch.Tensor], stored: dict[str, str]
) -> dict[str, torch.Tensor]:
    """The merged tensors (checkpoint names) that differ from the stored ones, as copies; tensors equal
    to the stored ones (experts of a merged layer the adapter did not tune) are left to the copy pass."""
    unknown = sorted(set(converted) - set(stored))
    if unknown:
        raise UsageError(
            f"model '{model}': merged weight {unknown[0]} has no tensor of that name in the checkpoint files "
            "(the checkpoint uses names this transformers version does not convert back to)"
        )
    out = {}
    for name, value in converted.items():
        original = TensorFile(source / stored[name]).read(name)
        if tuple(value.shape) != tuple(original.shape):
            raise UsageError(
                f"model '{model}': merged weight {name} has shape {tuple(value.shape)}, "
                f"the checkpoint stores {tuple(original.shape)}"
            )
        if not torch.equal(value, original.to(value.dtype)):
            out[name] = value.clone()
    return out


def export_merged(
    model: str | Path,
    adapter: str | Path,
    out: str | Path,
    *,
    dtype: str = "auto",
    max_shard_bytes: int = 5 * 10**9,
    allow_base_mismatch: bool = False,
    load_whole: bool = False,
) -> dict:
    """Write ``model`` with ``adapter`` merged as a standard checkpoint directory ``out``.

    Args:
        model: the base checkpoint directory (or ``demo``).
        adapter: an adapter directory of a mergeable method (esft, lora, peft-lora).
        out: the directory to create (must not exist or be empty).
        dtype: ``auto`` keeps every tensor's stored dtype; otherwise floating tensors are cast.
        max_shard_bytes: the largest shard written.
        allow_base_mismatch: merge an adapter tuned from other base weights.
        load_whole: load the whole base model first, as is done anyway when its model holds
            tensors the files do not store (``bench export`` compares the two).

    Returns:
        ``{"out", "method", "changed_tensors", "shards", "total_bytes"}``.

    Raises:
        UsageError / AdapterError: an unmergeable, corrupt or mismatched adapter, a base checkpoint
            without safetensors, an unknown dtype or an unusable ``out``; nothing is written then.
    """
    if dtype not in DTYPES:
        raise UsageError(f"dtype '{dtype}': choose from {', '.join(DTYPES)}")
    target_dtype = DTYPES[dtype]
    out = check_output_dir(out)
    method, loaded = read_adapter_dir(adapter)
    if method.merge is None:
        raise AdapterError(
            f"adapter '{adapter}': a {method.stored_name} adapter cannot be exported: {method.unmergeable}"
        )
    source = resolve_model_path(model)
    files = source_weights(source)
    target = open_base(model, [source / name for name in files], target_dtype, load_whole=load_whole)
    stored = {name: file for file, names in files.items() for name in names}
    changed: dict[str, torch.Tensor] = {}
    for net, names in method.merge(target, loaded, allow_base_mismatch):
        params = dict(net.named_parameters())
        with torch.no_grad():
            converted = _to_checkpoint_names(net, {name: params[name].detach() for name in names})
        changed.update(_changed_only(source, model, converted, stored))
        del converted, params
        target.release(names)
    net, changed_count = target.model, len(changed)
    with atomic_dir(out) as tmp:
        writer = _ShardWriter(tmp, max_shard_bytes)
        for file, names in files.items():
            stored_file = TensorFile(source / file)
            for name in names:
                value = changed.pop(name, None)
                if value is None:
                    value = stored_file.read(name)
                elif target_dtype is None:
                    value = value.to(stored_file.dtype(name))
                if target_dtype is not None and value.is_floating_point():
                    value = value.to(target_dtype)
                writer.add(name, value)
        shards = writer.finish()
        _copy_small_files(source, tmp, target_dtype)
        if not (tmp / "generation_config.json").exists():
            from transformers import GenerationConfig

            GenerationConfig.from_model_config(net.config).save_pretrained(tmp)
    return {
        "out": str(out),
        "method": method.name,
        "changed_tensors": changed_count,
        "shards": shards,
        "total_bytes": writer.total,
    }
