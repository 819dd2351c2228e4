"""Expert-Specialized Fine-Tuning: train only the experts a task routes to."""

from __future__ import annotations

from .adapter import ESFTAdapter, read_adapter, replaced_fingerprint, write_adapter
from .config import ExpertSelection, read_expert_config
from .method import METHOD, ESFTConfig
from .trainable import LayerTrainable, TrainableExperts
from .tuner import prepare_esft, tune_esft, tuned_experts

__all__ = [
    "METHOD",
    "ESFTConfig",
    "ESFTAdapter",
    "TrainableExperts",
    "ExpertSelection",
    "LayerTrainable",
    "prepare_esft",
    "read_adapter",
    "read_expert_config",
    "replaced_fingerprint",
    "tune_esft",
    "tuned_experts",
    "write_adapter",
]
