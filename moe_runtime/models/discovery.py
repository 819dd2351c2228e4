"""Find the Mixture-of-Experts layers of any transformers v5 model.

transformers v5 stores the routed experts of one MoE layer as a single module with fused 3-D
parameters, decorated with ``@use_experts_implementation`` (which sets layout flags on every
instance). We find those modules, then read the router, shared experts and top-k from the
surrounding MoE block, so later stages never need per-family code.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import NotMoEError

__all__ = ["ExpertsLayout", "MoELayer", "MoEModelInfo", "find_moe_layers", "is_experts_module"]

_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|block)\.(\d+)(?:\.|$)")
_ROUTER_NAMES = ("gate", "router", "moe_gate", "gating", "switch")
_TOP_K_ATTRS = (
    "top_k",
    "num_experts_per_tok",
    "moe_topk",
    "num_experts_per_token",
    "experts_per_token",
    "top_k_experts",
    "k",
)


@dataclass(frozen=True)
class ExpertsLayout:
    """How the fused expert weights of one experts module are laid out.

    Attributes:
        has_gate: ``gate_up_proj`` holds gate and up projections; otherwise only ``up_proj``.
        is_concatenated: gate/up halves are ``[gate; up]`` along the output dim; otherwise
            interleaved ``[g0, u0, g1, u1, ...]``.
        is_transposed: weights are ``[E, in, out]`` instead of ``[E, out, in]``.
        has_bias: per-expert biases ``<name>_bias`` of shape ``[E, out]``.
        has_post_expert_norm: a norm runs after each expert (per-family extra weights).
    """

    has_gate: bool = True
    is_concatenated: bool = True
    is_transposed: bool = False
    has_bias: bool = False
    has_post_expert_norm: bool = False

    @property
    def up_name(self) -> str:
        """Name of the (fused) input projection parameter."""
        return "gate_up_proj" if self.has_gate else "up_proj"

    def param_names(self) -> tuple[str, ...]:
        """Names of the per-expert parameters: projections first, then biases."""
        names = [self.up_name, "down_proj"]
        if self.has_bias:
            names += [f"{self.up_name}_bias", "down_proj_bias"]
        return tuple(names)


@dataclass
class MoELayer:
    """One MoE layer of a model.

    Attributes:
        index: decoder layer index (``model.layers.<index>``), the key used by ESFT files.
        block_name: module path of the MoE block (the experts module's parent).
        experts_name: module path of the experts module (``...mlp.experts``).
        experts: the experts module (fused 3-D weights).
        router_name / router: the routing module, if one could be identified.
        shared_names / shared: shared (always-on) expert modules, possibly empty.
        num_experts: routed experts in this layer.
        top_k: experts selected per token.
        hidden_size, intermediate_size: expert input width and per-expert hidden width.
        layout: fused-weight layout flags.
        expert_bytes: bytes of one routed expert (all its parameter slices).
    """

    index: int
    block_name: str
    experts_name: str
    experts: nn.Module = field(repr=False)
    router_name: str | None
    router: nn.Module | None = field(repr=False)
    shared_names: list[str]
    shared: list[nn.Module] = field(repr=False)
    num_experts: int
    top_k: int
    hidden_size: int
    intermediate_size: int
    layout: ExpertsLayout
    expert_bytes: int


@dataclass
class MoEModelInfo:
    """All MoE layers of a model plus model-level facts."""

    model_type: str
    num_hidden_layers: int
    layers: list[MoELayer]

    @property
    def layer_indices(self) -> list[int]:
        return [layer.index for layer in self.layers]

    @property
    def dense_layer_indices(self) -> list[int]:
        moe = set(self.layer_indices)
        return [i for i in range(self.num_hidden_layers) if i not in moe]

    @property
    def num_routed_experts(self) -> int:
        return sum(layer.num_experts for layer in self.layers)

    @property
    def routed_expert_bytes(self) -> int:
        return sum(layer.num_experts * layer.expert_bytes for layer in self.layers)

    def by_index(self, index: int) -> MoELayer:
        """The MoE layer at decoder layer ``index`` (KeyError if that layer is dense)."""
        for layer in self.layers:
            if layer.index == index:
                return layer
        raise KeyError(f"layer {index} is not an MoE layer (MoE layers: {self.layer_indices})")

    def summary(self) -> dict:
        """JSON-friendly description (used in metadata files and the support table)."""
        first = self.layers[0]
        return {
            "model_type": self.model_type,
            "num_hidden_layers": self.num_hidden_layers,
            "moe_layers": self.layer_indices,
            "num_experts": first.num_experts,
            "top_k": first.top_k,
            "hidden_size": first.hidden_size,
            "intermediate_size": first.intermediate_size,
            "expert_bytes": first.expert_bytes,
            "shared_experts": bool(first.shared),
            "layout": {k: getattr(first.layout, k) for k in ExpertsLayout.__dataclass_fields__},
        }


def is_experts_module(module: nn.Module) -> bool:
    """True for a module decorated with transformers' ``@use_experts_implementation``."""
    return (
        hasattr(module, "has_gate")
        and hasattr(module, "is_transposed")
        and hasattr(module, "is_concatenated")
        and hasattr(module, "num_experts")
        and isinstance(getattr(module, "down_proj", None), torch.Tensor)
    )


def _layout_of(experts: nn.Module) -> ExpertsLayout:
    return ExpertsLayout(
        has_gate=bool(experts.has_gate),
        is_concatenated=bool(experts.is_concatenated),
        is_transposed=bool(experts.is_transposed),
        has_bias=bool(experts.has_bias),
        has_post_expert_norm=bool(getattr(experts, "has_post_expert_norm", False)),
    )


def _find_top_k(candidates: list[object], num_experts: int) -> int | None:
    for obj in candidates:
        if obj is None:
            continue
        for attr in _TOP_K_ATTRS:
            value = getattr(obj, attr, None)
            if isinstance(value, int) and not isinstance(value, bool) and 0 < value <= num_experts:
                return value
    return None


def _child_named(parent: nn.Module, names: tuple[str, ...]) -> tuple[str | None, nn.Module | None]:
    for name in names:
        child = getattr(parent, name, None)
        if isinstance(child, nn.Module):
            return name, child
    return None, None


def _shared_children(parent: nn.Module, exclude: nn.Module) -> list[tuple[str, nn.Module]]:
    """Children whose name says "shared" and that hold weights (not a bare gate scalar)."""
    found = []
    for name, child in parent.named_children():
        if child is exclude or "shared" not in name.lower():
            continue
        if name.endswith("_gate"):  # e.g. qwen2_moe's shared_expert_gate: part of the shared path
            continue
        if any(True for _ in child.parameters()):
            found.append((name, child))
    return found


def _expert_bytes(experts: nn.Module, layout: ExpertsLayout) -> int:
    total = 0
    for name in layout.param_names():
        tensor = getattr(experts, name)
        total += tensor[0].numel() * tensor.element_size()
    return total


def find_moe_layers(model: nn.Module) -> MoEModelInfo:
    """Locate every MoE layer of ``model``.

    Args:
        model: a transformers model (``*ForCausalLM`` or its base model).

    Returns:
        The MoE layers sorted by decoder layer index.

    Raises:
        NotMoEError: the model has no fused-experts module (a dense model, or an MoE family whose
            experts do not use transformers' experts interface).
    """
    modules = dict(model.named_modules())
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers: list[MoELayer] = []
    for name, module in modules.items():
        if not is_experts_module(module):
            continue
        block_name = name.rsplit(".", 1)[0] if "." in name else ""
        block = modules.get(block_name, model)
        match = _LAYER_RE.search(name)
        index = int(match.group(1)) if match else len(layers)
        router_attr, router = _child_named(block, _ROUTER_NAMES)
        shared = _shared_children(block, module)
        # Some families (granitemoeshared) keep the shared MLP beside the MoE block in the decoder layer.
        if not shared and "." in block_name:
            layer_module = modules.get(block_name.rsplit(".", 1)[0])
            if layer_module is not None:
                shared = _shared_children(layer_module, block)
                shared = [(f"{block_name.rsplit('.', 1)[0]}.{n}", m) for n, m in shared]
        else:
            shared = [(f"{block_name}.{n}" if block_name else n, m) for n, m in shared]
        num_experts = int(module.num_experts)
        top_k = _find_top_k([router, block, module, text_config], num_experts)
        if top_k is None:
            raise NotMoEError(f"cannot determine top-k of the MoE layer {name}")
        layout = _layout_of(module)
        down = module.down_proj
        hidden, inter = (
            (down.shape[2], down.shape[1]) if layout.is_transposed else (down.shape[1], down.shape[2])
        )
        layers.append(
            MoELayer(
                index=index,
                block_name=block_name,
                experts_name=name,
                experts=module,
                router_name=f"{block_name}.{router_attr}" if router_attr and block_name else router_attr,
                router=router,
                shared_names=[n for n, _ in shared],
                shared=[m for _, m in shared],
                num_experts=num_experts,
                top_k=top_k,
                hidden_size=int(hidden),
                intermediate_size=int(inter),
                layout=layout,
                expert_bytes=_expert_bytes(module, layout),
            )
        )
    model_type = getattr(config, "model_type", type(model).__name__)
    if not layers:
        raise NotMoEError(
            f"model type '{model_type}' has no Mixture-of-Experts layers with fused experts "
            "(a dense model, or a family without transformers' experts interface)"
        )
    layers.sort(key=lambda layer: layer.index)
    num_hidden = getattr(text_config, "num_hidden_layers", None) or (layers[-1].index + 1)
    return MoEModelInfo(model_type=model_type, num_hidden_layers=int(num_hidden), layers=layers)
