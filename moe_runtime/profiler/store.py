"""Routing profiles on disk: per-task counts, ESFT summaries, traces and metadata.

Layout of a profile directory::

    DIR/meta.json                 model fingerprint, type, top-k, layers, experts, tasks
    DIR/<task>/summary.json       ESFT layout {"token_scores": {layer: {expert: s}}, "gate_scores": ...}
    DIR/<task>/counts.json        raw counts and gate sums per (layer, expert), token count
    DIR/<task>/trace.npz          with --trace: per layer [tokens, K] expert ids + sequence lengths

Profiles of the same model merge by addition of counts, gate sums and tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import UsageError
from ..io import atomic_write_json

__all__ = [
    "TaskProfile",
    "ProfileMeta",
    "esft_summary",
    "save_task",
    "load_profile",
    "merge_task_profiles",
    "FORMAT_VERSION",
]

FORMAT_VERSION = 1


@dataclass
class ProfileMeta:
    """Model-level facts shared by every task of a profile."""

    fingerprint: str
    model_type: str
    model: str
    top_k: int
    num_experts: int
    layers: list[int]

    def compatible(self, other: ProfileMeta) -> bool:
        return (self.fingerprint, self.top_k, self.num_experts, self.layers) == (
            other.fingerprint,
            other.top_k,
            other.num_experts,
            other.layers,
        )

    def to_json(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "fingerprint": self.fingerprint,
            "model_type": self.model_type,
            "model": self.model,
            "top_k": self.top_k,
            "num_experts": self.num_experts,
            "layers": self.layers,
        }

    @classmethod
    def from_json(cls, obj: dict) -> ProfileMeta:
        return cls(
            fingerprint=obj["fingerprint"],
            model_type=obj["model_type"],
            model=obj.get("model", ""),
            top_k=int(obj["top_k"]),
            num_experts=int(obj["num_experts"]),
            layers=[int(x) for x in obj["layers"]],
        )


@dataclass
class TaskProfile:
    """Routing of one task.

    Attributes:
        counts: ``[L, E]`` int64 selections per (MoE layer row, expert).
        gate_sums: ``[L, E]`` float64 summed routing weights.
        tokens: non-padding tokens counted.
        examples: examples (sequences) profiled.
        trace: per layer ``[tokens, K]`` expert ids, or None.
        seq_lengths: tokens of each traced sequence, in trace order.
    """

    counts: np.ndarray
    gate_sums: np.ndarray
    tokens: int
    examples: int
    trace: list[np.ndarray] | None = None
    seq_lengths: np.ndarray | None = None
    sources: list[str] = field(default_factory=list)

    def token_scores(self, top_k: int) -> np.ndarray:
        """``[L, E]`` selections / (tokens x top-k): sums to 1 per layer."""
        total = self.tokens * top_k
        return self.counts / total if total else np.zeros(self.counts.shape)

    def gate_scores(self) -> np.ndarray:
        """``[L, E]`` summed routing weight / tokens."""
        return self.gate_sums / self.tokens if self.tokens else np.zeros(self.gate_sums.shape)


def _scores_json(scores: np.ndarray, layers: list[int]) -> dict:
    return {str(layer): {str(e): float(v) for e, v in enumerate(row)} for layer, row in zip(layers, scores)}


def esft_summary(profile: TaskProfile, meta: ProfileMeta) -> dict:
    """The ESFT ``summary.json`` content of one task."""
    return {
        "token_scores": _scores_json(profile.token_scores(meta.top_k), meta.layers),
        "gate_scores": _scores_json(profile.gate_scores(), meta.layers),
    }


def save_task(directory: Path, profile: TaskProfile, meta: ProfileMeta) -> None:
    """Write one task's files into ``directory`` (which must exist; the caller makes it atomic)."""
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_json(directory / "summary.json", esft_summary(profile, meta))
    atomic_write_json(
        directory / "counts.json",
        {
            "format_version": FORMAT_VERSION,
            "tokens": int(profile.tokens),
            "examples": int(profile.examples),
            "top_k": meta.top_k,
            "layers": meta.layers,
            "counts": profile.counts.astype(int).tolist(),
            "gate_sums": profile.gate_sums.tolist(),
            "sources": profile.sources,
        },
    )
    if profile.trace is not None:
        arrays = {f"layer_{layer}": trace for layer, trace in zip(meta.layers, profile.trace)}
        arrays["seq_lengths"] = np.asarray(profile.seq_lengths, dtype=np.int64)
        arrays["layers"] = np.asarray(meta.layers, dtype=np.int64)
        tmp = directory / ".trace.tmp.npz"
        np.savez_compressed(tmp, **arrays)
        tmp.replace(directory / "trace.npz")


