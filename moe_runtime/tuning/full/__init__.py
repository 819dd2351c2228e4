"""Full fine-tuning baseline: every weight trains; the "adapter" is a whole checkpoint."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ...errors import AdapterError, UsageError
from ...models import MoEModelInfo, model_fingerprint
from ..data import Features
from ..meta import check_base, save_adapter_dir
from ..trainer import TrainableModel, TrainConfig, train

__all__ = ["tune_full", "apply_full"]


def tune_full(
    model: nn.Module,
    info: MoEModelInfo,
    features: list[Features],
    config: TrainConfig,
    *,
    out: Path,
    pad_id: int,
    work_dir: Path,
    resume: bool = False,
    write: bool = True,
    progress: bool = True,
) -> dict:
    """Train every parameter; write the whole model plus metadata (rank 0)."""
    base_fp = model_fingerprint(model)
    model.requires_grad_(True)
    wrapped = TrainableModel(model)
    summary = train(
        wrapped, features, config, pad_id=pad_id, work_dir=work_dir, resume=resume, progress=progress
    )
    summary["trainable_params"] = wrapped.trainable_parameters()
    summary["adapter_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    if write:
        save_adapter_dir(
            out,
            model.save_pretrained,
            method="full",
            model_type=info.model_type,
            base_fingerprint=base_fp,
            training=config.to_json(),
        )
    return summary


def apply_full(model: nn.Module, path: Path, meta: dict) -> nn.Module:
    """The fully fine-tuned model stored at ``path`` (checked against ``model``, its base)."""
    from ...models import load_model

    check_base(meta, model, path)
    try:
        return load_model(path, dtype=next(model.parameters()).dtype)
    except UsageError as exc:
        raise AdapterError(str(exc)) from None
