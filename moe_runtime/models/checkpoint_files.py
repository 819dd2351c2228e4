"""The safetensors files of a checkpoint directory, read from their headers only.

    model.safetensors.index.json (or *.safetensors) -> shard files
        -> per shard: 8-byte header size, JSON header {name: dtype, shape, data_offsets}
        -> checked: every shard present, every shard at least as long as its header says

Used before any weight is loaded: a missing or truncated shard is one clear line (exit 2), not an
error from deep inside a load, and sizing plans (``--plan``) read nothing else.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError

__all__ = ["ShardHeader", "safetensors_files", "read_header", "check_shards"]

INDEX = "model.safetensors.index.json"


def safetensors_files(path: Path) -> list[Path]:
    """The checkpoint's shard files (named by the index when there is one, else ``*.safetensors``).

    Raises:
        UsageError: an unreadable index, or no safetensors files.
    """
    index = path / INDEX
    if index.exists():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise UsageError(
                f"model '{path}': unreadable {INDEX} ({exc.__class__.__name__}: {exc})"
            ) from None
        return [path / name for name in names]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise UsageError(f"model '{path}': no safetensors files")
    return files


@dataclass
class ShardHeader:
    """One shard's tensors: ``{name: {"dtype", "shape", "data_offsets"}}`` and where their data starts."""

    file: Path
    tensors: dict[str, dict]
    data_start: int

    @property
    def data_end(self) -> int:
        return self.data_start + max((t["data_offsets"][1] for t in self.tensors.values()), default=0)


def read_header(file: Path) -> ShardHeader:
    """The header of one safetensors file.

    Raises:
        UsageError: the file is missing or its header is cut short or malformed.
    """
    try:
        with open(file, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            text = f.read(size)
        if len(text) != size:
            raise UsageError(
                f"model '{file.parent}': shard '{file.name}' is truncated (its header of {size} bytes "
                f"ends after {len(text)})"
            )
        tensors = json.loads(text)
        tensors.pop("__metadata__", None)
    except FileNotFoundError:
        raise UsageError(f"model '{file.parent}': shard '{file.name}' is missing") from None
    except (OSError, ValueError, struct.error) as exc:
        raise UsageError(
            f"model '{file.parent}': shard '{file.name}' is not a readable safetensors file ({exc})"
        ) from None
    return ShardHeader(file, tensors, 8 + size)


def check_shards(path: Path) -> list[ShardHeader]:
    """Headers of every shard, each checked present and complete (size at least its data's end).

    Raises:
        UsageError: a shard is missing, unreadable or truncated (named, with its sizes).
    """
    headers = []
    for file in safetensors_files(path):
        header = read_header(file)
        size = file.stat().st_size
        if size < header.data_end:
            raise UsageError(
                f"model '{path}': shard '{file.name}' is truncated ({size} bytes, its header needs {header.data_end})"
            )
        headers.append(header)
    return headers
