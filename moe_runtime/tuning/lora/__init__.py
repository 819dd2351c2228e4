"""LoRA baseline with peft: LoRA on the attention projections and on the fused expert parameters."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from ...errors import AdapterError
from ...models import MoEModelInfo
from ..meta import check_base, save_adapter_dir
from ..registry import ConfigError, Method, TuneJob, option, register
from ..trainer import TrainableModel

__all__ = ["LoraAdapter", "LoraSettings", "METHOD", "lora_config", "tune_lora", "apply_lora", "merge_lora"]


@dataclass
class LoraSettings:
    """LoRA rank, alpha and dropout."""

    rank: int = option(8, "LoRA rank", flag="lora-rank", metavar="R", type=int)
    alpha: int = option(16, "LoRA alpha", flag="lora-alpha", metavar="A", type=int)
    dropout: float = 0.0

    def validate(self) -> None:
        """Raises ConfigError on a rank below 1, a non-positive alpha or a dropout outside [0, 1)."""
        if self.rank <= 0:
            raise ConfigError("rank", f"must be positive, got {self.rank}")
        if not 0 < self.alpha < float("inf"):
            raise ConfigError("alpha", f"must be a positive finite number, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ConfigError("dropout", f"must lie in [0, 1), got {self.dropout}")


@dataclass
class LoraAdapter:
    """A peft LoRA adapter directory and our metadata."""

    path: Path
    meta: dict = field(repr=False)


def _attention_linears(model: nn.Module) -> list[str]:
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and any(p in name for p in ("self_attn.", "attention.", ".attn.")):
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def _expert_parameter_targets(info: MoEModelInfo) -> list[str]:
    targets = set()
    for layer in info.layers:
        suffix = layer.experts_name.split(f"layers.{layer.index}.", 1)[-1]
        targets.update(f"{suffix}.{name}" for name in (layer.layout.up_name, "down_proj"))
    return sorted(targets)


def lora_config(model: nn.Module, info: MoEModelInfo, settings: LoraSettings):
    """A peft LoraConfig for this model's attention projections and fused expert weights."""
    from peft import LoraConfig

    return LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=_attention_linears(model),
        target_parameters=_expert_parameter_targets(info),
        bias="none",
    )


def tune_lora(job: TuneJob, settings: LoraSettings | None = None) -> dict:
    """Train peft LoRA; write the peft adapter plus our metadata (``job.write``)."""
    from peft import get_peft_model

    settings = settings or LoraSettings()
    base_fp = job.base_fp()
    peft_model = get_peft_model(job.model, lora_config(job.model, job.info, settings))
    summary = job.run(TrainableModel(peft_model))
    summary["adapter_bytes"] = sum(
        p.numel() * p.element_size() for p in peft_model.parameters() if p.requires_grad
    )
    if job.write:
        save_adapter_dir(
            job.out,
            peft_model.save_pretrained,
            method="lora",
            model_type=job.info.model_type,
            base_fingerprint=base_fp,
            lora={"rank": settings.rank, "alpha": settings.alpha, "dropout": settings.dropout},
            training=job.train.to_json(),
        )
    return summary


def apply_lora(model: nn.Module, adapter: LoraAdapter, allow_base_mismatch: bool = False) -> nn.Module:
    """Merge a peft LoRA adapter into ``model`` (checked against its base fingerprint)."""
    from peft import PeftModel

    check_base(adapter.meta, model, adapter.path, allow_base_mismatch=allow_base_mismatch)
    try:
        return PeftModel.from_pretrained(model, str(adapter.path)).merge_and_unload()
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise AdapterError(
            f"adapter '{adapter.path}': cannot load the LoRA weights ({str(exc).splitlines()[0]})"
        ) from None


def merge_lora(
    target, adapter: LoraAdapter, allow_base_mismatch: bool = False
) -> Iterator[tuple[nn.Module, list[str]]]:
    """Merge into ``target.model`` (a registry ``MergeTarget``, checked against the base fingerprint);
    yields the model and the changed parameter names, once."""
    from ..peft_lora import PeftLoraAdapter, merge_peft_target, read_peft_config

    if not allow_base_mismatch and adapter.meta.get("base_fingerprint") != target.base_fingerprint():
        raise AdapterError(f"adapter '{adapter.path}': tuned from different base weights than this model")
    yield merge_peft_target(
        target, PeftLoraAdapter(adapter.path, read_peft_config(adapter.path), adapter.meta)
    )


def _serve(target, name: str, adapter: LoraAdapter, allow_base_mismatch: bool) -> None:
    """Check the base fingerprint, then serve it as the peft adapter it is (per request)."""
    from ..peft_lora import PeftLoraAdapter, read_peft_config, serve_peft

    if not allow_base_mismatch and adapter.meta.get("base_fingerprint") != target.base_fingerprint():
        raise AdapterError(f"adapter '{adapter.path}': tuned from different base weights than this model")
    serve_peft(target, name, PeftLoraAdapter(adapter.path, read_peft_config(adapter.path), adapter.meta))


def _tune(job: TuneJob, settings: LoraSettings) -> dict:
    return {**tune_lora(job, settings), "what": f"LoRA r={settings.rank}"}


METHOD = register(
    Method(
        name="lora",
        config=LoraSettings,
        tune=_tune,
        read=lambda path, meta: LoraAdapter(Path(path), meta),
        apply=apply_lora,
        adapter_type=LoraAdapter,
        merge=merge_lora,
        serve=_serve,
    )
)
