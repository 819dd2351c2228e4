"""The one place the runtime plugs into a model: a registered experts implementation.

transformers v5 dispatches every fused-experts module through ``ALL_EXPERTS_FUNCTIONS`` by the
name in ``config._experts_implementation``. We register one function, ``"moe_runtime"``, and
switch models to it. Per experts module it runs, in order:

    observers (profiling, tracing)  ->  executor (rerouting / offloading) or the stock implementation

With no observer and no executor attached it calls exactly the implementation the model used
before (``grouped_mm`` by default, or ``eager``), so the model's output is unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface

from .discovery import MoELayer, MoEModelInfo, find_moe_layers

__all__ = [
    "IMPLEMENTATION",
    "Observer",
    "Executor",
    "ExpertsState",
    "install",
    "uninstall",
    "state_of",
]

IMPLEMENTATION = "moe_runtime"

Observer = Callable[[MoELayer, torch.Tensor, torch.Tensor, torch.Tensor], None]
"""Called as ``observer(layer, hidden [T, H], top_k_index [T, K], top_k_weights [T, K])``."""

Executor = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""Called as ``executor(experts, hidden [T, H], top_k_index [T, K], top_k_weights [T, K]) -> [T, H]``."""


@dataclass
class ExpertsState:
    """What runs inside one experts module.

    Attributes:
        layer: the discovered MoE layer this module belongs to.
        stock: the implementation the model used before installation (name and function).
        observers: callbacks that see every call's routing; they must not modify it.
        executor: replaces the stock computation when set.
    """

    layer: MoELayer
    stock_name: str
    stock: Callable[..., torch.Tensor]
    observers: list[Observer] = field(default_factory=list)
    executor: Executor | None = None


_STATE_ATTR = "_moe_runtime_state"
_STATE_GENERATION = [0]  # bumped whenever a state is attached or removed (see state_generation)


def state_generation() -> int:
    """A number that changes whenever :func:`install` attaches or :func:`uninstall` removes an
    experts state anywhere: callers may cache which modules hold one while it stays the same."""
    return _STATE_GENERATION[0]


_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    state: ExpertsState | None = self.__dict__.get(_STATE_ATTR)
    if state is None:
        return ALL_EXPERTS_FUNCTIONS["grouped_mm"](self, hidden_states, top_k_index, top_k_weights)
    for observer in state.observers:
        observer(state.layer, hidden_states, top_k_index, top_k_weights)
    if state.executor is not None:
        return state.executor(self, hidden_states, top_k_index, top_k_weights)
    return state.stock(self, hidden_states, top_k_index, top_k_weights)


ExpertsInterface.register(IMPLEMENTATION, _experts_forward)


def _stock_function(module: nn.Module, name: str) -> Callable[..., torch.Tensor]:
    if name == "eager" or name is None:
        # The decorator wraps the class forward with functools.wraps: __wrapped__ is the eager loop.
        return type(module).forward.__wrapped__
    return ALL_EXPERTS_FUNCTIONS[name]


def state_of(experts: nn.Module) -> ExpertsState:
    """The runtime state of an experts module (``install`` must have run)."""
    state = experts.__dict__.get(_STATE_ATTR)
    if state is None:
        raise RuntimeError(
            "moe_runtime is not installed on this model: call moe_runtime.models.install(model)"
        )
    return state


def install(model: nn.Module, info: MoEModelInfo | None = None) -> MoEModelInfo:
    """Route every experts module of ``model`` through the moe_runtime implementation.

    Idempotent: installing twice keeps the original stock implementation and attached plugins.

    Args:
        model: a transformers ``PreTrainedModel`` with fused experts.
        info: the model's MoE layers, if already discovered.

    Returns:
        The discovered MoE layers.
    """
    info = info or find_moe_layers(model)
    current = model.config._experts_implementation
    for layer in info.layers:
        experts = layer.experts
        existing = experts.__dict__.get(_STATE_ATTR)
        if existing is not None:
            existing.layer = layer
            continue
        stock_name = current if current and current != IMPLEMENTATION else "grouped_mm"
        if stock_name == "grouped_mm" and experts.down_proj.dtype not in _GROUPED_MM_DTYPES:
            stock_name = "eager"  # torch's grouped GEMM has no kernel for this dtype (e.g. float64)
        experts.__dict__[_STATE_ATTR] = ExpertsState(
            layer=layer, stock_name=stock_name, stock=_stock_function(experts, stock_name)
        )
        _STATE_GENERATION[0] += 1
    if current != IMPLEMENTATION:
        model.set_experts_implementation(IMPLEMENTATION)
    return info


def uninstall(model: nn.Module, info: MoEModelInfo | None = None) -> None:
    """Detach all plugins and restore the stock experts implementation."""
    info = info or find_moe_layers(model)
    stock_name = None
    for layer in info.layers:
        state = layer.experts.__dict__.pop(_STATE_ATTR, None)
        if state is not None:
            stock_name = state.stock_name
            _STATE_GENERATION[0] += 1
    if stock_name is not None:
        model.set_experts_implementation(stock_name)
