"""Apply a saved adapter of any method to a freshly loaded base model (for ``eval``)."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from .registry import read_adapter_dir

__all__ = ["apply_adapter"]


def apply_adapter(model: nn.Module, path: str | Path, *, allow_base_mismatch: bool = False) -> nn.Module:
    """Checked application of an adapter to ``model``; returns the model to evaluate.

    Each method decides how: ESFT, LoRA and full adapters are merged into the weights; a
    routed-LoRA adapter is attached through the experts hook (the model's weights stay the base ones).

    Raises:
        AdapterError: the adapter does not fit this base model (or was tuned on other base
            weights and ``allow_base_mismatch`` is not set).
    """
    method, adapter = read_adapter_dir(path)
    return method.apply(model, adapter, allow_base_mismatch)
