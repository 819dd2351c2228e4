"""Run a model over task examples and record routing; write and merge profile directories.

Pipeline per task::

    encode examples -> keep up to max_tokens -> (this rank's share under torchrun)
    -> right-padded batches -> base-model forward with the recorder attached -> all-reduce -> files
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..data import Example, encode_example
from ..errors import UsageError
from ..io import atomic_dir, atomic_write_json, atomic_write_text
from ..models import install, model_fingerprint, pad_token_id
from ..models.fingerprint import Parts
from .analysis import format_report, overview, selected_pairs
from .plots import plot_heatmap, plot_overlap
from .recorder import RoutingRecorder
from .store import ProfileMeta, TaskProfile, load_profile, merge_task_profiles, save_task

__all__ = [
    "ProfileConfig",
    "profile_model",
    "write_profile",
    "merge_profiles",
    "token_budget",
    "run_batches",
    "profile_sequences",
]


@dataclass(frozen=True)
class ProfileConfig:
    """How examples are fed to the model.

    Attributes:
        max_tokens: at most this many tokens per task (the last example is cut to fit).
        batch_size: sequences per forward.
        max_length: sequences are cut to this many tokens.
        trace: keep per-token expert ids.
        progress: show a progress bar.
    """

    max_tokens: int | None = None
    batch_size: int = 8
    max_length: int = 1024
    trace: bool = False
    progress: bool = True


def token_budget(sequences: list[list[int]], max_tokens: int | None, max_length: int) -> list[list[int]]:
    """Cut each sequence to ``max_length`` and keep sequences until ``max_tokens`` are reached."""
    kept, total = [], 0
    for ids in sequences:
        ids = ids[:max_length]
        if max_tokens is not None:
            ids = ids[: max(0, max_tokens - total)]
        if not ids:
            if max_tokens is not None and total >= max_tokens:
                break
            continue
        kept.append(ids)
        total += len(ids)
    return kept


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _forward_module(model: nn.Module) -> nn.Module:
    """The base model (no LM head): routing is all we need."""
    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    return base if isinstance(base, nn.Module) else model


def run_batches(
    model: nn.Module,
    sequences: list[list[int]],
    pad_id: int,
    batch_size: int,
    *,
    recorder: RoutingRecorder | None = None,
    progress: bool = False,
    desc: str = "",
) -> list[list[np.ndarray]]:
    """Forward ``sequences`` in right-padded batches through the base model.

    With a ``recorder`` it is attached and told which tokens are real; without one this is the
    plain forward the profiling overhead is measured against (same batches, same code path).

    Returns:
        Per sequence, per MoE layer, the ``[len, K]`` expert ids (only when the recorder traces).
    """
    forward = _forward_module(model)
    device = next(model.parameters()).device
    traces: list[list[np.ndarray]] = []
    bar = tqdm(total=sum(map(len, sequences)), desc=desc, unit="tok", disable=not progress, leave=False)
    attach = recorder.attached() if recorder is not None else contextlib.nullcontext()
    with torch.inference_mode(), attach:
        for start in range(0, len(sequences), batch_size):
            batch = sequences[start : start + batch_size]
            width = max(map(len, batch))
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, seq in enumerate(batch):
                ids[row, : len(seq)] = torch.tensor(seq)
                mask[row, : len(seq)] = 1
            if recorder is not None:
                recorder.set_valid(mask)
            forward(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
            if recorder is not None and recorder.trace:
                per_layer = recorder.take_trace()
                offsets = np.cumsum([0] + [len(s) for s in batch])
                for row in range(len(batch)):
                    traces.append([t[offsets[row] : offsets[row + 1]].numpy() for t in per_layer])
            bar.update(int(mask.sum()))
    bar.close()
    return traces


def profile_model(
    model: nn.Module,
    tokenizer,
    tasks: dict[str, list[Example]],
    config: ProfileConfig,
    *,
    parts: Parts | None = None,
) -> tuple[ProfileMeta, dict[str, TaskProfile]]:
    """Profile every task's examples (encoded as ``tokenizer(text)`` etc., see ``encode_example``).

    Args:
        model: a transformers causal LM with MoE layers (its experts may be offloaded: then an
            executor attached to it runs them, and ``parts`` reads them for the fingerprint).
        tokenizer: its tokenizer.
        tasks: task name -> examples.
        config: batching and budget.
        parts: reads the expert parameters that are not materialized (see ``model_fingerprint``).
    """
    encoded = {
        name: [encode_example(tokenizer, ex)[0] for ex in examples] for name, examples in tasks.items()
    }
    return profile_sequences(model, encoded, config, pad_id=pad_token_id(tokenizer), parts=parts)


def profile_sequences(
    model: nn.Module,
    tasks: dict[str, list[list[int]]],
    config: ProfileConfig,
    *,
    pad_id: int = 0,
    parts: Parts | None = None,
) -> tuple[ProfileMeta, dict[str, TaskProfile]]:
    """Profile token-id sequences; under torch.distributed each rank takes a share, counts are reduced.

    ``parts`` reads offloaded expert parameters for the fingerprint (equal to the resident model's).

    Returns:
        The profile metadata and one :class:`TaskProfile` per task (complete on every rank).
    """
    info = install(model)
    rank, world = _dist()
    meta = ProfileMeta(
        fingerprint=model_fingerprint(model, parts),
        model_type=info.model_type,
        model=str(getattr(model.config, "_name_or_path", "")),
        top_k=info.layers[0].top_k,
        num_experts=max(layer.num_experts for layer in info.layers),
        layers=info.layer_indices,
    )
    results: dict[str, TaskProfile] = {}
    for name, raw in tasks.items():
        sequences = token_budget(raw, config.max_tokens, config.max_length)
        if not sequences:
            raise UsageError(f"task '{name}': no tokens to profile")
        mine = list(range(rank, len(sequences), world))
        recorder = RoutingRecorder(info, trace=config.trace)
        traces = run_batches(
            model,
            [sequences[i] for i in mine],
            pad_id,
            config.batch_size,
            recorder=recorder,
            progress=config.progress,
            desc=f"profile {name}" + (f" [rank {rank}]" if world > 1 else ""),
        )
        counts, gate_sums = recorder.counts.clone(), recorder.gate_sums.clone()
        if world > 1:
            torch.distributed.all_reduce(counts)
            torch.distributed.all_reduce(gate_sums)
        profile = TaskProfile(
            counts=counts.numpy(),
            gate_sums=gate_sums.numpy(),
            tokens=sum(map(len, sequences)),
            examples=len(sequences),
        )
        if config.trace:
            indexed = list(zip(mine, traces))
            if world > 1:
                gathered: list = [None] * world
                torch.distributed.all_gather_object(gathered, indexed)
                indexed = [item for part in gathered for item in part]
            indexed.sort(key=lambda item: item[0])
            profile.trace = [
                np.concatenate([t[layer] for _, t in indexed]) for layer in range(len(meta.layers))
            ]
            profile.seq_lengths = np.asarray([len(sequences[i]) for i, _ in indexed], dtype=np.int64)
        results[name] = profile
    return meta, results


COLOR_SCALES = ("shared", "per-task")


def write_profile(
    out: str | Path,
    meta: ProfileMeta,
    tasks: dict[str, TaskProfile],
    *,
    plots: bool = True,
    color_scale: str = "shared",
) -> str:
    """Write a complete profile directory atomically; returns the terminal report.

    Args:
        color_scale: ``shared`` gives every task's heatmap one colour scale (equal colours, equal
            shares), ``per-task`` scales each heatmap to its own maximum.
    """
    if color_scale not in COLOR_SCALES:
        raise ValueError(f"color_scale must be one of {COLOR_SCALES}, got {color_scale!r}")
    view = overview(meta, tasks)
    report = format_report(meta, view)
    scores = {name: profile.token_scores(meta.top_k) for name, profile in tasks.items()} if plots else {}
    vmax = max((float(s.max()) for s in scores.values()), default=None) if color_scale == "shared" else None
    with atomic_dir(out, replace_marker="meta.json") as tmp:
        for name, profile in tasks.items():
            save_task(tmp / name, profile, meta)
            if plots:
                chosen = selected_pairs(scores[name], meta.layers, view["top_p"])
                plot_heatmap(
                    scores[name],
                    meta.layers,
                    chosen,
                    f"{name}: routing share per layer (red: ESFT p={view['top_p']:g})",
                    tmp / name / "heatmap.png",
                    vmax=vmax,
                )
        if plots and len(tasks) > 1:
            plot_overlap(view["task_names"], view["jaccard"], view["js_divergence"], tmp / "overlap.png")
        atomic_write_json(
            tmp / "meta.json",
            {
                **meta.to_json(),
                "tasks": {n: {"tokens": p.tokens, "examples": p.examples} for n, p in tasks.items()},
            },
        )
        atomic_write_json(tmp / "overview.json", view)
        atomic_write_text(tmp / "report.txt", report + "\n")
    return report


def merge_profiles(inputs: list[str | Path], out: str | Path) -> str:
    """Merge profiles of the same model by addition (tasks of the same name are added)."""
    if len(inputs) < 2:
        raise UsageError("merging needs at least two profile directories")
    loaded = [load_profile(path) for path in inputs]
    meta = loaded[0][0]
    for path, (other, _) in zip(inputs[1:], loaded[1:]):
        if not meta.compatible(other):
            raise UsageError(
                f"profile '{path}': different model (fingerprint/top-k/layers) than '{inputs[0]}'"
            )
    names = list(dict.fromkeys(name for _, tasks in loaded for name in tasks))
    merged = {
        name: merge_task_profiles([tasks[name] for _, tasks in loaded if name in tasks]) for name in names
    }
    return write_profile(out, meta, merged)
