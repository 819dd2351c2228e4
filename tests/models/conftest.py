"""Tiny random models of every supported family, built once per session and shared by the tests.

Tests that modify a cached model (install, merge) must leave it as they found it.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from moe_runtime.testing.random_models import build_random_model


@dataclass
class Built:
    """A model with the inputs used to probe it and its stock logits on them."""

    model: nn.Module
    inputs: dict[str, torch.Tensor]
    stock_logits: torch.Tensor


def batch(vocab_size: int) -> dict[str, torch.Tensor]:
    """Two sequences of different lengths (8 and 5 tokens), right-padded, with an attention mask."""
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, vocab_size, (2, 8), generator=generator)
    attention_mask = torch.ones(2, 8, dtype=torch.long)
    attention_mask[1, 5:] = 0
    input_ids[1, 5:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def logits(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, use_cache=False).logits


class ModelCache:
    def __init__(self) -> None:
        self._built: dict[tuple[str, str | None], Built] = {}

    def get(self, family: str, experts_implementation: str | None = None) -> Built:
        key = (family, experts_implementation)
        if key not in self._built:
            model = build_random_model(family, experts_implementation=experts_implementation)
            inputs = batch(model.config.get_text_config().vocab_size)
            self._built[key] = Built(model, inputs, logits(model, inputs))
        return self._built[key]


@pytest.fixture(scope="session")
def models() -> ModelCache:
    return ModelCache()
