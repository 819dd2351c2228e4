"""The one serving executor: every MoE layer runs each token with the experts of its own adapter.

    router -> top_k_index [T, K] (base expert ids; the router is shared and frozen)
           -> base experts: for each pass of the layer, a slot table [A, E] and segments
              (resident: the arena's table over [model's experts | adapter chunks], one pass;
               offloaded: the cache's slots | adapter chunks, one pass per group of cached experts)
           -> slot_routed_experts: reroute_permute + segmented grouped GEMM, summed over passes
           -> + per-token terms of the adapters present (routed LoRA), batched per adapter
           -> [T, H]

Exact for ESFT adapters: they change only routed experts, so every token is routed exactly as in
its adapter merged into the base model, and the slot holds exactly the merged expert's weights.
Adapters with a per-token term (routed LoRA) own a row of base experts; their term is added
afterwards for their tokens only.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Protocol

import torch
from torch import nn

from ..models import MoEModelInfo, state_of
from ..models.discovery import MoELayer
from ..models.weights import expert_segment
from ..ops.experts_mm import Segment
from ..ops.slot_routed import slot_routed_experts
from .arena import ExpertArena, LayerSlots

__all__ = ["BaseExperts", "ResidentExperts", "SlotRoutedExecutor", "TokenTerm"]

Pass = tuple[torch.Tensor, list[Segment]]
"""One pass over a layer's entries: ``(slot table [A, E] int32, segments covering its slots)``."""


class TokenTerm(Protocol):
    """A per-token term added to a layer's experts output for one adapter's tokens (routed LoRA).

    ``term.layer(index)`` is None for a layer without one, else a module called as
    ``module(hidden [T_a, H], top_k_index [T_a, K], top_k_weights [T_a, K]) -> (delta [T_a, H], _)``.
    """

    def layer(self, index: int) -> nn.Module | None: ...


class BaseExperts(Protocol):
    """Where the base experts of every layer come from (the model itself, or an offload tier).

    Attributes:
        offloaded_to: the tier holding the base experts (``disk``, ``cpu``), None when resident.
        expert_parts: reads expert parameters that are not materialized, for fingerprints (None
            when resident).
    """

    offloaded_to: str | None
    expert_parts: object | None

    def segment(self, layer: MoELayer) -> Segment:
        """Segment 0 of the layer's slots; adapter chunks take its shape, dtype and device."""

    def passes(
        self, slots: LayerSlots, hidden: torch.Tensor, owners: torch.Tensor, top_k_index: torch.Tensor
    ) -> Iterator[Pass]:
        """The passes that run a layer's entries (their outputs add up)."""

    def materialized(self, experts: dict[int, list[int]]) -> contextlib.AbstractContextManager:
        """While open, the listed base experts are readable in the experts modules."""

    def chunk_tokens(self, layer: MoELayer) -> int | None:
        """Tokens a pass runs at a time (bounded intermediates), None for all at once."""

    def threads(self) -> contextlib.AbstractContextManager:
        """While open, torch runs with the thread settings serving wants (restored on exit)."""

    def close(self) -> None:
        """Release what serving from this tier holds (reader threads)."""


class ResidentExperts:
    """Base experts in the model's own fused parameters: one pass over the arena's table."""

    offloaded_to = None
    expert_parts = None

    def segment(self, layer: MoELayer) -> Segment:
        return expert_segment(layer)

    def passes(self, slots, hidden, owners, top_k_index) -> Iterator[Pass]:
        yield slots.table, slots.segments

    def materialized(self, experts):
        return contextlib.nullcontext()

    def chunk_tokens(self, layer):
        return None

    def threads(self):
        return contextlib.nullcontext()

    def close(self) -> None:
        pass


