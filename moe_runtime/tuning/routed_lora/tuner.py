"""Train a routed-LoRA adapter: the base model frozen, only LoRA (and LoRA-router) weights learn.

Loss = the model's own loss (token cross-entropy plus, where the family has one, the frozen router's
load-balancing loss, reweighted by the training ``aux_loss_coef``) + the mean over layers of the
LoRA routing's weighted auxiliary loss (routed variants; padding tokens excluded).
"""

from __future__ import annotations

from torch import nn

from ...models import MoEModelInfo, find_moe_layers
from ..registry import TuneJob
from ..trainer import TrainableModel
from .adapter import RoutedLoraAdapter, write_routed_lora
from .config import RoutedLoraSettings, plan_layers
from .model import RoutedLora

__all__ = ["prepare_routed_lora", "tune_routed_lora", "apply_routed_lora", "RoutedLoraTrainable"]


class RoutedLoraTrainable(TrainableModel):
    """The Trainer's model: adds the LoRA routing's auxiliary loss to the model's loss.

    Args:
        model: the frozen causal LM, with ``lora`` attached.
        lora: the trainable routed-LoRA modules.
    """

    def __init__(self, model: nn.Module, lora: RoutedLora) -> None:
        super().__init__(model, lora)

    def forward(self, input_ids, attention_mask=None, labels=None, **kwargs):
        lora: RoutedLora = self.extra
        lora.token_mask = attention_mask.reshape(-1).bool() if attention_mask is not None else None
        lora.pop_aux_loss()
        try:
            outputs = super().forward(input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
        finally:
            lora.token_mask = None
        aux = lora.pop_aux_loss()
        if aux is not None and outputs.loss is not None:
            outputs.loss = outputs.loss + aux.to(outputs.loss.dtype)
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


def tune_routed_lora(job: TuneJob, settings: RoutedLoraSettings | None = None) -> dict:
    """Train a routed-LoRA adapter and write it (``job.write``).

    Returns:
        Training summary with ``trainable_params`` and ``adapter_bytes``.
    """
    settings = settings or RoutedLoraSettings()
    base_fp = job.base_fp()
    lora = prepare_routed_lora(job.model, job.info, settings, seed=job.train.seed)
    try:
        summary = job.run(RoutedLoraTrainable(job.model, lora))
    finally:
        lora.detach()
    summary["adapter_bytes"] = sum(t.numel() * t.element_size() for t in lora.tensors().values())
    if job.write:
        write_routed_lora(
            job.out, lora, base_fingerprint=base_fp, training={**job.train.to_json(), **summary}
        )
    return summary


def apply_routed_lora(
    model: nn.Module, adapter: RoutedLoraAdapter, allow_base_mismatch: bool = False
) -> nn.Module:
    """Attach a read adapter to ``model`` (checked against its base fingerprint) for evaluation."""
    info = find_moe_layers(model)
    lora = adapter.build(model, info, allow_base_mismatch=allow_base_mismatch)
    lora.attach(model)
    return model
