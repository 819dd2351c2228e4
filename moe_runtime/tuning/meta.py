"""Our adapter metadata file, shared by every method (``moe_runtime_adapter.json``)."""

from __future__ import annotations

import json
from pathlib import Path

from .. import __version__
from ..errors import AdapterError
from ..io import atomic_write_json

__all__ = ["META_FILE", "write_meta", "read_meta"]

META_FILE = "moe_runtime_adapter.json"


def write_meta(
    directory: Path, *, method: str, model_type: str, base_fingerprint: str | None, **fields
) -> Path:
    """Write the metadata of an adapter of any method into ``directory``."""
    return atomic_write_json(
        directory / META_FILE,
        {
            "format_version": 1,
            "method": method,
            "moe_runtime_version": __version__,
            "model_type": model_type,
            "base_fingerprint": base_fingerprint,
            **fields,
        },
    )


def read_meta(directory: Path) -> dict | None:
    """The metadata of an adapter directory, or None when it has none (adapters made elsewhere)."""
    path = Path(directory) / META_FILE
    if not path.exists():
        return None
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise AdapterError(f"{path}: unreadable ({exc})") from None
    if not isinstance(meta, dict) or "method" not in meta:
        raise AdapterError(f"{path}: not a moe-runtime adapter metadata file")
    return meta
