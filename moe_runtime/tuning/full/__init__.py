"""Full fine-tuning baseline: every weight trains; the "adapter" is a whole checkpoint."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from ...errors import AdapterError, UsageError
from ..meta import check_base, save_adapter_dir
from ..registry import Method, TuneJob, register
from ..trainer import TrainableModel

__all__ = ["FullAdapter", "FullConfig", "METHOD", "apply_full", "tune_full"]


@dataclass
class FullConfig:
    """Full fine-tuning has no settings of its own (the training flags are shared)."""

    def validate(self) -> None:
        pass


@dataclass
class FullAdapter:
    """A fully fine-tuned checkpoint directory and its metadata."""

    path: Path
    meta: dict = field(repr=False)


def tune_full(job: TuneJob) -> dict:
    """Train every parameter; write the whole model plus metadata (``job.write``)."""
    model = job.model
    base_fp = job.base_fp()
    model.requires_grad_(True)
    summary = job.run(TrainableModel(model))
    summary["adapter_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    if job.write:
        save_adapter_dir(
            job.out,
            model.save_pretrained,
            method="full",
            model_type=job.info.model_type,
            base_fingerprint=base_fp,
            training=job.train.to_json(),
        )
    return summary


def apply_full(model: nn.Module, adapter: FullAdapter, allow_base_mismatch: bool = False) -> nn.Module:
    """The fully fine-tuned model stored at ``adapter.path`` (checked against ``model``, its base)."""
    from ...models import load_model

    check_base(adapter.meta, model, adapter.path, allow_base_mismatch=allow_base_mismatch)
    try:
        return load_model(adapter.path, dtype=next(model.parameters()).dtype)
    except UsageError as exc:
        raise AdapterError(str(exc)) from None


def _tune(job: TuneJob, config: FullConfig) -> dict:
    return {**tune_full(job), "what": "all weights"}


METHOD = register(
    Method(
        name="full",
        config=FullConfig,
        tune=_tune,
        read=lambda path, meta: FullAdapter(Path(path), meta),
        apply=apply_full,
        adapter_type=FullAdapter,
    )
)
