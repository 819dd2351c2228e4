"""The ESFT training arena: trainable copies of exactly the selected experts, nothing else.

For each MoE layer with selected experts, the arena holds ``[n_selected, ...]`` copies of their fused
weights as parameters; the base expert tensors stay frozen in place. An executor plugged into the
experts hook routes each selected expert's tokens to its arena copy:

    slot table: expert e -> e (base) or E + position in the arena (tuned)
    reroute_permute -> segmented grouped GEMM over [base experts | arena]

Gradients and optimizer state therefore exist only for the selected experts (no full-size fused
gradient), and the arena is exactly what the serving runtime later loads.
"""

from __future__ import annotations

import torch
from torch import nn

from ...models import MoEModelInfo, state_of
from ...models.discovery import MoELayer
from ...ops.experts_mm import Segment, segmented_experts
from ...ops.reroute import reroute_permute
from .config import ExpertSelection

__all__ = ["LayerArena", "ESFTArena", "base_segment"]


def base_segment(layer: MoELayer) -> Segment:
    """The frozen base experts of a layer as slots ``0..E-1``."""
    experts, layout = layer.experts, layer.layout
    return Segment(
        start=0,
        up=getattr(experts, layout.up_name),
        down=experts.down_proj,
        up_bias=getattr(experts, f"{layout.up_name}_bias") if layout.has_bias else None,
        down_bias=experts.down_proj_bias if layout.has_bias else None,
    )


class LayerArena(nn.Module):
    """Trainable copies of one layer's selected experts, and the executor that uses them.

    Args:
        layer: the MoE layer.
        expert_ids: selected routed expert ids (sorted).
    """

    def __init__(self, layer: MoELayer, expert_ids: list[int]) -> None:
        super().__init__()
        self.layer_index = layer.index
        self.num_experts = layer.num_experts
        self.expert_ids = list(expert_ids)
        base = base_segment(layer)
        ids = torch.tensor(self.expert_ids, dtype=torch.long, device=base.up.device)
        self.up = nn.Parameter(base.up.detach()[ids].clone())
        self.down = nn.Parameter(base.down.detach()[ids].clone())
        self.up_bias = nn.Parameter(base.up_bias.detach()[ids].clone()) if base.up_bias is not None else None
        self.down_bias = (
            nn.Parameter(base.down_bias.detach()[ids].clone()) if base.down_bias is not None else None
        )
        table = torch.arange(self.num_experts, dtype=torch.int32)
        table[ids.cpu()] = self.num_experts + torch.arange(len(self.expert_ids), dtype=torch.int32)
        self.register_buffer("slot_table", table.unsqueeze(0).to(base.up.device), persistent=False)

    def segment(self) -> Segment:
        return Segment(self.num_experts, self.up, self.down, self.up_bias, self.down_bias)

    def execute(
        self, experts: nn.Module, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """Executor for the experts hook: ``hidden [T, H] -> [T, H]``."""
        owners = torch.zeros(hidden.shape[0], dtype=torch.long, device=hidden.device)
        routed = reroute_permute(
            top_k_index, owners, self.slot_table, self.num_experts + len(self.expert_ids)
        )
        return segmented_experts(experts, hidden, top_k_weights, routed, [self._base, self.segment()])

    def attach(self, layer: MoELayer) -> None:
        self._base = base_segment(layer)
        state_of(layer.experts).executor = self.execute

    def fused_slices(self, position: int, layout) -> dict[str, torch.Tensor]:
        """The arena's ``position``-th expert as ``{fused param name: slice}`` (see ``split_slices``)."""
        out = {layout.up_name: self.up[position], "down_proj": self.down[position]}
        if self.up_bias is not None:
            out[f"{layout.up_name}_bias"] = self.up_bias[position]
            out["down_proj_bias"] = self.down_bias[position]
        return out


class ESFTArena(nn.Module):
    """All layers' arenas; attach to a model whose experts hook is installed.

    Args:
        info: the model's MoE layers (``install`` has run).
        selection: the experts to train.
    """

    def __init__(self, info: MoEModelInfo, selection: ExpertSelection) -> None:
        super().__init__()
        self.info = info
        self.layers = nn.ModuleDict(
            {
                str(layer): LayerArena(info.by_index(layer), ids)
                for layer, ids in sorted(selection.experts.items())
            }
        )

    def attach(self) -> None:
        """Plug every layer's executor into its experts module."""
        for key, arena in self.layers.items():
            arena.attach(self.info.by_index(int(key)))

    def detach(self) -> None:
        for key in self.layers:
            state_of(self.info.by_index(int(key)).experts).executor = None
