"""Batched rerouting: every MoE layer runs each token with the experts of its own adapter.

    router -> top_k_index [T, K] (base expert ids; the router is shared and frozen)
           -> reroute_permute(top_k_index, token_owner [T], slot_table [A, E])   one fused op
           -> segmented grouped GEMM over [base experts | adapter chunks]        no weight copied
           -> [T, H]

Exact for ESFT adapters: they change only routed experts, so every token is routed exactly as in
its adapter merged into the base model, and the slot holds exactly the merged expert's weights.

Routed-LoRA adapters (``lora``, by owner id) add their term afterwards, batched per adapter present
(see :mod:`moe_runtime.tuning.routed_lora.serving`); their owner rows map every expert to the base.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from ..models import state_of
from ..ops.experts_mm import segmented_experts
from ..ops.reroute import reroute_permute
from ..tuning.routed_lora.serving import LoraRows, add_lora_terms, lora_rows
from .arena import ExpertArena, LayerSlots

__all__ = ["OwnerRouting", "ReroutingExecutor"]


class OwnerRouting:
    """What every serving executor shares: the owner of each token and the routed-LoRA terms.

    Subclasses run the experts and then pass the layer's output through :meth:`add_lora`.

    Args:
        arena: the model's expert arena (owner rows of every adapter).
    """

    def __init__(self, arena: ExpertArena) -> None:
        self.arena = arena
        self.token_owner: torch.Tensor | None = None
        self.lora: dict = {}  # routed-LoRA adapters by owner id (RoutedLora)
        self._lora_rows: LoraRows = []

    def set_owners(self, row_owner: torch.Tensor, seq_len: int) -> None:
        """Owners of the next forward's tokens.

        Args:
            row_owner: ``[B]`` int64 owner id of each batch row.
            seq_len: tokens per row in this forward; MoE blocks flatten ``[B, S]`` row-major,
                so token ``b * S + s`` belongs to row ``b``.
        """
        self.token_owner = row_owner.to(torch.int64).repeat_interleave(seq_len)
        self._lora_rows = lora_rows(self.lora, row_owner, seq_len)

    def clear_owners(self) -> None:
        self.token_owner = None
        self._lora_rows = []

    def owners_for(self, layer_index: int, hidden: torch.Tensor) -> torch.Tensor:
        """``[T]`` owner of each token of this forward (the base model when none were set)."""
        owners = self.token_owner
        if owners is None:
            return torch.zeros(hidden.shape[0], dtype=torch.int64, device=hidden.device)
        if owners.shape[0] != hidden.shape[0]:
            raise RuntimeError(
                f"layer {layer_index}: the experts received {hidden.shape[0]} tokens but owners were "
                f"set for {owners.shape[0]} (this family does not flatten [batch, seq] row-major)"
            )
        return owners.to(hidden.device)

    def add_lora(
        self,
        layer_index: int,
        out: torch.Tensor,
        hidden: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
    ) -> torch.Tensor:
        """``out`` plus the routed-LoRA terms of the adapters present in this forward (in place)."""
        if self._lora_rows:
            add_lora_terms(self._lora_rows, layer_index, out, hidden, top_k_index, top_k_weights)
        return out


class ReroutingExecutor(OwnerRouting):
    """Plugs the arena into every experts module of a model (``install`` must have run).

    The engine sets the owner of every token before each forward; a forward without owners (a
    plain model call) runs every token with the base experts.

    Args:
        arena: the model's expert arena.
    """

    def attach(self) -> None:
        """Make every experts module of the arena's model run through this executor."""
        for slots in self.arena.layers.values():
            state_of(slots.layer.experts).executor = functools.partial(self._run, slots)

    def detach(self) -> None:
        """Restore the stock expert computation."""
        for slots in self.arena.layers.values():
            state_of(slots.layer.experts).executor = None

    def _run(
        self,
        slots: LayerSlots,
        experts: nn.Module,
        hidden: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
    ) -> torch.Tensor:
        """One layer: ``hidden [T, H]``, ``top_k_index [T, K]``, ``top_k_weights [T, K]`` -> ``[T, H]``."""
        owners = self.owners_for(slots.layer.index, hidden)
        routed = reroute_permute(top_k_index, owners, slots.table, slots.num_slots)
        segments = slots.segments
        if len(segments) > 1 and int(routed.offsets[slots.num_experts - 1]) == int(routed.offsets[-1]):
            # no entry of this forward uses an adapter slot of this layer: run the base experts alone
            routed = routed._replace(offsets=routed.offsets[: slots.num_experts])
            segments = segments[:1]
        out = segmented_experts(experts, hidden, top_k_weights, routed, segments)
        return self.add_lora(slots.layer.index, out, hidden, top_k_index, top_k_weights)
