"""The slot-routed experts computation every executor runs (serving, offloading, ESFT training).

    top_k_index [T, K] (router's expert ids), token_owner [T]
        -> reroute_permute(top_k_index, token_owner, slot_table [A, E], S)   (owner, expert) -> slot
        -> segmented_experts over [segment 0 | segment 1 | ...]              slots 0..S-1, no copy
        -> [T, H]

What the slots hold is the caller's choice: the model's own experts or an offload cache in segment
0, then adapter chunks (serving) or the trainable copies of selected experts (ESFT training).
"""

from __future__ import annotations

import torch
from torch import nn

from .experts_mm import Segment, segmented_experts
from .reroute import reroute_permute

__all__ = ["slot_routed_experts"]


def slot_routed_experts(
    experts: nn.Module,
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    token_owner: torch.Tensor,
    slot_table: torch.Tensor,
    segments: list[Segment],
    *,
    skip_unused: bool = False,
) -> torch.Tensor:
    """Run every routed (token, expert) entry with the expert in its owner's slot.

    Args:
        experts: the fused experts module (layout flags, activation).
        hidden: ``[T, H]``.
        top_k_index: ``[T, K]`` int64 expert ids from the router.
        top_k_weights: ``[T, K]`` routing weights.
        token_owner: ``[T]`` int64 row of ``slot_table`` per token.
        slot_table: ``[A, E]`` int32 slot of each (owner, expert); -1 drops the entry.
        segments: cover the slots ``0..S-1`` contiguously, in order.
        skip_unused: when no entry uses a slot past segment 0, run segment 0 alone (fewer calls;
            the later segments then get no gradient at all, so training leaves this off).

    Returns:
        ``[T, H]``, the weighted sum over each token's experts.
    """
    num_slots = sum(segment.size for segment in segments)
    routed = reroute_permute(top_k_index, token_owner, slot_table, num_slots)
    if skip_unused and len(segments) > 1:
        first = segments[0].size
        if int(routed.offsets[first - 1]) == int(routed.offsets[-1]):
            routed = routed._replace(offsets=routed.offsets[:first])
            segments = segments[:1]
    return segmented_experts(experts, hidden, top_k_weights, routed, segments)
