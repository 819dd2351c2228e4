"""Tuning methods (one folder each), the shared Trainer glue and evaluation."""

from __future__ import annotations

from .adapters import apply_adapter
from .trainer import TrainConfig

__all__ = ["TrainConfig", "apply_adapter"]
