"""Apply a saved adapter of any method to a freshly loaded base model (for ``eval``)."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..errors import AdapterError
from ..models import find_moe_layers
from .esft.adapter import read_adapter
from .meta import META_FILE, read_meta

__all__ = ["adapter_method", "apply_adapter"]


def adapter_method(path: str | Path) -> str:
    """The method an adapter directory was made with (``esft`` for official-layout adapters)."""
    path = Path(path)
    if not path.is_dir():
        raise AdapterError(f"adapter '{path}': not a directory")
    meta = read_meta(path)
    if meta is not None:
        return str(meta["method"])
    if (path / "expert_cfg.json").exists():
        return "esft"
    raise AdapterError(f"adapter '{path}': neither {META_FILE} nor expert_cfg.json found")


def apply_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    """Checked merge of an adapter into ``model``; returns the model to evaluate.

    ESFT, LoRA and full adapters are merged into the weights; a routed-LoRA adapter is attached
    through the experts hook (the model's weights stay the base ones).

    Raises:
        AdapterError: the adapter does not fit this base model.
    """
    method = adapter_method(path)
    if method == "esft":
        info = find_moe_layers(model)
        adapter = read_adapter(path)
        adapter.check(model, info)
        adapter.merge_into(model, info)
        return model
    if method == "full":
        from .full import apply_full

        return apply_full(model, Path(path), read_meta(Path(path)))
    if method == "lora":
        from .lora import apply_lora

        return apply_lora(model, Path(path), read_meta(Path(path)))
    if method == "routed_lora":
        from .routed_lora import apply_routed_lora

        return apply_routed_lora(model, Path(path), read_meta(Path(path)))
    raise AdapterError(f"adapter '{path}': method '{method}' is not supported by this version")