def _load_task(directory: Path, meta: ProfileMeta) -> TaskProfile:
    try:
        raw = json.loads((directory / "counts.json").read_text())
        counts = np.asarray(raw["counts"], dtype=np.int64)
        gate_sums = np.asarray(raw["gate_sums"], dtype=np.float64)
    except (OSError, ValueError, KeyError) as exc:
        raise UsageError(f"profile task '{directory}': unreadable counts.json ({exc})") from None
    if counts.shape != (len(meta.layers), meta.num_experts) or gate_sums.shape != counts.shape:
        raise UsageError(f"profile task '{directory}': counts shape {counts.shape} does not match meta.json")
    trace = seq_lengths = None
    trace_file = directory / "trace.npz"
    if trace_file.exists():
        trace, seq_lengths = _load_trace(trace_file, meta)
    return TaskProfile(
        counts=counts,
        gate_sums=gate_sums,
        tokens=int(raw["tokens"]),
        examples=int(raw.get("examples", 0)),
        trace=trace,
        seq_lengths=seq_lengths,
        sources=list(raw.get("sources", [])),
    )


def _load_trace(path: Path, meta: ProfileMeta) -> tuple[list[np.ndarray], np.ndarray]:
    """A task's ``trace.npz``: per layer ``[tokens, K]`` expert ids in range, lengths that add up.

    Raises:
        UsageError: unreadable, or arrays missing or inconsistent (path, array and problem named).
    """
    import zipfile

    try:
        with np.load(path, allow_pickle=False) as data:
            trace = [np.asarray(data[f"layer_{layer}"]) for layer in meta.layers]
            seq_lengths = np.asarray(data["seq_lengths"])
    except KeyError as exc:
        raise UsageError(
            f"trace '{path}': no array {exc} (expected layer_<i> per MoE layer and seq_lengths)"
        ) from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise UsageError(
            f"trace '{path}': unreadable ({str(exc).strip() or exc.__class__.__name__})"
        ) from None
    tokens = len(trace[0]) if trace else 0
    for layer, ids in zip(meta.layers, trace):
        where = f"trace '{path}': layer_{layer}"
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
            raise UsageError(
                f"{where}: expected a [tokens, top-k] integer array, got {ids.dtype} {ids.shape}"
            )
        if len(ids) != tokens:
            raise UsageError(f"{where}: {len(ids)} tokens, layer_{meta.layers[0]} has {tokens}")
        if ids.size and (ids.min() < -1 or ids.max() >= meta.num_experts):  # -1: no expert (some routers)
            raise UsageError(f"{where}: expert ids outside [0, {meta.num_experts})")
    if seq_lengths.ndim != 1 or int(seq_lengths.sum()) != tokens or (seq_lengths < 0).any():
        raise UsageError(f"trace '{path}': seq_lengths do not add up to the {tokens} traced tokens")
    return trace, seq_lengths


def load_profile(directory: str | Path) -> tuple[ProfileMeta, dict[str, TaskProfile]]:
    """Load a profile directory written by ``moe-runtime profile``.

    Raises:
        UsageError: not a profile directory, or unreadable parts (path named).
    """
    directory = Path(directory)
    meta_file = directory / "meta.json"
    if not meta_file.is_file():
        raise UsageError(f"profile '{directory}': no meta.json (not a profile directory)")
    try:
        raw = json.loads(meta_file.read_text())
        meta = ProfileMeta.from_json(raw)
        task_names = list(raw["tasks"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"profile '{directory}': unreadable meta.json ({exc})") from None
    return meta, {name: _load_task(directory / name, meta) for name in task_names}


def merge_task_profiles(parts: list[TaskProfile]) -> TaskProfile:
    """Add profiles of the same task (sharded runs). Traces are concatenated in the given order."""
    traced = all(p.trace is not None for p in parts)
    return TaskProfile(
        counts=sum(p.counts for p in parts),
        gate_sums=sum(p.gate_sums for p in parts),
        tokens=sum(p.tokens for p in parts),
        examples=sum(p.examples for p in parts),
        trace=[np.concatenate(layer) for layer in zip(*(p.trace for p in parts))] if traced else None,
        seq_lengths=np.concatenate([p.seq_lengths for p in parts]) if traced else None,
        sources=[s for p in parts for s in p.sources],
    )