class SlotRoutedExecutor:
    """Plugs an arena (and its base experts) into every experts module (``install`` must have run).

    The engine sets the owner of every token before each forward; a forward without owners (a
    plain model call) runs every token with the base experts.

    Args:
        arena: the model's expert arena (owner rows, adapter chunks).
        base: where the base experts come from (default: the model's own, resident).
    """

    def __init__(self, arena: ExpertArena, base: BaseExperts | None = None) -> None:
        self.arena = arena
        self.base = base if base is not None else ResidentExperts()
        self.token_owner: torch.Tensor | None = None
        self.token_valid: torch.Tensor | None = None  # [T] bool: False on left padding
        self.terms: dict[int, TokenTerm] = {}  # per-token terms by owner id (routed LoRA)
        self._term_rows: list[tuple[TokenTerm, torch.Tensor]] = []
        # called as observer(layer index, top_k_index [T, K]) in every MoE layer while set (the
        # engine measures a prompt's routing for automatic adapter choice)
        self.observer: Callable[[int, torch.Tensor], None] | None = None

    @property
    def info(self) -> MoEModelInfo:
        return self.arena.info

    def attach(self) -> None:
        """Make every experts module of the arena's model run through this executor."""
        for slots in self.arena.layers.values():
            state_of(slots.layer.experts).executor = functools.partial(self._run, slots)

    def detach(self) -> None:
        """Restore the stock expert computation."""
        for slots in self.arena.layers.values():
            state_of(slots.layer.experts).executor = None

    def close(self) -> None:
        """Detach and release the base tier."""
        self.detach()
        self.base.close()

    # owners ----------------------------------------------------------------------------------

    def set_owners(self, row_owner: torch.Tensor, seq_len: int, valid: torch.Tensor | None = None) -> None:
        """Owners of the next forward's tokens.

        Args:
            row_owner: ``[B]`` int64 owner id of each batch row.
            seq_len: tokens per row in this forward; MoE blocks flatten ``[B, S]`` row-major,
                so token ``b * S + s`` belongs to row ``b``.
            valid: ``[B, S]`` attention mask of the forward's tokens (0 on left padding): padding
                tokens skip the routed experts (their outputs are masked out anyway), so an
                offloaded layer reads only the experts of real tokens.
        """
        self.token_owner = row_owner.to(torch.int64).repeat_interleave(seq_len)
        self.token_valid = None
        if valid is not None and not bool(valid.all()):
            self.token_valid = valid.reshape(-1).bool()
        self._term_rows = []
        if self.terms:
            present = set(torch.unique(row_owner).tolist())
            steps = torch.arange(seq_len, device=row_owner.device)
            for owner, term in self.terms.items():
                if owner in present:
                    rows = torch.nonzero(row_owner == owner).squeeze(1)
                    self._term_rows.append((term, (rows[:, None] * seq_len + steps).reshape(-1)))

    def clear_owners(self) -> None:
        self.token_owner = None
        self.token_valid = None
        self._term_rows = []

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

    # one layer -------------------------------------------------------------------------------

    @torch.no_grad()
    def _add_terms(
        self,
        layer_index: int,
        out: torch.Tensor,
        hidden: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
    ) -> torch.Tensor:
        """``out`` plus the per-token terms of the adapters present in this forward (in place)."""
        for term, tokens in self._term_rows:
            module = term.layer(layer_index)
            if module is None or tokens.numel() == 0:
                continue
            delta, _ = module(hidden.index_select(0, tokens), top_k_index[tokens], top_k_weights[tokens])
            out.index_add_(0, tokens, delta.to(out.dtype))
        return out

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
        if self.observer is not None:
            self.observer(slots.layer.index, top_k_index)
        routed = top_k_index
        if self.token_valid is not None:  # padding: expert id E, a dropped entry
            valid = self.token_valid.to(top_k_index.device)
            routed = top_k_index.masked_fill(~valid.unsqueeze(1), slots.num_experts)
        chunk = self.base.chunk_tokens(slots.layer)
        out = None
        for table, segments in self.base.passes(slots, hidden, owners, routed):
            partial = slot_routed_experts(
                experts,
                hidden,
                routed,
                top_k_weights,
                owners,
                table,
                segments,
                skip_unused=True,
                chunk_tokens=chunk,
            )
            out = partial if out is None else out + partial
        return self._add_terms(slots.layer.index, out, hidden, top_k_index, top_k_weights)
