"""ESFT: train only the selected experts (and, if flagged, shared experts / non-expert modules).

With ``job.offload`` (an offload tier) the frozen routed experts stay on disk and are read through the
tier in the forward and again in the backward pass (see :mod:`.offloaded`); the adapter is the same.
"""

from __future__ import annotations

import contextlib

from torch import nn

from ...models import MoEModelInfo, fingerprint_tensors, install
from ...models.weights import split_slices
from ..registry import TuneJob
from ..trainer import TrainableModel
from .adapter import replaced_fingerprint, write_adapter
from .config import ExpertSelection
from .trainable import TrainableExperts

__all__ = ["prepare_esft", "tune_esft", "tuned_experts"]


def _router_params(info: MoEModelInfo) -> set[int]:
    return {id(p) for layer in info.layers if layer.router is not None for p in layer.router.parameters()}


def prepare_esft(
    model: nn.Module, info: MoEModelInfo, selection: ExpertSelection, offload=None
) -> tuple[TrainableExperts, list[str]]:
    """Freeze the model, attach an arena of the selected experts, unfreeze flagged extras.

    Args:
        offload: an offload tier holding the routed experts (the model's are on meta), or None.

    Returns:
        The arena and the names of model parameters trained besides it (shared / non-expert).
    """
    install(model, info)
    model.requires_grad_(False)
    if offload is None:
        arena = TrainableExperts(info, selection)
    else:
        from .offloaded import OffloadedTrainableExperts

        arena = OffloadedTrainableExperts(info, selection, offload)
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


def tuned_experts(arena: TrainableExperts, info: MoEModelInfo) -> dict[tuple[int, int], dict]:
    """(layer, expert) -> classic per-expert tensors of the arena's current weights."""
    out = {}
    for key, trainable in arena.layers.items():
        layer = info.by_index(int(key))
        for position, expert in enumerate(trainable.expert_ids):
            out[(layer.index, expert)] = split_slices(
                layer.layout, trainable.fused_slices(position, layer.layout)
            )
    return out


def tune_esft(job: TuneJob, selection: ExpertSelection) -> dict:
    """Train an ESFT adapter and write it (``job.write``) in the official layout.

    Returns:
        Training summary with ``trainable_params`` and ``adapter_bytes``.
    """
    model, info, tier = job.model, job.info, job.offload
    arena, extras = prepare_esft(model, info, selection, tier)
    params = dict(model.named_parameters())
    if tier is None:
        replaced = replaced_fingerprint(model, info, selection, extras)
        base_fp = job.base_fp()
        running = contextlib.nullcontext()
    else:  # the base experts it replaces are the arena's starting copies; the rest is read from disk
        named = [
            (f"{info.by_index(layer).experts_name}.{expert}.{name}", tensor)
            for (layer, expert), tensors in tuned_experts(arena, info).items()
            for name, tensor in tensors.items()
        ]
        replaced = fingerprint_tensors(named + [(name, params[name]) for name in extras])
        del named
        base_fp = job.base_fp()
        from .offloaded import unregistered_experts

        running = contextlib.ExitStack()
        running.enter_context(unregistered_experts(info))
        running.enter_context(tier.threads())
    with running:
        summary = job.run(TrainableModel(model, arena))
    tuned = tuned_experts(arena, info)
    others = {name: params[name] for name in extras}
    summary["adapter_bytes"] = sum(
        t.numel() * t.element_size() for tensors in tuned.values() for t in tensors.values()
    ) + sum(t.numel() * t.element_size() for t in others.values())
    if job.write:
        write_adapter(
            job.out,
            info=info,
            selection=selection,
            tuned=tuned,
            others=others,
            replaced=replaced,
            base_fingerprint=base_fp,
            training={**job.train.to_json(), **{k: v for k, v in summary.items() if k != "adapter_bytes"}},
        )
    arena.detach()
    return summary
