"""MoLA: routed LoRA experts with a different number of LoRA experts per layer, more in higher layers.

    tune --method routed-lora --variant mola [--experts-per-layer 2,2,4,4,8,8 | inverted-triangle]

Each MoE layer gets its own router over its own count of LoRA experts (softmax, top-k, weights
renormalised over the k, Switch-style balance loss: perft-r routing). The counts are given per MoE
layer, lowest first, or by a schedule over four equal groups of the MoE layers (lowest first):

==================  ==========  =========================================
schedule            counts      idea
==================  ==========  =========================================
inverted-triangle   2, 4, 6, 8  more LoRA experts in higher layers (default)
triangle            8, 6, 4, 2  more in lower layers
hourglass           8, 2, 2, 8  more at both ends
uniform             5, 5, 5, 5  the same total, spread evenly
==================  ==========  =========================================

The adapter records the resulting count of every layer, so serving needs nothing from here but
the routing, which is perft-r's.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...models import MoEModelInfo
from ..registry import ConfigError, option
from ..routed_lora import ROUTED, Variant, register_variant

__all__ = ["SCHEDULES", "MoLAOptions", "VARIANT", "layer_counts"]

SCHEDULES: dict[str, tuple[int, int, int, int]] = {
    "inverted-triangle": (2, 4, 6, 8),
    "triangle": (8, 6, 4, 2),
    "hourglass": (8, 2, 2, 8),
    "uniform": (5, 5, 5, 5),
}


def layer_counts(spec: str, num_layers: int) -> list[int]:
    """LoRA experts of each of ``num_layers`` MoE layers (lowest first) from a list or a schedule.

    Raises:
        ConfigError: not a schedule and not comma-separated positive integers, or a list whose
            length is not ``num_layers``.
    """
    text = spec.strip()
    if text in SCHEDULES:
        groups = SCHEDULES[text]
        return [groups[i * len(groups) // num_layers] for i in range(num_layers)]
    try:
        counts = [int(item) for item in text.split(",")]
    except ValueError:
        raise ConfigError(
            "experts_per_layer",
            f"'{spec}': expected counts like 2,2,4,4,8,8 or a schedule ({', '.join(SCHEDULES)})",
        ) from None
    if any(count <= 0 for count in counts):
        raise ConfigError("experts_per_layer", f"'{spec}': every count must be positive")
    if len(counts) != num_layers:
        raise ConfigError(
            "experts_per_layer", f"'{spec}': {len(counts)} counts for the model's {num_layers} MoE layers"
        )
    return counts


@dataclass
class MoLAOptions:
    """MoLA's own flag.

    Attributes:
        experts_per_layer: comma-separated LoRA expert counts, one per MoE layer (lowest first),
            or a schedule name (see the module docstring).
    """

    experts_per_layer: str = option(
        "inverted-triangle",
        "LoRA experts per MoE layer, lowest first: counts like 2,2,4,4,8,8 or a schedule "
        f"({', '.join(SCHEDULES)})",
        metavar="SPEC",
    )

    def validate(self) -> None:
        layer_counts(self.experts_per_layer, len(self.experts_per_layer.split(",")))

    def counts(self, info: MoEModelInfo) -> dict[int, int]:
        layers = info.layer_indices
        return dict(zip(layers, layer_counts(self.experts_per_layer, len(layers))))

    def to_json(self) -> dict:
        return {"experts_per_layer": self.experts_per_layer}

    @classmethod
    def from_json(cls, obj: dict) -> MoLAOptions:
        return cls(experts_per_layer=str(obj.get("experts_per_layer", "inverted-triangle")))


VARIANT = register_variant(
    Variant(
        "mola",
        ROUTED,
        uses_top_k=True,
        options=MoLAOptions,
        counts=lambda options, info: options.counts(info),
    )
)
