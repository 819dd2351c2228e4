"""Per-token pure-Python references of the routing of the routed-LoRA variants MoLA and DynMoLE."""

from __future__ import annotations

import functools

import torch
from torch import nn

from moe_runtime.models import MoEModelInfo, install, state_of


def tsallis_reference(probs: list[float], q: float) -> float:
    """Normalised Tsallis entropy of one token's probabilities."""
    n = len(probs)
    if n == 1:
        return 0.0
    entropy = (1 - sum(p**q for p in probs)) / (q - 1)
    return entropy / ((1 - n ** (1 - q)) / (q - 1))


def hybrid_reference(
    probs: list[float], q: float, threshold: float, top_p: float, min_experts: int
) -> dict[int, float]:
    """DynMoLE: expert -> weight for one token (soft above the entropy threshold, else top-p)."""
    if tsallis_reference(probs, q) > threshold:
        total = sum(probs)
        return {i: p / total for i, p in enumerate(probs)}
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    chosen, mass = [], 0.0
    for rank, i in enumerate(order):
        if mass >= top_p and rank >= min_experts:
            break
        chosen.append(i)
        mass += probs[i]
    total = sum(probs[i] for i in chosen)
    return {i: probs[i] / total for i in chosen}


def topk_reference(probs: list[float], k: int) -> dict[int, float]:
    """perft-r / MoLA: the k most probable experts, weights renormalised."""
    top = sorted(range(len(probs)), key=lambda i: -probs[i])[:k]
    total = sum(probs[i] for i in top)
    return {i: probs[i] / total for i in top}


def lora_reference_delta(layer, hidden: torch.Tensor, route) -> torch.Tensor:
    """``sum_i w_i * scale * B_i (A_i x)`` one token and one pair at a time; ``route(probs) -> {i: w}``."""
    A, B, W = layer.lora_A.detach().double(), layer.lora_B.detach().double(), layer.router.detach().double()
    out = torch.zeros_like(hidden, dtype=torch.float64)
    for t in range(hidden.shape[0]):
        x = hidden[t].double()
        probs = torch.softmax(W @ x, dim=-1).tolist()
        for i, weight in route(probs).items():
            out[t] += weight * layer.scale * (B[i] @ (A[i] @ x))
    return out


def attach_routed_reference(model: nn.Module, lora, route, info: MoEModelInfo | None = None) -> nn.Module:
    """``model``'s experts run stock + :func:`lora_reference_delta` of ``lora``'s layers."""
    info = install(model, info)

    def run(layer, experts, hidden, top_k_index, top_k_weights):
        out = state_of(experts).stock(experts, hidden, top_k_index, top_k_weights)
        return out + lora_reference_delta(layer, hidden, route).to(out.dtype)

    for key, layer in lora.layers.items():
        state_of(info.by_index(int(key)).experts).executor = functools.partial(run, layer)
    return model
