"""Routed-LoRA test helpers: a per-token pure-PyTorch reference of the LoRA math, reference models
that run it through the experts hook, and random (non-zero) adapters written as real directories."""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch import nn

from moe_runtime.models import MoEModelInfo, find_moe_layers, install, model_fingerprint, state_of
from moe_runtime.tuning.routed_lora import (
    LoraLayer,
    RoutedLora,
    RoutedLoraSettings,
    plan_layers,
    write_routed_lora,
)


def reference_delta(
    lora: LoraLayer, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """One token at a time, one pair at a time: ``sum_i weight_i * scale * B_i (A_i x)``."""
    A, B = lora.lora_A.detach(), lora.lora_B.detach()
    out = torch.zeros_like(hidden)
    for t in range(hidden.shape[0]):
        x = hidden[t]
        if lora.kind == "dense":
            pairs = [(i, 1.0) for i in range(A.shape[0])]
        elif lora.kind == "routed":
            probs = torch.softmax((lora.router.detach() @ x).double(), dim=-1)
            top = sorted(range(len(probs)), key=lambda i: -float(probs[i]))[: lora.top_k]
            total = sum(float(probs[i]) for i in top)
            pairs = [(i, float(probs[i]) / total) for i in top]
        else:
            pairs = [
                (lora.expert_ids.index(int(e)), float(w))
                for e, w in zip(top_k_index[t], top_k_weights[t])
                if int(e) in lora.expert_ids
            ]
        for i, weight in pairs:
            out[t] += weight * lora.scale * (B[i] @ (A[i] @ x))
    return out


def attach_reference(model: nn.Module, lora: RoutedLora, info: MoEModelInfo | None = None) -> nn.Module:
    """Make ``model`` compute its experts as stock + :func:`reference_delta` of ``lora``'s layers."""
    info = install(model, info)

    def run(layer, experts, hidden, top_k_index, top_k_weights):
        out = state_of(experts).stock(experts, hidden, top_k_index, top_k_weights)
        return out + reference_delta(layer, hidden, top_k_index, top_k_weights).to(out.dtype)

    for key, layer in lora.layers.items():
        state_of(info.by_index(int(key)).experts).executor = functools.partial(run, layer)
    return model


def random_lora(
    model: nn.Module, settings: RoutedLoraSettings, *, seed: int, b_std: float = 0.1
) -> RoutedLora:
    """A routed-LoRA adapter for ``model`` with random A, router and (non-zero) B."""
    info = find_moe_layers(model)
    param = next(model.parameters())
    lora = RoutedLora(info, settings, plan_layers(settings, info), dtype=param.dtype, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for layer in lora.layers.values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * b_std)
            if layer.router is not None:
                layer.router.copy_(torch.randn(layer.router.shape, generator=generator))
    return lora.requires_grad_(False).eval()


def write_random_lora(
    model: nn.Module, out: Path, settings: RoutedLoraSettings, *, seed: int, b_std: float = 0.1
) -> Path:
    """Write :func:`random_lora` as an adapter directory for ``model``."""
    lora = random_lora(model, settings, seed=seed, b_std=b_std)
    return write_routed_lora(out, lora, base_fingerprint=model_fingerprint(model))
