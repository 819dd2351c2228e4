"""Routed LoRA experts inside the MoE routing (PERFT / MixLoRA family): perft-r, perft-e, perft-s,
perft-d and esft-lora built in, more variants registered by their own folders; trained on a frozen
base and served in mixed batches."""

from __future__ import annotations

from .adapter import METHOD as STORED_NAME
from .adapter import RoutedLoraAdapter, read_routed_lora, write_routed_lora
from .config import (
    DENSE,
    EXPERT,
    ROUTED,
    VARIANTS,
    LayerPlan,
    RoutedLoraSettings,
    Variant,
    parse_layer_spec,
    plan_layers,
    register_variant,
)
from .layer import LoraLayer, Routing, TopKRouting, balance_loss
from .method import METHOD, settings_from_flags
from .model import RoutedLora
from .tuner import RoutedLoraTrainable, apply_routed_lora, prepare_routed_lora, tune_routed_lora

__all__ = [
    "DENSE",
    "EXPERT",
    "METHOD",
    "ROUTED",
    "STORED_NAME",
    "VARIANTS",
    "LayerPlan",
    "LoraLayer",
    "RoutedLora",
    "RoutedLoraAdapter",
    "RoutedLoraSettings",
    "RoutedLoraTrainable",
    "Routing",
    "TopKRouting",
    "Variant",
    "apply_routed_lora",
    "balance_loss",
    "parse_layer_spec",
    "plan_layers",
    "prepare_routed_lora",
    "read_routed_lora",
    "register_variant",
    "settings_from_flags",
    "tune_routed_lora",
    "write_routed_lora",
]
