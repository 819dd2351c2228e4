"""Training on the Hugging Face Trainer, shared by every tuning method.

A method hands over the model with exactly its trainable parameters set ``requires_grad=True``.
The model is wrapped so that Trainer checkpoints (for ``--resume``) hold only those parameters,
and run data-parallel under ``torchrun`` (gloo on CPU, NCCL on GPU) with the global batch split
across processes. Loss: mean over supervised tokens of the global batch (token counts are
averaged across processes), plus the router's load-balancing loss where the family has one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import UsageError
from .data import Features, collate

__all__ = ["TrainConfig", "TrainableModel", "train", "world_size"]


@dataclass
class TrainConfig:
    """Training hyper-parameters (CLI flags of ``tune``).

    Attributes:
        steps: optimizer steps.
        lr: peak learning rate (linear warmup, cosine decay).
        batch_size: global batch (examples per step, summed over processes).
        grad_accum: micro-batches per step on each process.
        seed: data order and initialisation seed.
        max_length: examples are cut to this many tokens.
        warmup_steps: linear warmup steps.
        weight_decay: AdamW weight decay.
        save_steps: checkpoint every N steps (0: only at the end) into ``<out>.checkpoints``.
        aux_loss_coef: router load-balancing loss weight; None keeps the model config's value.
        gradient_checkpointing: keep only each decoder layer's input for backward and run the layer
            again there (less activation memory, one more forward; offloaded experts are read again).
    """

    steps: int = 100
    lr: float = 1e-4
    batch_size: int = 16
    grad_accum: int = 1
    seed: int = 0
    max_length: int = 512
    warmup_steps: int = 0
    weight_decay: float = 0.0
    save_steps: int = 0
    aux_loss_coef: float | None = None
    gradient_checkpointing: bool = False

    def validate(self) -> None:
        """Raises ConfigError naming the field."""
        from .registry import ConfigError

        for name in ("steps", "batch_size", "grad_accum", "max_length"):
            if getattr(self, name) <= 0:
                raise ConfigError(name, f"must be positive, got {getattr(self, name)}")
        if not 0 < self.lr < math.inf:
            raise ConfigError("lr", f"must be a positive finite number, got {self.lr}")
        for name in ("weight_decay", "aux_loss_coef"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < math.inf:
                raise ConfigError(name, f"must be a finite number >= 0, got {value}")
        for name in ("warmup_steps", "save_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(name, f"must not be negative, got {getattr(self, name)}")

    def to_json(self) -> dict:
        return asdict(self)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


class TrainableModel(nn.Module):
    """Wraps a causal LM so that ``state_dict`` (Trainer checkpoints) holds only trainable tensors.

    Args:
        model: the transformers model, trainable parameters already marked.
        extra: modules holding trainable parameters outside the model (e.g. the ESFT arena).
    """

    def __init__(self, model: nn.Module, extra: nn.Module | None = None) -> None:
        super().__init__()
        self.model = model
        self.extra = extra if extra is not None else nn.Module()

    def forward(self, input_ids, attention_mask=None, labels=None, **kwargs):
        return self.model(
            input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=False, **kwargs
        )

    def state_dict(self, *args, **kwargs):  # type: ignore[override]
        full = super().state_dict(*args, **kwargs)
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        return {k: v for k, v in full.items() if k in trainable}

    _keys_to_ignore_on_save = None

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):  # type: ignore[override]
        """Load a checkpoint of the trainable tensors; frozen ones are not expected in it."""
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        missing = [key for key in result.missing_keys if key in trainable]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(
                f"checkpoint does not match: missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}"
            )
        return type(result)(missing, result.unexpected_keys)

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def _enable_aux_loss(model: nn.Module, coef: float | None) -> None:
    """Turn the router load-balancing loss on (as in the reference recipe), optionally reweighted.

    Causal-LM classes copy ``router_aux_loss_coef`` from the config at construction, so the
    attribute is set on every module that holds it, not only on the config.
    """
    config = model.config
    if not hasattr(config, "output_router_logits"):
        return
    config.output_router_logits = True
    if coef is None:
        return
    if hasattr(config, "router_aux_loss_coef"):
        config.router_aux_loss_coef = coef
    for module in model.modules():
        if hasattr(module, "router_aux_loss_coef"):
            module.router_aux_loss_coef = coef


def _callbacks(steps: int, progress: bool, log_file: Path | None) -> list:
    """Our Trainer callbacks: a progress bar with the loss (instead of printed log dicts) and a log file."""
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    class LossBar(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                self.bar = tqdm(total=steps, desc="train", unit="step", initial=state.global_step)

        def on_step_end(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs and "loss" in logs:
                self.bar.set_postfix(loss=f"{logs['loss']:.4f}", refresh=False)

        def on_train_end(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                self.bar.close()

    class LogFile(TrainerCallback):
        """Every Trainer log row (loss, learning rate, grad norm, ...) as one JSON line."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs:
                with log_file.open("a", encoding="utf-8") as f:
                    f.write(json.dumps({"step": state.global_step, **logs}) + "\n")

    callbacks = [LossBar()] if progress else []
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        log_file.write_text("")
        callbacks.append(LogFile())
    return callbacks


