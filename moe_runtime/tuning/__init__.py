"""Tuning methods (one folder each, registered by name), the shared Trainer glue and evaluation."""

from __future__ import annotations

from .adapters import apply_adapter
from .registry import Method, TuneJob, get, methods, read_adapter_dir
from .trainer import TrainConfig

__all__ = ["Method", "TrainConfig", "TuneJob", "apply_adapter", "get", "methods", "read_adapter_dir"]
