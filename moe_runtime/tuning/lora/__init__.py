"""LoRA baseline with peft: LoRA on the attention projections and on the fused expert parameters."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ...errors import AdapterError, UsageError
from ...models import MoEModelInfo, model_fingerprint
from ..data import Features
from ..meta import check_base, save_adapter_dir
from ..trainer import TrainableModel, TrainConfig, train

__all__ = ["LoraSettings", "lora_config", "tune_lora", "apply_lora"]


@dataclass
class LoraSettings:
    """LoRA rank, alpha and dropout."""

    rank: int = 8
    alpha: int = 16
    dropout: float = 0.0

    def validate(self) -> None:
        """Raises UsageError on a rank below 1, a non-positive alpha or a dropout outside [0, 1)."""
        if self.rank <= 0:
            raise UsageError(f"--lora-rank must be positive, got {self.rank}")
        if not 0 < self.alpha < float("inf"):
            raise UsageError(f"--lora-alpha must be a positive finite number, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise UsageError(f"LoRA dropout must lie in [0, 1), got {self.dropout}")


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


def tune_lora(
    model: nn.Module,
    info: MoEModelInfo,
    features: list[Features],
    config: TrainConfig,
    *,
    out: Path,
    pad_id: int,
    work_dir: Path,
    settings: LoraSettings | None = None,
    resume: bool = False,
    write: bool = True,
    progress: bool = True,
) -> dict:
    """Train peft LoRA; write the peft adapter plus our metadata (rank 0)."""
    from peft import get_peft_model

    settings = settings or LoraSettings()
    base_fp = model_fingerprint(model)
    peft_model = get_peft_model(model, lora_config(model, info, settings))
    wrapped = TrainableModel(peft_model)
    summary = train(
        wrapped, features, config, pad_id=pad_id, work_dir=work_dir, resume=resume, progress=progress
    )
    summary["trainable_params"] = wrapped.trainable_parameters()
    summary["adapter_bytes"] = sum(
        p.numel() * p.element_size() for p in peft_model.parameters() if p.requires_grad
    )
    if write:
        save_adapter_dir(
            out,
            peft_model.save_pretrained,
            method="lora",
            model_type=info.model_type,
            base_fingerprint=base_fp,
            lora={"rank": settings.rank, "alpha": settings.alpha, "dropout": settings.dropout},
            training=config.to_json(),
        )
    return summary


def apply_lora(model: nn.Module, path: Path, meta: dict) -> nn.Module:
    """Merge a peft LoRA adapter into ``model`` (checked against its base fingerprint)."""
    from peft import PeftModel

    check_base(meta, model, path)
    try:
        return PeftModel.from_pretrained(model, str(path)).merge_and_unload()
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise AdapterError(
            f"adapter '{path}': cannot load the LoRA weights ({str(exc).splitlines()[0]})"
        ) from None
