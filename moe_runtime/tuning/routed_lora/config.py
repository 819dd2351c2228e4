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
from dataclasses import dataclass, field

from ...errors import UsageError
from ...models import MoEModelInfo
from ..esft.config import ExpertSelection

__all__ = ["VARIANTS", "RoutedLoraSettings", "LayerPlan", "parse_layer_spec", "plan_layers"]

VARIANTS = ("perft-r", "perft-e", "perft-s", "perft-d", "esft-lora")
ROUTED, EXPERT, DENSE = "routed", "expert", "dense"
_KIND = {"perft-r": ROUTED, "perft-e": EXPERT, "esft-lora": EXPERT, "perft-s": DENSE, "perft-d": DENSE}
_DEFAULT_EXPERTS = {"perft-r": 4, "perft-d": 4, "perft-s": 1}


@dataclass
class RoutedLoraSettings:
    """What to attach (CLI flags of ``tune --method routed-lora``).

    Attributes:
        variant: one of :data:`VARIANTS`.
        rank: LoRA rank r.
        alpha: LoRA alpha; the LoRA term is scaled by ``alpha / rank``.
        num_experts: LoRA experts per layer N (perft-r, perft-d; perft-s is 1); None: the
            variant's default (4, or 1 for perft-s).
        top_k: LoRA experts per token (perft-r; default 2, at most N).
        layers: layer spec (see the module docstring).
        aux_loss_coef: weight of the LoRA router's load-balancing loss (perft-r).
        experts: the ESFT selection (esft-lora).
    """

    variant: str = "perft-r"
    rank: int = 8
    alpha: float = 16.0
    num_experts: int | None = None
    top_k: int | None = None
    layers: str = "all"
    aux_loss_coef: float = 0.01
    experts: ExpertSelection | None = field(default=None, repr=False)

    @property
    def kind(self) -> str:
        """``routed``, ``expert`` or ``dense``."""
        return _KIND[self.variant]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def validate(self) -> None:
        """Check flags that do not depend on the model.

        Raises:
            UsageError: naming the flag.
        """
        if self.variant not in VARIANTS:
            raise UsageError(f"--variant '{self.variant}': choose from {', '.join(VARIANTS)}")
        if self.rank <= 0:
            raise UsageError(f"--lora-rank must be positive, got {self.rank}")
        if not 0 < self.alpha < math.inf:
            raise UsageError(f"--lora-alpha must be a positive finite number, got {self.alpha}")
        if not 0 <= self.aux_loss_coef < math.inf:
            raise UsageError(f"--lora-aux-loss-coef must be a finite number >= 0, got {self.aux_loss_coef}")
        if self.num_experts is not None:
            if self.kind == EXPERT:
                raise UsageError(
                    f"--lora-experts does not apply to {self.variant} (one LoRA per routed expert)"
                )
            if self.variant == "perft-s" and self.num_experts != 1:
                raise UsageError("--lora-experts: perft-s has exactly one adapter (use perft-d for several)")
            if self.num_experts <= 0:
                raise UsageError(f"--lora-experts must be positive, got {self.num_experts}")
        if self.top_k is not None:
            if self.variant != "perft-r":
                raise UsageError(f"--lora-top-k applies to perft-r only, not {self.variant}")
            if self.top_k <= 0:
                raise UsageError(f"--lora-top-k must be positive, got {self.top_k}")
        if self.variant == "esft-lora" and self.experts is None:
            raise UsageError("--variant esft-lora needs --experts FILE (an expert_cfg.json from 'select')")
        if self.variant != "esft-lora" and self.experts is not None:
            raise UsageError(f"--experts goes with --variant esft-lora, not {self.variant}")

    def default_experts(self) -> int:
        return self.num_experts if self.num_experts is not None else _DEFAULT_EXPERTS.get(self.variant, 0)

    def effective_top_k(self) -> int:
        return self.top_k if self.top_k is not None else 2

    def to_json(self) -> dict:
        return {
            "variant": self.variant,
            "rank": self.rank,
            "alpha": self.alpha,
            "num_experts": self.default_experts() if self.kind != EXPERT else None,
            "top_k": self.effective_top_k() if self.kind == ROUTED else None,
            "layers": self.layers,
            "aux_loss_coef": self.aux_loss_coef,
        }


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
        UsageError: a malformed item, a single index that is not an MoE layer, a range without MoE
            layers, or a count that is not positive.
    """
    moe = info.layer_indices
    out: dict[int, int | None] = {}
    items = [item.strip() for item in spec.split(",")]
    if not spec.strip() or any(not item for item in items):
        raise UsageError(f"--layers '{spec}': empty item (expected e.g. 'all', '12-23', 'all:4,12-23:8')")
    for item in items:
        where, sep, count_text = item.partition(":")
        count: int | None = None
        if sep:
            try:
                count = int(count_text)
            except ValueError:
                raise UsageError(f"--layers '{item}': count '{count_text}' is not an integer") from None
            if count <= 0:
                raise UsageError(f"--layers '{item}': the LoRA expert count must be positive")
        where = where.strip()
        try:
            if where == "all":
                chosen = list(moe)
            elif "-" in where:
                lo, hi = (int(x) for x in where.split("-", 1))
                chosen = [layer for layer in moe if lo <= layer <= hi]
                if not chosen:
                    raise UsageError(f"--layers '{item}': no MoE layer in {lo}-{hi} (MoE layers: {moe})")
            else:
                layer = int(where)
                if layer not in moe:
                    raise UsageError(
                        f"--layers '{item}': layer {layer} is not an MoE layer (MoE layers: {moe})"
                    )
                chosen = [layer]
        except ValueError:
            raise UsageError(f"--layers '{item}': expected all, I or I-J (optionally :N)") from None
        for layer in chosen:
            out[layer] = count
    return out


def plan_layers(settings: RoutedLoraSettings, info: MoEModelInfo) -> list[LayerPlan]:
    """Resolve the settings against a model: which layers get how many LoRA pairs.

    Raises:
        UsageError: per-layer counts for a variant without a count, top-k above a layer's count,
            an expert selection that does not fit the model, or nothing to train.
    """
    settings.validate()
    spec = parse_layer_spec(settings.layers, info)
    plans = []
    if settings.kind == EXPERT:
        if any(count is not None for count in spec.values()):
            raise UsageError(f"--layers: per-layer counts do not apply to {settings.variant}")
        selected = None
        if settings.experts is not None:
            settings.experts.validate(info, "--experts")
            selected = settings.experts.experts
        for layer in sorted(spec):
            ids = range(info.by_index(layer).num_experts) if selected is None else selected.get(layer, [])
            if ids:
                plans.append(LayerPlan(layer, len(ids), tuple(ids)))
    else:
        if settings.variant == "perft-s" and any(count not in (None, 1) for count in spec.values()):
            raise UsageError("--layers: perft-s has exactly one adapter per layer")
        for layer in sorted(spec):
            count = spec[layer] if spec[layer] is not None else settings.default_experts()
            if settings.kind == ROUTED and settings.effective_top_k() > count:
                raise UsageError(
                    f"--lora-top-k {settings.effective_top_k()}{' (the default)' if settings.top_k is None else ''} "
                    f"exceeds the {count} LoRA experts of layer {layer}"
                )
            plans.append(LayerPlan(layer, count))
    if not plans:
        raise UsageError(f"{settings.variant}: no layer gets a LoRA (check --layers and --experts)")
    return plans
