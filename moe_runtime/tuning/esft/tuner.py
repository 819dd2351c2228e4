"""ESFT: train only the selected experts (and, if flagged, shared experts / non-expert modules)."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ...models import MoEModelInfo, install, model_fingerprint
from ...models.weights import split_slices
from ..data import Features
from ..trainer import TrainableModel, TrainConfig, train
from .adapter import replaced_fingerprint, write_adapter
from .arena import ESFTArena
from .config import ExpertSelection

__all__ = ["prepare_esft", "tune_esft", "tuned_experts"]


def _router_params(info: MoEModelInfo) -> set[int]:
    return {id(p) for layer in info.layers if layer.router is not None for p in layer.router.parameters()}


def prepare_esft(
    model: nn.Module, info: MoEModelInfo, selection: ExpertSelection
) -> tuple[ESFTArena, list[str]]:
    """Freeze the model, attach an arena of the selected experts, unfreeze flagged extras.

    Returns:
        The arena and the names of model parameters trained besides it (shared / non-expert).
    """
    install(model, info)
    model.requires_grad_(False)
    arena = ESFTArena(info, selection)
    arena.attach()
    extras: list[str] = []
    expert_params = {id(p) for layer in info.layers for p in layer.experts.parameters()}
    routers = _router_params(info)
    shared = {id(p) for layer in info.layers for module in layer.shared for p in module.parameters()}
    for name, param in model.named_parameters():
        if id(param) in expert_params or id(param) in routers:
            continue
        if (selection.shared_experts and id(param) in shared) or (
            selection.non_expert_modules and id(param) not in shared
        ):
            param.requires_grad_(True)
            extras.append(name)
    return arena, extras


def tuned_experts(arena: ESFTArena, info: MoEModelInfo) -> dict[tuple[int, int], dict]:
    """(layer, expert) -> classic per-expert tensors of the arena's current weights."""
    out = {}
    for key, layer_arena in arena.layers.items():
        layer = info.by_index(int(key))
        for position, expert in enumerate(layer_arena.expert_ids):
            out[(layer.index, expert)] = split_slices(
                layer.layout, layer_arena.fused_slices(position, layer.layout)
            )
    return out


def tune_esft(
    model: nn.Module,
    info: MoEModelInfo,
    selection: ExpertSelection,
    features: list[Features],
    config: TrainConfig,
    *,
    out: Path,
    pad_id: int,
    work_dir: Path,
    resume: bool = False,
    write: bool = True,
    progress: bool = True,
    log_file: Path | None = None,
) -> dict:
    """Train an ESFT adapter and write it (rank 0) in the official layout.

    ``log_file`` receives the Trainer's log rows as JSON lines.

    Returns:
        Training summary with ``trainable_params`` and ``adapter_bytes``.
    """
    arena, extras = prepare_esft(model, info, selection)
    params = dict(model.named_parameters())
    replaced = replaced_fingerprint(model, info, selection, extras)
    base_fp = model_fingerprint(model)
    wrapped = TrainableModel(model, arena)
    summary = train(
        wrapped,
        features,
        config,
        pad_id=pad_id,
        work_dir=work_dir,
        resume=resume,
        progress=progress,
        log_file=log_file,
    )
    summary["trainable_params"] = wrapped.trainable_parameters()
    tuned = tuned_experts(arena, info)
    others = {name: params[name] for name in extras}
    summary["adapter_bytes"] = sum(
        t.numel() * t.element_size() for tensors in tuned.values() for t in tensors.values()
    ) + sum(t.numel() * t.element_size() for t in others.values())
    if write:
        write_adapter(
            out,
            info=info,
            selection=selection,
            tuned=tuned,
            others=others,
            replaced=replaced,
            base_fingerprint=base_fp,
            training={**config.to_json(), **{k: v for k, v in summary.items() if k != "adapter_bytes"}},
        )
    arena.detach()
    return summary
