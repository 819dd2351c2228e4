"""ESFT with LoRA factors that merge: low-rank updates of the selected experts' own weights.

``tune --method esft-lora-merge --experts cfg.json [--lora-rank R] [--lora-alpha A]`` trains, for
every expert of an ESFT selection and each of its weights, ``W' = W + (alpha / r) * B @ A``; the
router, the other experts and every other weight stay frozen. The adapter stores only the factors.
Unlike the routed-LoRA variant ``esft-lora`` (a LoRA term beside each selected expert, which no base
weight can hold), the update lives inside the expert, so it merges: served as tuned experts in arena
slots (like ESFT), merged by ``eval`` and ``export``, converted to an official ESFT directory.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ...errors import UsageError
from ...models import MoEModelInfo, find_moe_layers, install
from ..esft import replaced_fingerprint
from ..esft.config import ExpertSelection, read_expert_config
from ..registry import ConfigError, Method, TuneJob, option, register
from ..trainer import TrainableModel
from .adapter import METHOD as STORED_NAME
from .adapter import EsftLoraAdapter, merged_weight, read_adapter, write_adapter
from .trainable import LayerFactors, LowRankExperts

__all__ = [
    "METHOD",
    "STORED_NAME",
    "EsftLoraAdapter",
    "EsftLoraConfig",
    "LayerFactors",
    "LowRankExperts",
    "merged_weight",
    "read_adapter",
    "tune_esft_lora",
    "write_adapter",
]


@dataclass
class EsftLoraConfig:
    """What ``tune --method esft-lora-merge`` trains.

    Attributes:
        experts: the experts to update (an ``expert_cfg.json`` from ``select``).
        rank: LoRA rank r of every update.
        alpha: LoRA alpha; updates are scaled by ``alpha / r``.
    """

    experts: ExpertSelection | None = option(
        None,
        "expert_cfg.json of the experts to train, from 'select' (routed-lora: variant esft-lora)",
        metavar="FILE",
        parse=read_expert_config,
    )
    rank: int = option(8, "LoRA rank", flag="lora-rank", metavar="R", type=int)
    alpha: float = option(16.0, "LoRA alpha", flag="lora-alpha", metavar="A", type=float)

    def validate(self) -> None:
        if self.experts is None:
            raise ConfigError(
                "experts", "esft-lora-merge needs an expert_cfg.json (from 'moe-runtime select')"
            )
        if self.rank <= 0:
            raise ConfigError("rank", f"must be positive, got {self.rank}")
        if not 0 < self.alpha < math.inf:
            raise ConfigError("alpha", f"must be a positive finite number, got {self.alpha}")

    def check_model(self, info: MoEModelInfo) -> None:
        """Refuse a selection that does not fit the model, trains nothing or asks for more than experts."""
        selection = self.experts
        selection.validate(info, selection.source)
        if selection.shared_experts or selection.non_expert_modules:
            raise UsageError(
                f"{selection.source}: esft-lora-merge updates routed experts only "
                "(shared_experts / non_expert_modules must be false; use --method esft for those)"
            )
        if selection.num_experts == 0:
            raise UsageError(f"{selection.source}: selects no experts, nothing to train")


def tune_esft_lora(job: TuneJob, config: EsftLoraConfig) -> dict:
    """Train the factors and write the adapter (``job.write``).

    Returns:
        Training summary with ``trainable_params``, ``adapter_bytes`` and ``what``.
    """
    model, info, selection = job.model, job.info, config.experts
    install(model, info)
    model.requires_grad_(False)
    replaced = replaced_fingerprint(model, info, selection)
    base_fp = job.base_fp()
    factors = LowRankExperts(info, selection, config.rank, config.alpha, seed=job.train.seed)
    factors.attach()
    try:
        summary = job.run(TrainableModel(model, factors))
    finally:
        factors.detach()
    trained = factors.factors()
    summary["adapter_bytes"] = sum(
        t.numel() * t.element_size() for pairs in trained.values() for pair in pairs.values() for t in pair
    )
    summary["what"] = f"{selection.num_experts} experts, LoRA r={config.rank}"
    if job.write:
        write_adapter(
            job.out,
            info=info,
            selection=selection,
            factors=trained,
            rank=config.rank,
            alpha=config.alpha,
            replaced=replaced,
            base_fingerprint=base_fp,
            training=job.train.to_json(),
        )
    return summary


def _apply(model: nn.Module, adapter: EsftLoraAdapter, allow_base_mismatch: bool) -> nn.Module:
    info = find_moe_layers(model)
    adapter.check(model, info, allow_base_mismatch=allow_base_mismatch)
    adapter.merge_into(info)
    return model


def _merge(
    target, adapter: EsftLoraAdapter, allow_base_mismatch: bool
) -> Iterator[tuple[nn.Module, list[str]]]:
    """Check against the base (its experts read only for the fingerprint), then one layer at a time:
    read its fused expert parameters, merge the selected experts' updates into them, yield their names."""
    info, model = target.info, target.model
    adapter.check_selection(info)
    adapter.check(
        model,
        info,
        base_fingerprint=target.base_fingerprint,
        allow_base_mismatch=allow_base_mismatch,
        parts=target.parts,
    )
    for index in sorted({layer for layer, _ in adapter.factors}):
        names = [
            f"{info.by_index(index).experts_name}.{name}"
            for name in info.by_index(index).layout.param_names()
        ]
        target.materialize(names)
        adapter.merge_layer(info, index)
        yield model, names


def _serve(target, name: str, adapter: EsftLoraAdapter, allow_base_mismatch: bool) -> None:
    """Check against the served base, merge the factors into copies of the selected experts, and
    hand those to the slot pool (as an ESFT adapter's tuned experts)."""
    adapter.check_selection(target.info)
    whole = adapter.meta.get("base_fingerprint") and not allow_base_mismatch
    fingerprint = target.base_fingerprint() if whole else None
    with target.base_experts(adapter.selection.experts):
        adapter.check(
            target.model, target.info, base_fingerprint=fingerprint, allow_base_mismatch=allow_base_mismatch
        )
        adapter.merge_experts(target.info)
    target.add_experts(name, adapter)


METHOD = register(
    Method(
        name=STORED_NAME,
        config=EsftLoraConfig,
        tune=tune_esft_lora,
        read=lambda path, meta: read_adapter(Path(path), meta),
        apply=_apply,
        adapter_type=EsftLoraAdapter,
        serve=_serve,
        check_model=lambda config, info: config.check_model(info),
        merge=_merge,
    )
)
