"""The slot-routed experts computation every executor runs (serving, offloading, ESFT training).

    top_k_index [T, K] (router's expert ids), token_owner [T]
        -> reroute_permute(top_k_index, token_owner, slot_table [A, E], S)   (owner, expert) -> slot
        -> segmented_experts over [segment 0 | segment 1 | ...]              slots 0..S-1, no copy
        -> [T, H]                       (optionally chunk_tokens tokens at a time: bounded intermediates)

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
    chunk_tokens: int | None = None,
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
        chunk_tokens: run the tokens ``chunk_tokens`` at a time (None: all at once), so the
            intermediates (``[chunk x K, 2I]`` and the like) stay bounded whatever ``T``; the
            weights are the same for every chunk, and each token's result does not depend on it.

    Returns:
        ``[T, H]``, the weighted sum over each token's experts.
    """
    num_tokens = hidden.shape[0]
    if chunk_tokens is not None and num_tokens > chunk_tokens:
        out = None
        for start in range(0, num_tokens, chunk_tokens):
            end = min(start + chunk_tokens, num_tokens)
            part = slot_routed_experts(
                experts,
                hidden[start:end],
                top_k_index[start:end],
                top_k_weights[start:end],
                token_owner[start:end],
                slot_table,
                segments,
                skip_unused=skip_unused,
            )
            if out is None:
                out = part.new_empty((num_tokens, *part.shape[1:]))
            out[start:end] = part
        return out
    num_slots = sum(segment.size for segment in segments)
    routed = reroute_permute(top_k_index, token_owner, slot_table, num_slots)
    if skip_unused and len(segments) > 1:
        first = segments[0].size
        if int(routed.offsets[first - 1]) == int(routed.offsets[-1]):
            routed = routed._replace(offsets=routed.offsets[:first])
            segments = segments[:1]
    return segmented_experts(experts, hidden, top_k_weights, routed, segments)
