"""Per-expert views of fused expert weights, in the classic per-expert (ESFT) layout.

A fused experts module holds ``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]`` (or the
transposed / interleaved / no-gate / biased variants, see :class:`ExpertsLayout`). The official
ESFT adapter layout and older checkpoints key one expert as three ``nn.Linear`` weights:
``gate_proj.weight [I, H]``, ``up_proj.weight [I, H]``, ``down_proj.weight [H, I]``.
These functions convert one expert between the two.
"""

from __future__ import annotations

import torch

from ..ops.experts_mm import Segment
from .discovery import ExpertsLayout, MoELayer

__all__ = [
    "expert_segment",
    "split_expert",
    "split_slices",
    "fuse_slices",
    "merge_expert",
    "expert_tensor_names",
]


def expert_tensor_names(layout: ExpertsLayout) -> list[str]:
    """Per-expert tensor names in the classic layout (relative to ``<experts>.<e>.``)."""
    names = ["gate_proj.weight", "up_proj.weight"] if layout.has_gate else ["up_proj.weight"]
    names.append("down_proj.weight")
    if layout.has_bias:
        names += (["gate_proj.bias", "up_proj.bias"] if layout.has_gate else ["up_proj.bias"]) + [
            "down_proj.bias"
        ]
    return names


def _out_in(weight: torch.Tensor, layout: ExpertsLayout) -> torch.Tensor:
    """One expert's fused slice as ``[out, in]`` (the nn.Linear convention)."""
    return weight.transpose(0, 1) if layout.is_transposed else weight


def _halves(fused_out_first: torch.Tensor, layout: ExpertsLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """Split the output dim (dim 0) of a fused gate/up tensor into (gate, up)."""
    if layout.is_concatenated:
        half = fused_out_first.shape[0] // 2
        return fused_out_first[:half], fused_out_first[half:]
    return fused_out_first[0::2], fused_out_first[1::2]


def split_slices(layout: ExpertsLayout, fused: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Classic per-expert tensors from one expert's fused slices (``{param_name: slice}``).

    Returns contiguous clones: ``gate_proj.weight [I, H]``, ``up_proj.weight [I, H]``,
    ``down_proj.weight [H, I]`` (and biases when the layout has them).
    """
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        up = _out_in(fused[layout.up_name], layout)
        if layout.has_gate:
            out["gate_proj.weight"], out["up_proj.weight"] = _halves(up, layout)
        else:
            out["up_proj.weight"] = up
        out["down_proj.weight"] = _out_in(fused["down_proj"], layout)
        if layout.has_bias:
            up_bias = fused[f"{layout.up_name}_bias"]
            if layout.has_gate:
                out["gate_proj.bias"], out["up_proj.bias"] = _halves(up_bias, layout)
            else:
                out["up_proj.bias"] = up_bias
            out["down_proj.bias"] = fused["down_proj_bias"]
    return {name: tensor.detach().clone().contiguous() for name, tensor in out.items()}


def split_expert(layer: MoELayer, expert: int) -> dict[str, torch.Tensor]:
    """Copy one expert's weights out of the fused parameters, classic layout.

    Args:
        layer: the MoE layer.
        expert: routed expert id in ``[0, num_experts)``.

    Returns:
        ``{"gate_proj.weight": [I, H], "up_proj.weight": [I, H], "down_proj.weight": [H, I], ...}``
        (biases too when the family has them), contiguous clones.
    """
    return split_slices(
        layer.layout, {name: getattr(layer.experts, name)[expert] for name in layer.layout.param_names()}
    )


def _fuse_halves(gate: torch.Tensor, up: torch.Tensor, layout: ExpertsLayout) -> torch.Tensor:
    if layout.is_concatenated:
        return torch.cat([gate, up], dim=0)
    return torch.stack([gate, up], dim=1).reshape(gate.shape[0] * 2, *gate.shape[1:])


def fuse_slices(layout: ExpertsLayout, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`split_slices`: classic tensors -> one expert's fused slices.

    Returns:
        ``{param_name: slice}`` with the shapes of ``getattr(experts, param_name)[e]``.
    """
    up = (
        _fuse_halves(tensors["gate_proj.weight"], tensors["up_proj.weight"], layout)
        if layout.has_gate
        else tensors["up_proj.weight"]
    )
    fused = {
        layout.up_name: up.transpose(0, 1) if layout.is_transposed else up,
        "down_proj": tensors["down_proj.weight"].transpose(0, 1)
        if layout.is_transposed
        else tensors["down_proj.weight"],
    }
    if layout.has_bias:
        fused[f"{layout.up_name}_bias"] = (
            _fuse_halves(tensors["gate_proj.bias"], tensors["up_proj.bias"], layout)
            if layout.has_gate
            else tensors["up_proj.bias"]
        )
        fused["down_proj_bias"] = tensors["down_proj.bias"]
    return fused


def merge_expert(layer: MoELayer, expert: int, tensors: dict[str, torch.Tensor]) -> None:
    """Write classic-layout tensors of one expert into the fused parameters, in place."""
    experts = layer.experts
    with torch.no_grad():
        for name, value in fuse_slices(layer.layout, tensors).items():
            target = getattr(experts, name)
            if tuple(value.shape) != tuple(target[expert].shape):
                raise ValueError(
                    f"{name}: shape {tuple(value.shape)} does not fit expert slice {tuple(target[expert].shape)}"
                )
            target[expert].copy_(value.to(target.dtype))


def expert_segment(layer: MoELayer) -> Segment:
    """The layer's own fused expert parameters as the slots ``0..E-1`` (used in place, never copied)."""
    experts, layout = layer.experts, layer.layout
    return Segment(
        start=0,
        up=getattr(experts, layout.up_name),
        down=experts.down_proj,
        up_bias=getattr(experts, f"{layout.up_name}_bias") if layout.has_bias else None,
        down_bias=experts.down_proj_bias if layout.has_bias else None,
    )
