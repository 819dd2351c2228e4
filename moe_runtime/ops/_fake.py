"""Fake (shape-only) kernels of the C++ ops, used by fake tensors and torch.compile.

The C++ op library names this module (`m.set_python_module`); it is imported by
`load_extension()` once the ops exist. Every output shape follows from input shapes alone.
"""

from __future__ import annotations

import torch

__all__: list[str] = []


@torch.library.register_fake("moe_runtime::reroute_permute")
def _reroute_permute_fake(
    top_k_index: torch.Tensor, token_owner: torch.Tensor, slot_table: torch.Tensor, num_slots: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    torch._check(top_k_index.dim() == 2 and slot_table.dim() == 2 and token_owner.dim() == 1)
    torch._check(token_owner.shape[0] == top_k_index.shape[0])
    torch._check(top_k_index.dtype == torch.int64 and token_owner.dtype == torch.int64)
    torch._check(slot_table.dtype == torch.int32)
    torch._check(num_slots >= 0)
    num_entries = top_k_index.shape[0] * top_k_index.shape[1]
    return (
        top_k_index.new_empty((num_entries,)),
        top_k_index.new_empty((num_entries,)),
        top_k_index.new_empty((num_entries,)),
        top_k_index.new_empty((num_slots,), dtype=torch.int32),
    )


@torch.library.register_fake("moe_runtime::segmented_mm")
def _segmented_mm_fake(
    x: torch.Tensor, weights: list[torch.Tensor], offsets: torch.Tensor, transposed: bool
) -> torch.Tensor:
    torch._check(x.dim() == 2 and len(weights) > 0 and offsets.dim() == 1)
    out_features = weights[0].shape[2 if transposed else 1]
    return x.new_empty((x.shape[0], out_features))


@torch.library.register_fake("moe_runtime::rows_linear")
def _rows_linear_fake(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    torch._check(weight.dim() == 2 and x.shape[-1] == weight.shape[1])
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.register_fake("moe_runtime::slot_rows_mm")
def _slot_rows_mm_fake(
    x: torch.Tensor, weights: list[torch.Tensor], slots: torch.Tensor, transposed: bool
) -> torch.Tensor:
    torch._check(x.dim() == 2 and len(weights) > 0 and slots.dim() == 1)
    out_features = weights[0].shape[2 if transposed else 1]
    return x.new_empty((slots.shape[0], out_features))


@torch.library.register_fake("moe_runtime::decode_step")
def _decode_step_fake(
    ids, positions, mask, kv, weights, embed, final_norm, lm_head, inv_freq, *settings_then_rows
) -> torch.Tensor:
    # the ten settings, then the optional slots and logit_rows
    logit_rows = settings_then_rows[11] if len(settings_then_rows) > 11 else None
    torch._check(ids.dim() == 1 and mask.dim() == 2 and lm_head.dim() == 2)
    rows = ids.shape[0] if logit_rows is None else logit_rows.shape[0]
    return embed.new_empty((rows, lm_head.shape[0]))
