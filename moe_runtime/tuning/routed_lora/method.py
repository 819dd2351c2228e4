"""Routed LoRA as a registered tuning method; its variants (and their own flags) come from
:data:`~.config.VARIANTS`, which variant folders extend."""

from __future__ import annotations

from typing import Any

from torch import nn

from ...models import MoEModelInfo
from ..registry import ConfigError, Method, TuneJob, config_options, register
from .adapter import RoutedLoraAdapter, read_routed_lora
from .config import VARIANTS, RoutedLoraSettings, known_variant, plan_layers
from .tuner import apply_routed_lora, tune_routed_lora

__all__ = ["METHOD", "settings_from_flags"]


def _variant_options() -> list[type]:
    return [v.options for v in VARIANTS.values() if v.options is not None]


def settings_from_flags(values: dict[str, Any]) -> RoutedLoraSettings:
    """Settings from parsed flag values (by field name, of the settings and of the variants' options).

    Raises:
        ConfigError: an option of another variant.
    """
    own = {name for name, _ in config_options(RoutedLoraSettings)}
    settings = RoutedLoraSettings(**{k: v for k, v in values.items() if k in own})
    if not known_variant(settings.variant):
        raise ConfigError("variant", f"'{settings.variant}': choose from {', '.join(VARIANTS)}")
    mine = settings.spec.options
    for options in _variant_options():
        given = {k: v for k, v in values.items() if k in {n for n, _ in config_options(options)}}
        if options is mine:
            settings.options = options(**given)
        elif given:
            field = next(iter(given))
            raise ConfigError(field, f"goes with another variant than {settings.variant}")
    return settings


def _check_model(settings: RoutedLoraSettings, info: MoEModelInfo) -> None:
    plan_layers(settings, info)


def _tune(job: TuneJob, settings: RoutedLoraSettings) -> dict:
    plans = plan_layers(settings, job.info)
    summary = tune_routed_lora(job, settings)
    pairs = sum(plan.num_lora for plan in plans)
    summary["what"] = f"{settings.variant} r={settings.rank} ({pairs} LoRA pairs in {len(plans)} layers)"
    return summary


def _serve(target, name: str, adapter: RoutedLoraAdapter, allow_base_mismatch: bool) -> None:
    """Build the adapter's LoRA modules against the served base; they run beside its experts."""
    lora = adapter.build(
        target.model,
        target.info,
        base_fingerprint=None if allow_base_mismatch else target.base_fingerprint(),
        allow_base_mismatch=allow_base_mismatch,
    )
    target.add_term(name, lora)


def _apply(model: nn.Module, adapter: RoutedLoraAdapter, allow_base_mismatch: bool) -> nn.Module:
    return apply_routed_lora(model, adapter, allow_base_mismatch)


METHOD = register(
    Method(
        name="routed-lora",
        config=RoutedLoraSettings,
        tune=_tune,
        read=lambda path, meta: read_routed_lora(path, meta),
        apply=_apply,
        adapter_type=RoutedLoraAdapter,
        stored_as="routed_lora",
        serve=_serve,
        config_classes=_variant_options,
        make_config=settings_from_flags,
        check_model=_check_model,
        unmergeable=(
            "routed-LoRA terms are added beside the experts' nonlinear MLPs and weighted by a router "
            "(the adapter's own, or the frozen one per expert), so no weight of the base model can hold them; "
            "serve it with 'generate --adapter' instead (for ESFT with LoRA that exports, train "
            "'tune --method esft-lora-merge': low-rank updates inside the selected experts)"
        ),
    )
)
