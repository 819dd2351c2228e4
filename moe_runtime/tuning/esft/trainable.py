"""ESFT's trainable experts: copies of exactly the selected experts, nothing else.

For each MoE layer with selected experts, :class:`LayerTrainable` holds ``[n_selected, ...]``
copies of their fused weights as parameters; the base expert tensors stay frozen in place. The
experts hook runs the same slot-routed computation as serving, with the copies as segment 1:

    slot table [1, E]: expert e -> e (base) or E + position among the copies (selected)
    slot_routed_experts -> segmented grouped GEMM over [model's experts | trainable copies]

Gradients and optimizer state therefore exist only for the selected experts (no full-size fused
gradient), and the copies are exactly what the serving arena later loads into its slots.
"""

from __future__ import annotations

import torch
from torch import nn

from ...models import MoEModelInfo, state_of
from ...models.discovery import MoELayer
from ...models.weights import expert_segment
from ...ops.experts_mm import Segment
from ...ops.slot_routed import slot_routed_experts
from .config import ExpertSelection

__all__ = ["LayerTrainable", "TrainableExperts"]


class SlotExecuted:
    """The experts hook of a layer whose trainable experts come from ``segment()``: every token is
    owned by this adapter, the selected experts run from the segment and the rest from the base."""

    slot_table: torch.Tensor
    _base: Segment

    def segment(self) -> Segment:
        raise NotImplementedError

    def execute(
        self, experts: nn.Module, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """Executor for the experts hook: ``hidden [T, H] -> [T, H]`` (one owner: this adapter)."""
        owners = torch.zeros(hidden.shape[0], dtype=torch.long, device=hidden.device)
        segments = [self._base, self.segment()]
        return slot_routed_experts(
            experts, hidden, top_k_index, top_k_weights, owners, self.slot_table, segments
        )

    def attach(self, layer: MoELayer) -> None:
        self._base = expert_segment(layer)
        state_of(layer.experts).executor = self.execute


class LayerTrainable(SlotExecuted, nn.Module):
    """Trainable copies of one layer's selected experts, and the executor that uses them.

    Args:
        layer: the MoE layer.
        expert_ids: selected routed expert ids (sorted).
        start: the selected experts' starting weights as a segment ``[n_selected, ...]`` (default:
            copied out of the layer's own fused parameters; offloaded experts are read from their store).
            Its tensors become the parameters (not copied).
    """

    def __init__(self, layer: MoELayer, expert_ids: list[int], start: Segment | None = None) -> None:
        super().__init__()
        self.layer_index = layer.index
        self.num_experts = layer.num_experts
        self.expert_ids = list(expert_ids)
        if start is None:
            base = expert_segment(layer)
            ids = torch.tensor(self.expert_ids, dtype=torch.long, device=base.up.device)
            start = Segment(
                0,
                *(
                    None if t is None else t.detach()[ids]
                    for t in (base.up, base.down, base.up_bias, base.down_bias)
                ),
            )
        self.up = nn.Parameter(start.up.detach())
        self.down = nn.Parameter(start.down.detach())
        self.up_bias = nn.Parameter(start.up_bias.detach()) if start.up_bias is not None else None
        self.down_bias = nn.Parameter(start.down_bias.detach()) if start.down_bias is not None else None
        ids = torch.tensor(self.expert_ids, dtype=torch.long)
        table = torch.arange(self.num_experts, dtype=torch.int32)
        table[ids] = self.num_experts + torch.arange(len(self.expert_ids), dtype=torch.int32)
        self.register_buffer("slot_table", table.unsqueeze(0).to(self.up.device), persistent=False)

    def segment(self) -> Segment:
        return Segment(self.num_experts, self.up, self.down, self.up_bias, self.down_bias)

    def fused_slices(self, position: int, layout) -> dict[str, torch.Tensor]:
        """The ``position``-th copy as ``{fused param name: slice}`` (see ``split_slices``)."""
        out = {layout.up_name: self.up[position], "down_proj": self.down[position]}
        if self.up_bias is not None:
            out[f"{layout.up_name}_bias"] = self.up_bias[position]
            out["down_proj_bias"] = self.down_bias[position]
        return out


class TrainableExperts(nn.Module):
    """Every layer's trainable copies; attach to a model whose experts hook is installed.

    Args:
        info: the model's MoE layers (``install`` has run).
        selection: the experts to train.
    """

    def __init__(self, info: MoEModelInfo, selection: ExpertSelection) -> None:
        super().__init__()
        self.info = info
        self.layers = nn.ModuleDict(
            {
                str(layer): LayerTrainable(info.by_index(layer), ids)
                for layer, ids in sorted(selection.experts.items())
            }
        )

    def attach(self) -> None:
        """Plug every layer's executor into its experts module."""
        for key, layer in self.layers.items():
            layer.attach(self.info.by_index(int(key)))

    def detach(self) -> None:
        for key in self.layers:
            state_of(self.info.by_index(int(key)).experts).executor = None
