"""Fused reroute + permute: the dispatch step of batched multi-adapter MoE serving.

    router -> top_k_index [T, K] --(reroute: (owner, expert) -> slot)--> slot_ids [T*K]
           -> permute (stable counting sort by slot) -> perm, inv_perm, offsets
           -> grouped GEMM over slots (torch._grouped_mm(..., offs=offsets)) -> unpermute

Each token's owner (the adapter of its request, or the base model) selects a row of a slot
table that maps the router's expert ids to physical expert slots. Plain MoE dispatch is the
case of one owner with the identity table.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._extension import load_extension

__all__ = ["Rerouted", "group_by_slot", "reroute_permute", "reroute_permute_reference"]


class Rerouted(NamedTuple):
    """Outputs of `reroute_permute` (T tokens, K experts per token, S = num_slots).

    Attributes:
        slot_ids: [T*K] int64, slot of flat entry f = t*K + k, or S for a dropped (sentinel) entry.
        perm: [T*K] int64, perm[j] = flat index of the j-th entry in slot order (stable).
        inv_perm: [T*K] int64, inverse of perm: inv_perm[perm[j]] = j.
        offsets: [S] int32, offsets[s] = number of entries with slot <= s; entries of slot s
            sit at positions offsets[s-1]:offsets[s] of the sorted order, sentinels at
            positions >= offsets[-1].
    """

    slot_ids: torch.Tensor
    perm: torch.Tensor
    inv_perm: torch.Tensor
    offsets: torch.Tensor


def reroute_permute(
    top_k_index: torch.Tensor, token_owner: torch.Tensor, slot_table: torch.Tensor, num_slots: int
) -> Rerouted:
    """Maps every routed (token, expert) entry to a slot and sorts the entries by slot.

    For flat entry f = t*K + k with owner a = token_owner[t] and expert e = top_k_index[t, k],
    the slot is slot_table[a, e] when 0 <= e < E and 0 <= slot_table[a, e] < num_slots;
    otherwise the entry is a sentinel with slot num_slots: it sorts after all slots and no
    group counts it (an expert id >= E contributes nothing, as in transformers' experts
    implementations; -1 in the table marks an expert the owner does not have). The sort is a
    stable counting sort, so entries of one slot keep their flat order and the result is
    deterministic. `offsets` is what `torch._grouped_mm(x[perm-ordered], w, offs=offsets)`
    expects for num_slots groups.

    Runs the compiled op `torch.ops.moe_runtime.reroute_permute` (CPU, or CUDA where built).

    Args:
        top_k_index: [T, K] int64, expert ids chosen by the router.
        token_owner: [T] int64, row of `slot_table` for each token; every value must lie in
            [0, A) (the CPU op raises otherwise, the CUDA op trips a device-side assert).
        slot_table: [A, E] int32, slot of each (owner, expert); -1 (or any value outside
            [0, num_slots)) drops the entry.
        num_slots: Number of slots S (groups of the grouped GEMM).

    Returns:
        `Rerouted(slot_ids [T*K], perm [T*K], inv_perm [T*K], offsets [S] int32)`.

    Raises:
        RuntimeError: The extension is not built, or the inputs are malformed.
    """
    load_extension()
    return Rerouted(*torch.ops.moe_runtime.reroute_permute(top_k_index, token_owner, slot_table, num_slots))


def reroute_permute_reference(
    top_k_index: torch.Tensor, token_owner: torch.Tensor, slot_table: torch.Tensor, num_slots: int
) -> Rerouted:
    """Pure-PyTorch `reroute_permute`, the specification the compiled op is tested against.

    Args and returns as `reroute_permute`.

    Raises:
        RuntimeError: A token owner is outside [0, A).
    """
    num_tokens, top_k = top_k_index.shape
    num_owners, num_experts = slot_table.shape
    if num_tokens and not bool(((token_owner >= 0) & (token_owner < num_owners)).all()):
        raise RuntimeError(f"reroute_permute: token_owner values must lie in [0, {num_owners})")
    slots = torch.full_like(top_k_index, num_slots)
    if num_experts > 0:
        owners = token_owner.unsqueeze(1).expand(num_tokens, top_k)
        looked_up = slot_table[owners, top_k_index.clamp(0, num_experts - 1)].long()
        keep = (top_k_index >= 0) & (top_k_index < num_experts) & (looked_up >= 0) & (looked_up < num_slots)
        slots = torch.where(keep, looked_up, slots)
    slot_ids = slots.reshape(-1)
    perm = torch.sort(slot_ids, stable=True).indices
    inv_perm = torch.empty_like(perm)
    inv_perm[perm] = torch.arange(perm.numel(), device=perm.device)
    counts = torch.bincount(slot_ids, minlength=num_slots + 1)[:num_slots]
    return Rerouted(slot_ids, perm, inv_perm, counts.cumsum(0).to(torch.int32))


def group_by_slot(
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    token_owner: torch.Tensor,
    slot_table: torch.Tensor,
    num_slots: int,
) -> tuple[torch.Tensor, Rerouted]:
    """Reroutes and gathers one hidden row per entry in slot order, ready for a grouped GEMM.

    Args:
        hidden: [T, H] token hidden states.
        top_k_index, token_owner, slot_table, num_slots: As `reroute_permute`.

    Returns:
        (grouped [T*K, H] with grouped[j] = hidden[perm[j] // K] (rows >= offsets[-1] are
        sentinel entries), the `Rerouted` outputs).
    """
    rerouted = reroute_permute(top_k_index, token_owner, slot_table, num_slots)
    token_of_entry = torch.div(rerouted.perm, max(top_k_index.shape[1], 1), rounding_mode="floor")
    return hidden.index_select(0, token_of_entry), rerouted
