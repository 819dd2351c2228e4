"""Segmented grouped-GEMM experts: the MoE computation over slots held in several weight tensors.

    top_k_index --reroute_permute--> slot order (perm, offsets)
    hidden[perm // K] -> per segment: grouped up-proj -> gate/act -> grouped down-proj
    -> concat segments (+ zero rows for dropped entries) -> * routing weight -> unpermute -> sum over K

A *segment* is a weight tensor holding a contiguous range of slots: the frozen base experts and an
ESFT arena of trainable copies while tuning, or the base experts and each adapter's tuned experts
while serving. Keeping them apart means no weight is ever copied to run a mixed batch, and only the
arena receives gradients. The per-token math is the experts module's own (``_apply_gate``,
``act_fn``, ``post_expert_norm``), so every family's variant is honoured.

Serving (CPU, no gradient) runs each projection of all segments as one call of the compiled
``segmented_mm`` op: only slots that have rows cost anything, which matters because a mixed batch
touches a small share of the adapter slots. Training (gradients) and other devices use
``torch._grouped_mm`` per segment.

A decode step's few entries (at most ``STREAM_ROWS_MAX``, float32, no expert biases) skip the
permutation altogether: ``slot_rows_mm`` runs each entry in token order against its slot's weights,
reading the token's row in place, so the step costs two op calls and the gate instead of about twenty
gathers, sorts and copies. Every output element is computed exactly as on the sorted path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ._extension import extension_available, load_extension
from .reroute import Rerouted
from .rows_linear import STREAM_ROWS_MAX

__all__ = [
    "Segment",
    "segmented_experts",
    "grouped_linear",
    "segmented_mm",
    "segmented_mm_reference",
    "slot_rows_mm",
    "slot_rows_mm_reference",
]

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


def segmented_mm(
    x: torch.Tensor, weights: list[torch.Tensor], offsets: torch.Tensor, transposed: bool
) -> torch.Tensor:
    """Rows of ``x`` grouped by slot times each slot's weight, the slots spread over several tensors.

    One call of the compiled op ``torch.ops.moe_runtime.segmented_mm`` (CPU): only slots with rows
    cost anything, and the products run in parallel. No autograd (serving only).

    Args:
        x: ``[N, in]`` rows sorted by slot.
        weights: segments ``[n_i, out, in]`` (``[n_i, in, out]`` if ``transposed``); slot ids run
            through them in order.
        offsets: ``[sum n_i]`` cumulative row ends, ``offsets[-1] == N``.

    Returns:
        ``[N, out]``.
    """
    load_extension()
    return torch.ops.moe_runtime.segmented_mm(x, weights, offsets, transposed)


def slot_rows_mm(
    x: torch.Tensor, weights: list[torch.Tensor], slots: torch.Tensor, transposed: bool
) -> torch.Tensor:
    """Each entry's row times its slot's weight, entries in any order (compiled op, CPU float32).

    Args:
        x: ``[T, in]``; entry ``r`` reads row ``r // K`` with ``K = len(slots) // T``.
        weights: segments ``[n_i, out, in]`` (``[n_i, in, out]`` if ``transposed``), contiguous slots.
        slots: ``[T*K]`` int64 slot of each entry; outside ``[0, sum n_i)`` gives a zero row.

    Returns:
        ``[T*K, out]``.
    """
    load_extension()
    return torch.ops.moe_runtime.slot_rows_mm(x, weights, slots, transposed)


def slot_rows_mm_reference(
    x: torch.Tensor, weights: list[torch.Tensor], slots: torch.Tensor, transposed: bool
) -> torch.Tensor:
    """Pure-PyTorch :func:`slot_rows_mm`."""
    flat = torch.cat(list(weights))
    per_row = slots.numel() // max(x.shape[0], 1)
    out = x.new_zeros(slots.numel(), flat.shape[2 if transposed else 1])
    for r, slot in enumerate(slots.tolist()):
        if 0 <= slot < flat.shape[0]:
            w = flat[slot] if transposed else flat[slot].transpose(0, 1)
            out[r] = x[r // per_row] @ w
    return out


def segmented_mm_reference(
    x: torch.Tensor, weights: list[torch.Tensor], offsets: torch.Tensor, transposed: bool
) -> torch.Tensor:
    """Pure-PyTorch :func:`segmented_mm`: one product per slot with rows, in slot order."""
    flat = torch.cat(list(weights))
    out_features = flat.shape[2 if transposed else 1]
    pieces, start = [], 0
    for slot, end in enumerate(offsets.tolist()):
        if end > start:
            w = flat[slot] if transposed else flat[slot].transpose(0, 1)
            pieces.append(x[start:end] @ w)
        start = end
    return torch.cat(pieces) if pieces else x.new_zeros(0, out_features)


def _fused_ok(x: torch.Tensor, segments: list[Segment]) -> bool:
    """Whether the compiled op can run this forward: CPU, no gradient needed, extension built."""
    if x.device.type != "cpu":
        return False
    if torch.is_grad_enabled() and (
        x.requires_grad or any(seg.up.requires_grad or seg.down.requires_grad for seg in segments)
    ):
        return False
    return extension_available()


def _fused_forward(
    experts: nn.Module, x: torch.Tensor, segments: list[Segment], offsets: torch.Tensor, slots: torch.Tensor
) -> torch.Tensor:
    """Every segment at once through :func:`segmented_mm` (``slots``: each row's slot id)."""
    transposed = bool(experts.is_transposed)

    def bias(name: str) -> torch.Tensor | None:
        parts = [getattr(seg, name) for seg in segments]
        if parts[0] is None:
            return None
        return (torch.cat(parts) if len(parts) > 1 else parts[0])[slots]

    h = segmented_mm(x, [seg.up for seg in segments], offsets, transposed)
    up_bias = bias("up_bias")
    if up_bias is not None:
        h = h + up_bias
    h = experts._apply_gate(h) if experts.has_gate else experts.act_fn(h)
    y = segmented_mm(h, [seg.down for seg in segments], offsets, transposed)
    down_bias = bias("down_bias")
    if down_bias is not None:
        y = y + down_bias
    if getattr(experts, "has_post_expert_norm", False):
        y = experts.post_expert_norm(y)
    return y


def _few_entries_ok(experts: nn.Module, x: torch.Tensor, segments: list[Segment]) -> bool:
    """Whether :func:`_few_entries_forward` can run: the fused op's conditions, float32 slots that are
    contiguous matrices, no expert biases, no post-expert norm."""
    if (
        x.dtype != torch.float32
        or getattr(experts, "has_post_expert_norm", False)
        or not _fused_ok(x, segments)
    ):
        return False
    return all(
        seg.up_bias is None
        and seg.down_bias is None
        and seg.up.dtype == seg.down.dtype == torch.float32
        and seg.up.stride(2) == 1
        and seg.up.stride(1) == seg.up.shape[2]
        and seg.down.stride(2) == 1
        and seg.down.stride(1) == seg.down.shape[2]
        for seg in segments
    )


def _few_entries_forward(
    experts: nn.Module,
    hidden: torch.Tensor,
    top_k_weights: torch.Tensor,
    slots: torch.Tensor,
    segments: list[Segment],
) -> torch.Tensor:
    """A decode step's entries in token order (``slots [T*K]``, entry ``t*K + k``), no permutation."""
    transposed = bool(experts.is_transposed)
    h = slot_rows_mm(hidden, [seg.up for seg in segments], slots, transposed)
    h = experts._apply_gate(h) if experts.has_gate else experts.act_fn(h)
    y = slot_rows_mm(h, [seg.down for seg in segments], slots, transposed)
    y = y.view(*top_k_weights.shape, -1) * top_k_weights.unsqueeze(-1).to(y.dtype)
    return y.sum(dim=1).to(hidden.dtype)


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
    if 0 < num_entries <= STREAM_ROWS_MAX and _few_entries_ok(experts, hidden, segments):
        return _few_entries_forward(experts, hidden, top_k_weights, routed.slot_ids, segments)
    x = hidden[routed.perm // top_k]
    sorted_slots = routed.slot_ids[routed.perm]
    offsets = routed.offsets.to(torch.int64)
    bounds = [0] + offsets.tolist()
    pieces = []
    if bounds[-1] and _fused_ok(hidden, segments):
        used = bounds[-1]
        pieces.append(_fused_forward(experts, x[:used], segments, offsets, sorted_slots[:used]))
        segments = []
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
