"""Our adapter metadata file, shared by every method (``moe_runtime_adapter.json``)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from .. import __version__
from ..errors import AdapterError
from ..io import atomic_dir, atomic_write_json

__all__ = ["META_FILE", "write_meta", "read_meta", "save_adapter_dir", "check_base"]

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


def save_adapter_dir(out: Path, save: Callable[[Path], None], **meta) -> Path:
    """Write an adapter directory atomically: ``save(tmp)`` writes the weights, then our metadata."""
    with atomic_dir(out, replace_marker=META_FILE) as tmp:
        save(tmp)
        write_meta(tmp, **meta)
    return Path(out)


def check_base(meta: dict, model, path: Path, *, allow_base_mismatch: bool = False) -> None:
    """Refuse an adapter whose recorded base fingerprint is not ``model``'s (unless allowed)."""
    from ..models import model_fingerprint

    if not allow_base_mismatch and meta.get("base_fingerprint") != model_fingerprint(model):
        raise AdapterError(f"adapter '{path}': tuned from different base weights than this model")
