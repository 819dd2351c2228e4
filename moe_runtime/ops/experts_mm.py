"""Segmented grouped-GEMM experts: the MoE computation over slots held in several weight tensors.

    top_k_index --reroute_permute--> slot order (perm, offsets)
    hidden[perm // K] -> per segment: grouped up-proj -> gate/act -> grouped down-proj
    -> concat segments (+ zero rows for dropped entries) -> * routing weight -> unpermute -> sum over K

A *segment* is a weight tensor holding a contiguous range of slots: the frozen base experts and an
ESFT arena of trainable copies while tuning, or the base experts and each adapter's tuned experts
while serving. Keeping them apart means no weight is ever copied to run a mixed batch, and only the
arena receives gradients. The per-token math is the experts module's own (``_apply_gate``,
``act_fn``, ``post_expert_norm``), so every family's variant is honoured.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .reroute import Rerouted

__all__ = ["Segment", "segmented_experts", "grouped_linear"]

_GROUPED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class Segment:
    """Expert weights for the slots ``[start, start + n)``, in the experts module's layout.

    Attributes:
        start: first slot id held by this segment.
        up: ``[n, 2I or I, H]`` (or ``[n, H, 2I or I]`` when transposed).
        down: ``[n, H, I]`` (or ``[n, I, H]`` when transposed).
        up_bias, down_bias: ``[n, out]`` or None.
    """

    start: int
    up: torch.Tensor
    down: torch.Tensor
    up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return self.up.shape[0]


def grouped_linear(
    x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, transposed: bool
) -> torch.Tensor:
    """Rows of ``x`` grouped by ``offsets`` times per-group weights.

    Args:
        x: ``[N, in]`` rows sorted by group.
        weight: ``[G, out, in]`` (or ``[G, in, out]`` if ``transposed``).
        offsets: ``[G]`` int32 cumulative row counts; ``offsets[-1] == N``.

    Returns:
        ``[N, out]``.
    """
    mat_b = weight if transposed else weight.transpose(-2, -1)
    if x.dtype in _GROUPED_DTYPES and mat_b.dtype == x.dtype:
        return torch._grouped_mm(x, mat_b, offs=offsets)
    pieces, start = [], 0
    for group, end in enumerate(offsets.tolist()):
        if end > start:
            pieces.append(x[start:end] @ mat_b[group])
        start = end
    if not pieces:
        return x.new_zeros(x.shape[0], mat_b.shape[-1])
    return torch.cat(pieces)


def _segment_forward(
    experts: nn.Module, x: torch.Tensor, seg: Segment, offsets: torch.Tensor, local_slots: torch.Tensor
) -> torch.Tensor:
    transposed = bool(experts.is_transposed)
    h = grouped_linear(x, seg.up, offsets, transposed)
    if seg.up_bias is not None:
        h = h + seg.up_bias[local_slots]
    h = experts._apply_gate(h) if experts.has_gate else experts.act_fn(h)
    y = grouped_linear(h, seg.down, offsets, transposed)
    if seg.down_bias is not None:
        y = y + seg.down_bias[local_slots]
    if getattr(experts, "has_post_expert_norm", False):
        y = experts.post_expert_norm(y)
    return y


def segmented_experts(
    experts: nn.Module,
    hidden: torch.Tensor,
    top_k_weights: torch.Tensor,
    routed: Rerouted,
    segments: list[Segment],
) -> torch.Tensor:
    """Run the experts of every routed entry, each from the segment holding its slot.

    Args:
        experts: the fused experts module (for its layout flags and activation/gating).
        hidden: ``[T, H]`` token hidden states.
        top_k_weights: ``[T, K]`` routing weights.
        routed: ``reroute_permute`` output for this batch.
        segments: sorted by ``start``, covering every slot id that occurs.

    Returns:
        ``[T, H]``: the weighted sum over each token's experts (dropped entries add nothing).
    """
    if [seg.start for seg in segments] != [
        sum(s.size for s in segments[:i]) for i in range(len(segments))
    ] or sum(seg.size for seg in segments) != routed.offsets.numel():
        raise ValueError("segments must cover the slots 0..num_slots-1 contiguously, in order")
    num_tokens, top_k = top_k_weights.shape
    num_entries = num_tokens * top_k
    x = hidden[routed.perm // top_k]
    sorted_slots = routed.slot_ids[routed.perm]
    offsets = routed.offsets.to(torch.int64)
    bounds = [0] + offsets.tolist()
    pieces = []
    for seg in segments:
        lo, hi = bounds[seg.start], bounds[seg.start + seg.size]
        if hi > lo:
            seg_offsets = (offsets[seg.start : seg.start + seg.size] - lo).to(torch.int32)
            local = sorted_slots[lo:hi] - seg.start
            pieces.append(_segment_forward(experts, x[lo:hi], seg, seg_offsets, local))
    dropped = num_entries - bounds[-1]
    if dropped or not pieces:
        pieces.append(hidden.new_zeros(dropped, hidden.shape[1]))
    rows = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
    rows = rows * top_k_weights.reshape(-1)[routed.perm].unsqueeze(-1).to(rows.dtype)
    return rows[routed.inv_perm].view(num_tokens, top_k, -1).sum(dim=1).to(hidden.dtype)
