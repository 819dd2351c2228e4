"""Routed-LoRA terms in a mixed serving batch, batched per adapter.

    per forward (set_owners):  for each routed-LoRA adapter present: rows = its tokens   (one index op)
    per MoE layer (executor):  out = base / ESFT rerouted experts(hidden)                 (all tokens)
                               for each present adapter with a LoRA in this layer:
                                   out[rows] += LoraLayer(hidden[rows], top_k_index[rows], top_k_weights[rows])

Each adapter's term is computed for all of its tokens at once (router + top-k + grouped GEMMs over
its LoRA pairs); the loop runs over the adapters present in the batch, never over requests or
tokens, and no dense weight delta is built.
"""

from __future__ import annotations

import torch

from .model import RoutedLora

__all__ = ["LoraRows", "lora_rows", "add_lora_terms"]

LoraRows = list[tuple[RoutedLora, torch.Tensor]]
"""``(adapter, token indices [T_a] int64)`` for every routed-LoRA adapter present in a forward."""


def lora_rows(adapters: dict[int, RoutedLora], row_owner: torch.Tensor, seq_len: int) -> LoraRows:
    """The token indices of each routed-LoRA adapter present in the next forward.

    Args:
        adapters: owner id -> adapter.
        row_owner: ``[B]`` owner id of each batch row.
        seq_len: tokens per row (tokens are flattened row-major: token ``b * S + s``).
    """
    if not adapters:
        return []
    present = set(torch.unique(row_owner).tolist())
    out = []
    for owner, adapter in adapters.items():
        if owner in present:
            rows = torch.nonzero(row_owner == owner).squeeze(1)
            steps = torch.arange(seq_len, device=rows.device)
            out.append((adapter, (rows[:, None] * seq_len + steps).reshape(-1)))
    return out


@torch.no_grad()
def add_lora_terms(
    batch: LoraRows,
    layer_index: int,
    out: torch.Tensor,
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """Add every present adapter's LoRA term of this layer to ``out [T, H]`` in place; returns ``out``."""
    for adapter, tokens in batch:
        lora = adapter.layer(layer_index)
        if lora is None or tokens.numel() == 0:
            continue
        delta, _ = lora(hidden.index_select(0, tokens), top_k_index[tokens], top_k_weights[tokens])
        out.index_add_(0, tokens, delta.to(out.dtype))
    return out
