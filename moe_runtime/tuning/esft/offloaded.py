"""ESFT with the frozen experts offloaded: the selected experts train in RAM, every other routed
expert is read through the offload tier in the forward pass and read again in the backward pass.

    hidden [T, H], top_k_index [T, K], top_k_weights [T, K]
      -> trainable copies (slot table: selected e -> its position, others -1): plain autograd
      -> frozen experts (slot table: selected -1, others e): OffloadedExperts.apply
           forward:  the tier's passes, no graph kept; saves hidden, top_k_weights, top_k_index
           backward: the tier's passes again (experts read back as the cache needs them); per pass a
                     local graph over (hidden, top_k_weights), differentiated before the next pass
                     may reuse its slots -> grad hidden [T, H], grad top_k_weights [T, K]
      -> sum of both

So memory holds the budget's slots, the trainable copies and, per layer, the tensors the autograd
function saves (sized by the tokens, not by the model); no frozen expert weight and no per-expert
intermediate of a frozen expert outlives its pass. Every MoE layer runs this way, selected or not.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from ...models import MoEModelInfo, state_of
from ...models.discovery import MoELayer
from ...ops.experts_mm import Segment
from ...ops.slot_routed import slot_routed_experts
from .config import ExpertSelection
from .trainable import LayerTrainable, TrainableExperts

__all__ = ["FrozenExperts", "OffloadedExperts", "OffloadedTrainableExperts", "unregistered_experts"]


class FrozenExperts:
    """A layer's frozen routed experts served by the offload tier (the selected ones dropped).

    Also the ``LayerSlots`` face the tier's ``passes`` reads: ``layer``, ``num_experts``, ``table``
    ``[1, E]`` (expert e -> e, a selected expert -> -1) and no adapter ``chunks``.

    Args:
        tier: the offload tier (``passes`` over its slot caches).
        layer: the MoE layer.
        selected: the layer's trained expert ids (run elsewhere).
    """

    def __init__(self, tier, layer: MoELayer, selected: list[int]) -> None:
        self.tier = tier
        self.layer = layer
        self.num_experts = layer.num_experts
        self.chunks: list[Segment] = []
        table = torch.arange(layer.num_experts, dtype=torch.int32)
        table[torch.tensor(selected, dtype=torch.long)] = -1
        self.table = table.unsqueeze(0)

    def passes(self, hidden: torch.Tensor, top_k_index: torch.Tensor) -> Iterator[tuple[torch.Tensor, list]]:
        """The tier's passes: ``(slot table [1, E], segments)``; a pass's slots stay valid until the next."""
        owners = torch.zeros(hidden.shape[0], dtype=torch.long, device=hidden.device)
        return self.tier.passes(self, hidden, owners, top_k_index)

    def run(
        self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """``[T, H]``: the frozen experts' weighted outputs (differentiable in hidden and weights)."""
        return OffloadedExperts.apply(hidden, top_k_weights, top_k_index, self)


class OffloadedExperts(torch.autograd.Function):
    """The frozen experts of one layer, their weights read through the tier in both passes.

    ``apply(hidden [T, H], top_k_weights [T, K], top_k_index [T, K], frozen) -> [T, H]``; gradients
    for ``hidden`` and ``top_k_weights`` (none for the experts, which are frozen).
    """

    @staticmethod
    def forward(ctx, hidden, top_k_weights, top_k_index, frozen: FrozenExperts):
        experts = frozen.layer.experts
        owners = torch.zeros(hidden.shape[0], dtype=torch.long, device=hidden.device)
        out = None
        with torch.no_grad():
            for table, segments in frozen.passes(hidden, top_k_index):
                partial = slot_routed_experts(
                    experts, hidden, top_k_index, top_k_weights, owners, table, segments, skip_unused=True
                )
                out = partial if out is None else out + partial
        if out is None:  # no pass (no token): nothing routed
            out = torch.zeros_like(hidden)
        ctx.frozen = frozen
        ctx.save_for_backward(hidden, top_k_weights, top_k_index)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, top_k_weights, top_k_index = ctx.saved_tensors
        frozen: FrozenExperts = ctx.frozen
        experts = frozen.layer.experts
        want_hidden, want_weights = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (want_hidden or want_weights):
            return None, None, None, None
        owners = torch.zeros(hidden.shape[0], dtype=torch.long, device=hidden.device)
        grad_hidden = torch.zeros_like(hidden) if want_hidden else None
        grad_weights = torch.zeros_like(top_k_weights) if want_weights else None
        with torch.enable_grad():
            h = hidden.detach().requires_grad_(True)
            w = top_k_weights.detach().requires_grad_(True)
            for table, segments in frozen.passes(hidden, top_k_index):
                partial = slot_routed_experts(
                    experts, h, top_k_index, w, owners, table, segments, skip_unused=True
                )
                # differentiated now: the next pass may read other experts into these slots
                gh, gw = torch.autograd.grad(partial, (h, w), grad_out, allow_unused=True)
                if want_hidden and gh is not None:
                    grad_hidden += gh
                if want_weights and gw is not None:
                    grad_weights += gw
        return grad_hidden, grad_weights, None, None


