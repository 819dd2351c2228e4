"""Routed LoRA experts inside the MoE routing (PERFT / MixLoRA family): perft-r, perft-e, perft-s,
perft-d and esft-lora, trained on a frozen base and served in mixed batches."""

from __future__ import annotations

from .adapter import METHOD, RoutedLoraAdapter, read_routed_lora, write_routed_lora
from .config import VARIANTS, LayerPlan, RoutedLoraSettings, parse_layer_spec, plan_layers
from .layer import LoraLayer, balance_loss
from .model import RoutedLora
from .serving import add_lora_terms, lora_rows
from .tuner import RoutedLoraTrainable, apply_routed_lora, prepare_routed_lora, tune_routed_lora

__all__ = [
    "METHOD",
    "VARIANTS",
    "LayerPlan",
    "LoraLayer",
    "RoutedLora",
    "RoutedLoraAdapter",
    "RoutedLoraSettings",
    "RoutedLoraTrainable",
    "add_lora_terms",
    "apply_routed_lora",
    "balance_loss",
    "lora_rows",
    "parse_layer_spec",
    "plan_layers",
    "prepare_routed_lora",
    "read_routed_lora",
    "tune_routed_lora",
    "write_routed_lora",
]
