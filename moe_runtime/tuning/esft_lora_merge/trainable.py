"""Low-rank updates of the selected experts' own weights, trained through the slot-routed experts.

For each MoE layer with selected experts, :class:`LayerFactors` holds, per selected expert and per
classic weight (``gate_proj`` / ``up_proj`` / ``down_proj``), a pair ``A [r, in]``, ``B [out, r]``
(the only parameters), and frozen copies of those experts' fused weights. Every forward builds the
selected experts as ``W + (alpha / r) * B @ A`` (fused layout) and runs them as segment 1 of the
same slot-routed computation ESFT trains and serves with:

    slot table [1, E]: expert e -> e (base) or E + position among the selected experts
    slot_routed_experts -> segmented grouped GEMM over [model's experts | W + s * B A of the selected]

Router, biases, other experts and every other weight stay exactly as loaded.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from ...models import MoEModelInfo, state_of
from ...models.discovery import MoELayer
from ...models.weights import expert_segment, fuse_slices, split_expert
from ...ops.experts_mm import Segment
from ..esft.config import ExpertSelection
from ..esft.trainable import SlotExecuted

__all__ = ["LayerFactors", "LowRankExperts", "weight_names"]


def weight_names(layer: MoELayer) -> list[str]:
    """The classic weights that get a low-rank update (``gate_proj.weight``, ...; no biases)."""
    return ["gate_proj.weight", "up_proj.weight"] if layer.layout.has_gate else ["up_proj.weight"]


def _all_weight_names(layer: MoELayer) -> list[str]:
    return [*weight_names(layer), "down_proj.weight"]


class LayerFactors(SlotExecuted, nn.Module):
    """Low-rank factors of one layer's selected experts, and the executor that uses them.

    Args:
        layer: the MoE layer (its experts are read once, for the frozen copies and the shapes).
        expert_ids: selected routed expert ids (sorted).
        rank, alpha: LoRA rank r and alpha (the update is scaled by ``alpha / r``).
        generator: initialises ``A`` (Kaiming-uniform, as peft); ``B`` starts at zero.
    """

    def __init__(
        self, layer: MoELayer, expert_ids: list[int], rank: int, alpha: float, generator: torch.Generator
    ) -> None:
        super().__init__()
        self.layer_index = layer.index
        self.num_experts = layer.num_experts
        self.expert_ids = list(expert_ids)
        self.scale = alpha / rank
        self.names = _all_weight_names(layer)
        self._layout = dataclasses.replace(layer.layout, has_bias=False)
        base = expert_segment(layer)
        ids = torch.tensor(self.expert_ids, dtype=torch.long, device=base.up.device)
        self.register_buffer("up0", base.up.detach()[ids].clone(), persistent=False)
        self.register_buffer("down0", base.down.detach()[ids].clone(), persistent=False)
        self.up_bias = base.up_bias.detach()[ids].clone() if base.up_bias is not None else None
        self.down_bias = base.down_bias.detach()[ids].clone() if base.down_bias is not None else None
        classic = split_expert(layer, self.expert_ids[0])
        dtype, device = base.up.dtype, base.up.device
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for i, name in enumerate(self.names):
            out_dim, in_dim = classic[name].shape
            # kaiming_uniform_(a=sqrt(5)), as peft and nn.Linear: U(-1/sqrt(in), 1/sqrt(in))
            a = (torch.rand((len(ids), rank, in_dim), generator=generator) * 2 - 1) / math.sqrt(in_dim)
            self.lora_A[str(i)] = nn.Parameter(a.to(device=device, dtype=dtype))
            self.lora_B[str(i)] = nn.Parameter(
                torch.zeros((len(ids), out_dim, rank), dtype=dtype, device=device)
            )
        table = torch.arange(self.num_experts, dtype=torch.int32)
        table[ids.cpu()] = self.num_experts + torch.arange(len(self.expert_ids), dtype=torch.int32)
        self.register_buffer("slot_table", table.unsqueeze(0).to(device), persistent=False)

    def factors(self, position: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{classic weight name: (A [r, in], B [out, r])}`` of the ``position``-th selected expert."""
        return {
            name: (self.lora_A[str(i)][position], self.lora_B[str(i)][position])
            for i, name in enumerate(self.names)
        }

    def segment(self) -> Segment:
        """The selected experts as ``W + s * B @ A`` in the fused layout (differentiable in A, B)."""
        deltas = {
            name: self.scale * torch.bmm(self.lora_B[str(i)], self.lora_A[str(i)])
            for i, name in enumerate(self.names)
        }  # [n, out, in] each
        fused = [
            fuse_slices(self._layout, {name: d[p] for name, d in deltas.items()})
            for p in range(len(self.expert_ids))
        ]
        up = self.up0 + torch.stack([f[self._layout.up_name] for f in fused])
        down = self.down0 + torch.stack([f["down_proj"] for f in fused])
        return Segment(self.num_experts, up, down, self.up_bias, self.down_bias)


class LowRankExperts(nn.Module):
    """Every layer's factors; attach to a model whose experts hook is installed.

    Args:
        info: the model's MoE layers (``install`` has run).
        selection: the experts to update.
        rank, alpha: LoRA rank and alpha.
        seed: seed of ``A``'s initialisation.
    """

    def __init__(
        self, info: MoEModelInfo, selection: ExpertSelection, rank: int, alpha: float, seed: int
    ) -> None:
        super().__init__()
        self.info = info
        generator = torch.Generator().manual_seed(seed)
        self.layers = nn.ModuleDict(
            {
                str(layer): LayerFactors(info.by_index(layer), ids, rank, alpha, generator)
                for layer, ids in sorted(selection.experts.items())
                if ids
            }
        )

    def attach(self) -> None:
        for key, layer in self.layers.items():
            layer.attach(self.info.by_index(int(key)))

    def detach(self) -> None:
        for key in self.layers:
            state_of(self.info.by_index(int(key)).experts).executor = None

    def factors(self) -> dict[tuple[int, int], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        """``(layer, expert) -> {classic weight name: (A, B)}``."""
        return {
            (int(key), expert): layer.factors(position)
            for key, layer in self.layers.items()
            for position, expert in enumerate(layer.expert_ids)
        }
