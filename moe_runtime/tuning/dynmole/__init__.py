"""DynMoLE: hybrid routing of the LoRA experts, chosen per token by the router's Tsallis entropy.

    tune --method routed-lora --variant dynmole [--tsallis-q Q] [--entropy-threshold T]
         [--lora-top-p P] [--lora-top-k K] [--entropy-loss-coef C]

Per token, ``p = softmax(W_r x)`` over the layer's N LoRA experts and its Tsallis entropy

    S_q(p) = (1 - sum_i p_i^q) / (q - 1),  normalised by its maximum S_q(uniform) = (1 - N^(1-q)) / (q - 1)

- an uncertain token (normalised S_q > T) is routed softly: every LoRA expert, weight p_i;
- any other token is routed top-p: the most probable experts until their mass reaches P (the
  expert that crosses P included), at least K of them, weights renormalised over those chosen.

Auxiliary loss = ``lora_aux_loss_coef`` x the balance loss over the experts actually chosen
(``N * sum_i f_i * P_i``, f_i the share of selections, P_i the mean probability) + C x the mean
normalised Tsallis entropy, which sharpens the routing as training goes on. Padding is excluded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..registry import ConfigError, option
from ..routed_lora import ROUTED, RoutedLoraSettings, Variant, register_variant

__all__ = ["DynMoLEOptions", "HybridRouting", "VARIANT", "tsallis_entropy"]


def tsallis_entropy(probs: torch.Tensor, q: float) -> torch.Tensor:
    """``[T, N]`` probabilities -> ``[T]`` Tsallis entropy normalised to [0, 1] (1 = uniform)."""
    num = probs.shape[-1]
    if num == 1:
        return probs.new_zeros(probs.shape[:-1])
    entropy = (1 - probs.pow(q).sum(dim=-1)) / (q - 1)
    return entropy / ((1 - num ** (1 - q)) / (q - 1))


@dataclass
class DynMoLEOptions:
    """DynMoLE's own flags (see the module docstring)."""

    tsallis_q: float = option(1.5, "Tsallis entropy index q (> 0, not 1)", metavar="Q", type=float)
    entropy_threshold: float = option(
        0.9,
        "normalised entropy above which a token is routed softly to every LoRA expert",
        metavar="T",
        type=float,
    )
    top_p: float = option(
        0.75, "probability mass top-p routing keeps", flag="lora-top-p", metavar="P", type=float
    )
    entropy_loss_coef: float = option(0.01, "weight of the Tsallis entropy loss", metavar="C", type=float)

    def validate(self) -> None:
        if not (0 < self.tsallis_q < math.inf) or self.tsallis_q == 1:
            raise ConfigError(
                "tsallis_q", f"must be a positive finite number other than 1, got {self.tsallis_q}"
            )
        if not 0 <= self.entropy_threshold <= 1:
            raise ConfigError("entropy_threshold", f"must lie in [0, 1], got {self.entropy_threshold}")
        if not 0 < self.top_p <= 1:
            raise ConfigError("top_p", f"must lie in (0, 1], got {self.top_p}")
        if not 0 <= self.entropy_loss_coef < math.inf:
            raise ConfigError(
                "entropy_loss_coef", f"must be a finite number >= 0, got {self.entropy_loss_coef}"
            )

    def to_json(self) -> dict:
        return {
            "tsallis_q": self.tsallis_q,
            "entropy_threshold": self.entropy_threshold,
            "top_p": self.top_p,
            "entropy_loss_coef": self.entropy_loss_coef,
        }

    @classmethod
    def from_json(cls, obj: dict) -> DynMoLEOptions:
        options = cls(**{k: float(v) for k, v in obj.items() if k in cls().to_json()})
        options.validate()
        return options


class HybridRouting:
    """The routing of one DynMoLE layer (a ``Routing`` of the routed-LoRA layers).

    Args:
        options: q, threshold, top-p and the entropy loss weight.
        min_experts: K, the fewest experts a top-p routed token gets.
        aux_loss_coef: weight of the balance loss.
    """

    def __init__(self, options: DynMoLEOptions, min_experts: int, aux_loss_coef: float) -> None:
        self.options, self.min_experts, self.aux_loss_coef = options, int(min_experts), float(aux_loss_coef)

    def __call__(self, probs: torch.Tensor, token_mask: torch.Tensor | None, with_aux: bool):
        """``probs [T, N]`` -> ``(weights [T, N], chosen [T, N], aux)``; unchosen entries hold id N."""
        num = probs.shape[-1]
        entropy = tsallis_entropy(probs, self.options.tsallis_q)
        soft = entropy > self.options.entropy_threshold
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        rank = torch.arange(num, device=probs.device)
        keep = (mass_before < self.options.top_p) | (rank < self.min_experts) | soft.unsqueeze(-1)
        kept = torch.where(keep, sorted_probs, torch.zeros_like(sorted_probs))
        weights = kept / kept.sum(dim=-1, keepdim=True)
        chosen = torch.where(keep, order, torch.full_like(order, num))
        aux = None
        if with_aux:
            selected = torch.zeros_like(probs).scatter(-1, order, keep.to(probs.dtype))
            p, h = probs, entropy
            if token_mask is not None:
                p, h, selected = p[token_mask], h[token_mask], selected[token_mask]
            if p.shape[0]:
                share = selected.sum(dim=0) / selected.sum()
                aux = self.aux_loss_coef * num * torch.sum(share * p.mean(dim=0))
                aux = aux + self.options.entropy_loss_coef * h.mean()
        return weights, chosen, aux


def _routing(settings: RoutedLoraSettings) -> HybridRouting:
    options = settings.options if settings.options is not None else DynMoLEOptions()
    return HybridRouting(options, settings.effective_top_k(), settings.aux_loss_coef)


VARIANT = register_variant(
    Variant(
        "dynmole",
        ROUTED,
        default_experts=4,
        uses_top_k=True,
        default_top_k=1,
        options=DynMoLEOptions,
        router=_routing,
    )
)