class OffloadedLayerTrainable(LayerTrainable):
    """A layer's trainable copies (started from the store) next to its offloaded frozen experts."""

    def __init__(self, layer: MoELayer, expert_ids: list[int], tier) -> None:
        start = _read_start(tier.store, layer, expert_ids, tier.compute_dtype)
        super().__init__(layer, expert_ids, start=start)
        ids = torch.tensor(self.expert_ids, dtype=torch.long)
        table = torch.full((layer.num_experts,), -1, dtype=torch.int32)
        table[ids] = torch.arange(len(self.expert_ids), dtype=torch.int32)
        self.register_buffer("train_table", table.unsqueeze(0), persistent=False)
        self._frozen = FrozenExperts(tier, layer, self.expert_ids)

    def execute(
        self, experts: nn.Module, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """``hidden [T, H] -> [T, H]``: trainable copies (autograd) plus the offloaded frozen experts."""
        owners = torch.zeros(hidden.shape[0], dtype=torch.long, device=hidden.device)
        copies = Segment(0, self.up, self.down, self.up_bias, self.down_bias)
        out = slot_routed_experts(
            experts, hidden, top_k_index, top_k_weights, owners, self.train_table, [copies]
        )
        return out + self._frozen.run(hidden, top_k_index, top_k_weights)

    def attach(self, layer: MoELayer) -> None:
        state_of(layer.experts).executor = self.execute


def _read_start(store, layer: MoELayer, expert_ids: list[int], dtype: torch.dtype) -> Segment:
    """The selected experts' weights read from the store, stacked ``[n_selected, ...]`` in ``dtype``."""
    read = [store.read_expert(layer.index, expert) for expert in expert_ids]
    layout = layer.layout

    def stacked(name: str) -> torch.Tensor | None:
        if name not in read[0]:
            return None
        out = torch.empty((len(read), *read[0][name].shape), dtype=dtype)
        for position, tensors in enumerate(read):
            out[position].copy_(tensors.pop(name))
        return out

    return Segment(
        0,
        stacked(layout.up_name),
        stacked("down_proj"),
        stacked(f"{layout.up_name}_bias"),
        stacked("down_proj_bias"),
    )


class OffloadedTrainableExperts(TrainableExperts):
    """ESFT's trainable arena over an offload tier: copies of the selected experts (read once from the
    store, in the compute dtype) in ``layers``; every MoE layer's frozen experts through the tier.

    Args:
        info: the model's MoE layers (``install`` has run; the fused expert parameters are on meta).
        selection: the experts to train.
        tier: an ``OffloadTier`` (its ``store`` and ``passes``).
    """

    def __init__(self, info: MoEModelInfo, selection: ExpertSelection, tier) -> None:
        nn.Module.__init__(self)
        self.info = info
        self.tier = tier
        self.layers = nn.ModuleDict(
            {
                str(layer): OffloadedLayerTrainable(info.by_index(layer), ids, tier)
                for layer, ids in sorted(selection.experts.items())
                if ids
            }
        )
        self.frozen_only = {
            layer.index: FrozenExperts(tier, layer, [])
            for layer in info.layers
            if str(layer.index) not in self.layers
        }

    def attach(self) -> None:
        super().attach()
        for index, frozen in self.frozen_only.items():
            state_of(self.info.by_index(index).experts).executor = _frozen_executor(frozen)

    def detach(self) -> None:
        for layer in self.info.layers:
            state_of(layer.experts).executor = None


def _frozen_executor(frozen: FrozenExperts):
    def execute(experts, hidden, top_k_index, top_k_weights):
        return frozen.run(hidden, top_k_index, top_k_weights)

    return execute


@contextlib.contextmanager
def unregistered_experts(info: MoEModelInfo) -> Iterator[None]:
    """While open, the fused expert parameters left on the meta device are plain attributes, not
    parameters: moving the model to its device (the Trainer does) copies no meta tensor."""
    moved = []
    try:
        for layer in info.layers:
            module = layer.experts
            for name in layer.layout.param_names():
                param = module._parameters.get(name)
                if param is not None and param.is_meta:
                    del module._parameters[name]
                    object.__setattr__(module, name, param)
                    moved.append((module, name, param))
        yield
    finally:
        for module, name, param in reversed(moved):
            module.__dict__.pop(name, None)
            module._parameters[name] = param
