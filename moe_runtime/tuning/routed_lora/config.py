"""Routed-LoRA settings (``tune --method routed-lora`` flags) and the per-layer plan they resolve to.

Variants (PERFT family):

==========  ==================================================================================
perft-r     a new router ``W_r [N, H]`` over N LoRA experts beside the frozen MoE block; softmax,
            top-k, weights renormalised over the k chosen; its own load-balancing loss
perft-e     one LoRA pair inside every routed expert, weighted by the frozen router's weights
esft-lora   perft-e restricted to the experts of an ``expert_cfg.json`` (``--experts``)
perft-s     one always-on LoRA (weight 1)
perft-d     N always-on LoRAs (weight 1 each)
==========  ==================================================================================

``--layers`` chooses the layers and, for perft-r / perft-d, the LoRA experts per layer:
comma-separated items ``RANGE[:N]`` where ``RANGE`` is ``all``, a layer index ``I`` or ``I-J``
(decoder layer indices, inclusive); later items override earlier ones. Examples: ``all`` (every MoE
layer, ``--lora-experts`` each), ``12-23``, ``all:4,12-23:8`` (more experts in higher layers).
Ranges keep only the MoE layers inside them; a single index must be an MoE layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ...models import MoEModelInfo
from ..esft.config import ExpertSelection, read_expert_config
from ..registry import ConfigError, option

__all__ = [
    "VARIANTS",
    "Variant",
    "RoutedLoraSettings",
    "LayerPlan",
    "parse_layer_spec",
    "plan_layers",
    "register_variant",
]

ROUTED, EXPERT, DENSE = "routed", "expert", "dense"


@dataclass(frozen=True)
class Variant:
    """A routed-LoRA variant: how its LoRA experts are placed and routed.

    Attributes:
        name: the ``--variant`` name.
        kind: ``routed`` (own router over N LoRA experts), ``expert`` (one LoRA per routed expert,
            driven by the frozen router) or ``dense`` (always-on LoRAs).
        default_experts: LoRA experts per layer when neither ``--lora-experts`` nor ``--layers``
            gives a count (routed and dense kinds).
        uses_top_k: ``--lora-top-k`` applies.
        default_top_k: its value when not given.
        needs_selection: ``--experts`` (an ESFT selection) is required.
        options: a dataclass of the variant's own flags (fields made with ``option``), stored in
            the adapter's metadata under ``options``; None if it has none.
        counts: ``counts(options, info) -> {layer: LoRA experts}``, per-layer counts the variant
            chooses itself (``--layers`` counts still override them).
        router: ``router(settings) -> Router`` (routed kind): how the LoRA router's probabilities
            pick and weight the LoRA experts of each token; None is softmax top-k (perft-r).
    """

    name: str
    kind: str
    default_experts: int = 0
    uses_top_k: bool = False
    default_top_k: int = 2
    needs_selection: bool = False
    options: type | None = None
    counts: Callable[[Any, MoEModelInfo], dict[int, int]] | None = None
    router: Callable[[RoutedLoraSettings], Any] | None = None


VARIANTS: dict[str, Variant] = {}
"""Registered variants by name (built-in ones below; variant folders add theirs)."""


def register_variant(variant: Variant) -> Variant:
    """Add a routed-LoRA variant (called by each variant's package when imported)."""
    if variant.name in VARIANTS and VARIANTS[variant.name] != variant:
        raise ValueError(f"routed-LoRA variant '{variant.name}' is registered twice")
    VARIANTS[variant.name] = variant
    return variant


for _builtin in (
    Variant("perft-r", ROUTED, default_experts=4, uses_top_k=True),
    Variant("perft-e", EXPERT),
    Variant("perft-s", DENSE, default_experts=1),
    Variant("perft-d", DENSE, default_experts=4),
    Variant("esft-lora", EXPERT, needs_selection=True),
):
    register_variant(_builtin)


def _variant_names() -> tuple[str, ...]:
    from ..registry import load_methods

    load_methods()  # variant folders register on import
    return tuple(VARIANTS)


def known_variant(name: object) -> bool:
    """``name`` is a registered variant (variant folders are imported first)."""
    return name in _variant_names()


@dataclass
class RoutedLoraSettings:
    """What to attach (the flags of ``tune --method routed-lora``).

    Attributes:
        variant: one of :data:`VARIANTS`.
        rank: LoRA rank r.
        alpha: LoRA alpha; the LoRA term is scaled by ``alpha / rank``.
        num_experts: LoRA experts per layer N (routed and dense kinds; perft-s is 1); None: the
            variant's default.
        top_k: LoRA experts per token (variants with ``uses_top_k``; default 2, at most N).
        layers: layer spec (see the module docstring).
        aux_loss_coef: weight of the LoRA router's auxiliary loss (routed kind).
        experts: the ESFT selection (esft-lora).
        options: the variant's own options (an instance of its ``options`` dataclass), or None.
    """

    variant: str = option("perft-r", "routed-LoRA variant", metavar="NAME", choices=_variant_names)
    rank: int = option(8, "LoRA rank", flag="lora-rank", metavar="R", type=int)
    alpha: float = option(16.0, "LoRA alpha", flag="lora-alpha", metavar="A", type=float)
    num_experts: int | None = option(
        None,
        "LoRA experts per layer (routed and dense variants; default 4, perft-s 1)",
        flag="lora-experts",
        metavar="N",
        type=int,
    )
    top_k: int | None = option(
        None,
        "LoRA experts per token (perft-r, mola: default 2; dynmole: at least, default 1)",
        flag="lora-top-k",
        metavar="K",
        type=int,
    )
    layers: str = option(
        "all",
        "layers and per-layer LoRA expert counts: all | I | I-J, comma-separated, each optionally :N",
        metavar="SPEC",
    )
    aux_loss_coef: float = option(
        0.01,
        "weight of the LoRA router's auxiliary loss (routed variants)",
        flag="lora-aux-loss-coef",
        metavar="C",
        type=float,
    )
    experts: ExpertSelection | None = option(
        None,
        "expert_cfg.json of the experts to train, from 'select' (routed-lora: variant esft-lora)",
        metavar="FILE",
        parse=read_expert_config,
    )
    options: Any = None

    @property
    def spec(self) -> Variant:
        """The registered :class:`Variant` of ``variant``."""
        return VARIANTS[self.variant]

    @property
    def kind(self) -> str:
        """``routed``, ``expert`` or ``dense``."""
        return self.spec.kind

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def validate(self) -> None:
        """Check the settings that do not depend on the model.

        Raises:
            ConfigError: naming the field.
        """
        if not known_variant(self.variant):
            raise ConfigError("variant", f"'{self.variant}': choose from {', '.join(VARIANTS)}")
        spec = self.spec
        if self.rank <= 0:
            raise ConfigError("rank", f"must be positive, got {self.rank}")
        if not 0 < self.alpha < math.inf:
            raise ConfigError("alpha", f"must be a positive finite number, got {self.alpha}")
        if not 0 <= self.aux_loss_coef < math.inf:
            raise ConfigError("aux_loss_coef", f"must be a finite number >= 0, got {self.aux_loss_coef}")
        if self.num_experts is not None:
            if self.kind == EXPERT:
                raise ConfigError(
                    "num_experts", f"does not apply to {self.variant} (one LoRA per routed expert)"
                )
            if self.variant == "perft-s" and self.num_experts != 1:
                raise ConfigError("num_experts", "perft-s has exactly one adapter (use perft-d for several)")
            if self.num_experts <= 0:
                raise ConfigError("num_experts", f"must be positive, got {self.num_experts}")
        if self.top_k is not None:
            if not spec.uses_top_k:
                raise ConfigError("top_k", f"does not apply to {self.variant}")
            if self.top_k <= 0:
                raise ConfigError("top_k", f"must be positive, got {self.top_k}")
        if spec.needs_selection and self.experts is None:
            raise ConfigError("experts", f"variant {self.variant} needs an expert_cfg.json (from 'select')")
        if not spec.needs_selection and self.experts is not None:
            raise ConfigError("experts", f"goes with variant esft-lora (or method esft), not {self.variant}")
        if spec.counts is not None and self.num_experts is not None:
            raise ConfigError("num_experts", f"does not apply to {self.variant} (it sets a count per layer)")
        if spec.options is None and self.options is not None:
            raise ConfigError("variant", f"{self.variant} has no options of its own")
        if spec.options is not None:
            if self.options is None:
                self.options = spec.options()
            if not isinstance(self.options, spec.options):
                raise ConfigError("variant", f"options of {self.variant} must be {spec.options.__name__}")
            self.options.validate()

    def default_experts(self) -> int:
        return self.num_experts if self.num_experts is not None else self.spec.default_experts

    def effective_top_k(self) -> int:
        return self.top_k if self.top_k is not None else self.spec.default_top_k

    def to_json(self) -> dict:
        out = {
            "variant": self.variant,
            "rank": self.rank,
            "alpha": self.alpha,
            "num_experts": self.default_experts() if self.kind != EXPERT else None,
            "top_k": self.effective_top_k() if self.spec.uses_top_k else None,
            "layers": self.layers,
            "aux_loss_coef": self.aux_loss_coef,
        }
        if self.options is not None:
            out["options"] = self.options.to_json()
        return out


@dataclass(frozen=True)
class LayerPlan:
    """What one MoE layer gets.

    Attributes:
        layer: decoder layer index.
        num_lora: LoRA pairs in this layer.
        expert_ids: for perft-e / esft-lora, the routed expert of each pair (sorted); else empty.
    """

    layer: int
    num_lora: int
    expert_ids: tuple[int, ...] = ()


def parse_layer_spec(spec: str, info: MoEModelInfo) -> dict[int, int | None]:
    """``--layers`` -> ``{layer: LoRA experts or None (the default count)}``.

    Raises:
        ConfigError: a malformed item, a single index that is not an MoE layer, a range without MoE
            layers, or a count that is not positive.
    """
    moe = info.layer_indices
    out: dict[int, int | None] = {}
    items = [item.strip() for item in spec.split(",")]
    if not spec.strip() or any(not item for item in items):
        raise ConfigError("layers", f"'{spec}': empty item (expected e.g. 'all', '12-23', 'all:4,12-23:8')")
    for item in items:
        where, sep, count_text = item.partition(":")
        count: int | None = None
        if sep:
            try:
                count = int(count_text)
            except ValueError:
                raise ConfigError("layers", f"'{item}': count '{count_text}' is not an integer") from None
            if count <= 0:
                raise ConfigError("layers", f"'{item}': the LoRA expert count must be positive")
        where = where.strip()
        try:
            if where == "all":
                chosen = list(moe)
            elif "-" in where:
                lo, hi = (int(x) for x in where.split("-", 1))
                chosen = [layer for layer in moe if lo <= layer <= hi]
                if not chosen:
                    raise ConfigError("layers", f"'{item}': no MoE layer in {lo}-{hi} (MoE layers: {moe})")
            else:
                layer = int(where)
                if layer not in moe:
                    raise ConfigError(
                        "layers", f"'{item}': layer {layer} is not an MoE layer (MoE layers: {moe})"
                    )
                chosen = [layer]
        except ValueError:
            raise ConfigError("layers", f"'{item}': expected all, I or I-J (optionally :N)") from None
        for layer in chosen:
            out[layer] = count
    return out


def plan_layers(settings: RoutedLoraSettings, info: MoEModelInfo) -> list[LayerPlan]:
    """Resolve the settings against a model: which layers get how many LoRA pairs.

    Raises:
        ConfigError: per-layer counts for a variant without a count, top-k above a layer's count,
            an expert selection that does not fit the model, or nothing to train.
    """
    settings.validate()
    spec = parse_layer_spec(settings.layers, info)
    plans = []
    if settings.kind == EXPERT:
        if any(count is not None for count in spec.values()):
            raise ConfigError("layers", f"per-layer counts do not apply to {settings.variant}")
        selected = None
        if settings.experts is not None:
            settings.experts.validate(info, settings.experts.source)
            selected = settings.experts.experts
        for layer in sorted(spec):
            ids = range(info.by_index(layer).num_experts) if selected is None else selected.get(layer, [])
            if ids:
                plans.append(LayerPlan(layer, len(ids), tuple(ids)))
    else:
        if settings.variant == "perft-s" and any(count not in (None, 1) for count in spec.values()):
            raise ConfigError("layers", "perft-s has exactly one adapter per layer")
        chosen = settings.spec.counts(settings.options, info) if settings.spec.counts is not None else {}
        for layer in sorted(spec):
            count = spec[layer] or chosen.get(layer) or settings.default_experts()
            if settings.kind == ROUTED and settings.effective_top_k() > count:
                default = " (the default)" if settings.top_k is None else ""
                raise ConfigError(
                    "top_k",
                    f"{settings.effective_top_k()}{default} exceeds the {count} LoRA experts of layer {layer}",
                )
            plans.append(LayerPlan(layer, count))
    if not plans:
        raise ConfigError(
            "layers", f"{settings.variant}: no layer gets a LoRA (check the layers and the selection)"
        )
    return plans
