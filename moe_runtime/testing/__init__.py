"""Builders for tests, benchmarks and users who need a small MoE checkpoint without the hub.

Not used by the library itself: tiny random-weight models of every text MoE family in
transformers v5 (:mod:`.random_models`) and the family support table built from them
(:mod:`.support_table`), and checkpoints shaped like named real models (:mod:`.shapes`,
also a command: ``python -m moe_runtime.testing.shapes --help``).
"""

from __future__ import annotations

from .random_models import FAMILIES, build_random_model, save_random_checkpoint, tiny_config

__all__ = [
    "FAMILIES",
    "build_random_model",
    "save_random_checkpoint",
    "tiny_config",
]
