"""Train a routed-LoRA adapter: the base model frozen, only LoRA (and LoRA-router) weights learn.

Loss = the model's own loss (token cross-entropy plus, where the family has one, the frozen router's
load-balancing loss, reweighted by ``--aux-loss-coef``) + ``aux_loss_coef`` x the mean over layers
of the LoRA router's Switch-style balance loss (perft-r only; padding tokens excluded).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ...models import MoEModelInfo, model_fingerprint
from ..data import Features
from ..trainer import TrainableModel, TrainConfig, train
from .adapter import read_routed_lora, write_routed_lora
from .config import RoutedLoraSettings, plan_layers
from .model import RoutedLora

__all__ = ["prepare_routed_lora", "tune_routed_lora", "apply_routed_lora", "RoutedLoraTrainable"]


class RoutedLoraTrainable(TrainableModel):
    """The Trainer's model: adds the LoRA router's balance loss to the model's loss.

    Args:
        model: the frozen causal LM, with ``lora`` attached.
        lora: the trainable routed-LoRA modules.
        aux_loss_coef: balance-loss weight.
    """

    def __init__(self, model: nn.Module, lora: RoutedLora, aux_loss_coef: float) -> None:
        super().__init__(model, lora)
        self.aux_loss_coef = aux_loss_coef

    def forward(self, input_ids, attention_mask=None, labels=None, **kwargs):
        lora: RoutedLora = self.extra
        lora.token_mask = attention_mask.reshape(-1).bool() if attention_mask is not None else None
        lora.pop_balance_loss()
        try:
            outputs = super().forward(input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
        finally:
            lora.token_mask = None
        balance = lora.pop_balance_loss()
        if balance is not None and outputs.loss is not None and self.aux_loss_coef:
            outputs.loss = outputs.loss + self.aux_loss_coef * balance.to(outputs.loss.dtype)
        return outputs


def prepare_routed_lora(
    model: nn.Module, info: MoEModelInfo, settings: RoutedLoraSettings, *, seed: int = 0
) -> RoutedLora:
    """Freeze the model and attach freshly initialised routed-LoRA modules (B = 0: output unchanged)."""
    plans = plan_layers(settings, info)
    model.requires_grad_(False)
    param = next(model.parameters())
    lora = RoutedLora(info, settings, plans, dtype=param.dtype, device=param.device, seed=seed)
    lora.attach(model)
    return lora


def tune_routed_lora(
    model: nn.Module,
    info: MoEModelInfo,
    features: list[Features],
    config: TrainConfig,
    *,
    out: Path,
    pad_id: int,
    work_dir: Path,
    settings: RoutedLoraSettings | None = None,
    resume: bool = False,
    write: bool = True,
    progress: bool = True,
) -> dict:
    """Train a routed-LoRA adapter and write it (rank 0).

    Returns:
        Training summary with ``trainable_params`` and ``adapter_bytes``.
    """
    settings = settings or RoutedLoraSettings()
    base_fp = model_fingerprint(model)
    lora = prepare_routed_lora(model, info, settings, seed=config.seed)
    wrapped = RoutedLoraTrainable(model, lora, settings.aux_loss_coef)
    try:
        summary = train(
            wrapped, features, config, pad_id=pad_id, work_dir=work_dir, resume=resume, progress=progress
        )
    finally:
        lora.detach()
    summary["trainable_params"] = wrapped.trainable_parameters()
    summary["adapter_bytes"] = sum(t.numel() * t.element_size() for t in lora.tensors().values())
    if write:
        write_routed_lora(out, lora, base_fingerprint=base_fp, training={**config.to_json(), **summary})
    return summary


def apply_routed_lora(model: nn.Module, path: Path, meta: dict | None = None) -> nn.Module:
    """Attach a saved adapter to ``model`` (checked against its base fingerprint) for evaluation."""
    from ...models import find_moe_layers

    info = find_moe_layers(model)
    lora = read_routed_lora(path).build(model, info)  # checks the base fingerprint first
    lora.attach(model)
    return model