class _Dataset(torch.utils.data.Dataset):
    def __init__(self, features: list[Features]) -> None:
        self.features = features

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> Features:
        return self.features[index]


def train(
    wrapped: TrainableModel,
    features: list[Features],
    config: TrainConfig,
    *,
    pad_id: int,
    work_dir: Path,
    resume: bool = False,
    progress: bool = True,
    log_file: Path | None = None,
) -> dict:
    """Run the HF Trainer over ``features``; returns the log history's summary.

    Args:
        wrapped: the model with its trainable parameters.
        features: tokenized training examples.
        config: hyper-parameters (``batch_size`` is the global batch).
        pad_id: padding token id.
        work_dir: where Trainer checkpoints go (kept only if ``save_steps`` > 0).
        resume: continue from the newest checkpoint in ``work_dir``.
        progress: show the progress bar with loss.
        log_file: write the Trainer's log rows there (JSON lines) instead of nowhere.
    """
    from transformers import PrinterCallback, ProgressCallback, Trainer, TrainingArguments
    from transformers.trainer_utils import get_last_checkpoint

    from .registry import ConfigError

    world = world_size()
    per_device, rest = divmod(config.batch_size, world * config.grad_accum)
    if rest or per_device == 0:
        raise ConfigError(
            "batch_size",
            f"{config.batch_size} must be a multiple of processes ({world}) x micro-batches per step "
            f"({config.grad_accum})",
        )
    checkpoint = None
    if resume:  # before the Trainer creates work_dir: a refused --resume leaves nothing behind
        checkpoint = get_last_checkpoint(str(work_dir)) if work_dir.is_dir() else None
        if checkpoint is None:
            raise ConfigError("resume", f"no checkpoint in '{work_dir}'")
    router_logits_before = getattr(wrapped.model.config, "output_router_logits", None)
    _enable_aux_loss(wrapped.model, config.aux_loss_coef)
    if config.gradient_checkpointing:  # on the model itself: the Trainer would ask our wrapper
        wrapped.model.activation_checkpointing_enable({"use_reentrant": False})
    args = TrainingArguments(
        output_dir=str(work_dir),
        max_steps=config.steps,
        learning_rate=config.lr,
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=config.grad_accum,
        lr_scheduler_type="cosine",
        warmup_steps=config.warmup_steps,
        weight_decay=config.weight_decay,
        seed=config.seed,
        data_seed=config.seed,
        logging_steps=max(1, min(10, config.steps // 10)),
        save_strategy="steps" if config.save_steps else "no",
        save_steps=config.save_steps or 500,
        save_only_model=False,
        report_to=[],
        disable_tqdm=True,  # our own bar (see _callbacks), not printed log dicts
        remove_unused_columns=False,
        dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
        ddp_backend=("nccl" if torch.cuda.is_available() else "gloo") if world > 1 else None,
        ddp_find_unused_parameters=world > 1,
        average_tokens_across_devices=True,
        max_grad_norm=1.0,
        logging_nan_inf_filter=False,  # a diverged run must show its NaN loss (and is refused below)
    )
    trainer = Trainer(
        model=wrapped,
        args=args,
        train_dataset=_Dataset(features),
        data_collator=lambda batch: collate(batch, pad_id),
    )
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    for callback in _callbacks(config.steps, progress, log_file):
        trainer.add_callback(callback)
    try:
        result = trainer.train(resume_from_checkpoint=checkpoint)
        trainer.accelerator.wait_for_everyone()  # no rank still looks into work_dir when it goes
    finally:
        if config.gradient_checkpointing:
            wrapped.model.activation_checkpointing_disable()
        if router_logits_before is not None:  # generation with router logits on breaks in some families
            wrapped.model.config.output_router_logits = router_logits_before
        if not config.save_steps and not resume and trainer.is_world_process_zero():
            with contextlib.suppress(OSError):  # rmdir removes it only if empty
                work_dir.rmdir()
    diverged = [n for n, p in wrapped.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
    if diverged or not math.isfinite(result.training_loss):
        where = f"{diverged[0]} holds non-finite values" if diverged else "the loss is not finite"
        raise UsageError(
            f"training diverged after {trainer.state.global_step} steps ({where}); nothing was written "
            "(lower the learning rate or the loss coefficients)"
        )
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    return {
        "train_runtime_s": float(result.metrics.get("train_runtime", 0.0)),
        "train_loss": float(result.training_loss),
        "first_logged_loss": losses[0] if losses else None,
        "last_logged_loss": losses[-1] if losses else None,
        "steps": int(trainer.state.global_step),
    }
