"""ESFT as a registered tuning method: its flags, tuning, reading, eval merge and serving hook."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ...errors import UsageError
from ...models import MoEModelInfo, find_moe_layers
from ...models.weights import merge_expert
from ..registry import ConfigError, Method, TuneJob, option, register
from .adapter import ESFTAdapter, read_adapter
from .config import ExpertSelection, read_expert_config
from .tuner import tune_esft

__all__ = ["ESFTConfig", "METHOD"]


@dataclass
class ESFTConfig:
    """What ``tune --method esft`` trains.

    Attributes:
        experts: the experts to train (an ``expert_cfg.json`` from ``select``).
    """

    experts: ExpertSelection | None = option(
        None,
        "expert_cfg.json of the experts to train, from 'select' (routed-lora: variant esft-lora)",
        metavar="FILE",
        parse=read_expert_config,
    )

    def validate(self) -> None:
        if self.experts is None:
            raise ConfigError("experts", "esft needs an expert_cfg.json (from 'moe-runtime select')")

    def check_model(self, info: MoEModelInfo) -> None:
        """Refuse a selection that does not fit the model or trains nothing (before any training)."""
        selection = self.experts
        selection.validate(info, selection.source)
        if selection.num_experts == 0 and not (selection.shared_experts or selection.non_expert_modules):
            raise UsageError(f"{selection.source}: selects no experts, nothing to train")

    def trainable_bytes(self, info: MoEModelInfo) -> int:
        """Bytes of the selected routed experts (the trainable arena) in the model's dtype; shared
        experts and non-expert modules, when flagged, are not counted (they are in RAM anyway)."""
        return sum(
            len(ids) * info.by_index(layer).expert_bytes for layer, ids in self.experts.experts.items()
        )


def _tune(job: TuneJob, config: ESFTConfig) -> dict:
    summary = tune_esft(job, config.experts)
    summary["what"] = f"{config.experts.num_experts} experts"
    return summary


def _apply(model: nn.Module, adapter: ESFTAdapter, allow_base_mismatch: bool) -> nn.Module:
    info = find_moe_layers(model)
    adapter.check(model, info, allow_base_mismatch=allow_base_mismatch)
    adapter.merge_into(model, info)
    return model


def _merge(target, adapter: ESFTAdapter, allow_base_mismatch: bool) -> Iterator[tuple[nn.Module, list[str]]]:
    """Check against the base (its experts read only for the fingerprint), then merge one layer at a
    time: read that layer's fused expert parameters, write the tuned experts into them, yield their
    names; last the shared-expert / non-expert weights the adapter holds."""
    info, model = target.info, target.model
    adapter.check_selection(info)
    params = dict(model.named_parameters())
    others = sorted({name for key in adapter.tensors for name in (key, f"model.{key}") if name in params})
    target.materialize(others)
    adapter.check(
        model,
        info,
        base_fingerprint=target.base_fingerprint,
        allow_base_mismatch=allow_base_mismatch,
        parts=target.parts,
    )
    for index in sorted(layer for layer, ids in adapter.selection.experts.items() if ids):
        layer = info.by_index(index)
        names = [f"{layer.experts_name}.{name}" for name in layer.layout.param_names()]
        target.materialize(names)
        for (layer_index, expert), tensors in adapter.experts.items():
            if layer_index == index:
                merge_expert(layer, expert, tensors)
        yield model, names
    if adapter.others:
        with torch.no_grad():
            for name, tensor in adapter.others.items():
                params = dict(model.named_parameters())
                params[name].copy_(tensor.to(params[name].dtype))
        yield model, sorted(adapter.others)


def _serve(target, name: str, adapter: ESFTAdapter, allow_base_mismatch: bool) -> None:
    """Check the adapter against the served base, then hand its tuned experts to the slot pool."""
    adapter.check_selection(target.info)  # ids first: the base experts it replaces are read next
    whole = adapter.meta is not None and adapter.meta.get("base_fingerprint") and not allow_base_mismatch
    fingerprint = target.base_fingerprint() if whole else None  # before any expert is materialized
    with target.base_experts(adapter.selection.experts):
        adapter.check(
            target.model,
            target.info,
            base_fingerprint=fingerprint,
            allow_base_mismatch=allow_base_mismatch,
        )
    target.add_experts(name, adapter)


METHOD = register(
    Method(
        name="esft",
        config=ESFTConfig,
        tune=_tune,
        read=lambda path, meta: read_adapter(path, meta),
        apply=_apply,
        adapter_type=ESFTAdapter,
        recognizes=lambda path: (Path(path) / "expert_cfg.json").exists(),
        serve=_serve,
        check_model=lambda config, info: config.check_model(info),
        merge=_merge,
        offloads=True,
        trainable_bytes=lambda config, info: config.trainable_bytes(info),
    )
)
