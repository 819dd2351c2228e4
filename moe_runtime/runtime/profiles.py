"""Task routing profiles of adapters, and the automatic adapter choice of ``"auto"`` requests.

An adapter's task routing profile is, per MoE layer, how often the base model's router picks each
expert on the adapter's task data (``[L, E]`` frequencies, each row summing to 1): exactly what the
profiler measures and what ESFT selects experts from. ``tune`` stores it beside the adapter as
``routing_profile.json``. A prompt's own profile is measured the same way, on the base model, during
a prefill; the adapter chosen is the one whose profile is closest, by the mean over layers of the
Jensen-Shannon divergence between the two frequency vectors (the idea of MeteoRA, which trains a
gate for it, done here with the routing the model already computes).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import UsageError
from ..io import atomic_write_json
from ..models import MoEModelInfo

__all__ = [
    "PROFILE_FILE",
    "RoutingProfile",
    "closest_profile",
    "load_routing_profile",
    "write_routing_profile",
]

PROFILE_FILE = "routing_profile.json"
FORMAT_VERSION = 1


@dataclass
class RoutingProfile:
    """Expert-selection frequencies of a task on the base model.

    Attributes:
        layers: MoE layer indices, one per row.
        frequencies: ``[L, E]`` float64, each row sums to 1 (a layer without tokens is uniform).
        tokens: tokens profiled.
        task: the task's name, if known.
    """

    layers: list[int]
    frequencies: np.ndarray
    tokens: int = 0
    task: str | None = None

    @classmethod
    def from_counts(cls, layers: list[int], counts: np.ndarray, tokens: int = 0, task: str | None = None):
        """From ``[L, E]`` selection counts (normalized per layer)."""
        counts = np.asarray(counts, dtype=np.float64)
        totals = counts.sum(axis=1, keepdims=True)
        uniform = np.full_like(counts, 1.0 / max(counts.shape[1], 1))
        freqs = np.where(totals > 0, counts / np.where(totals > 0, totals, 1.0), uniform)
        return cls(list(layers), freqs, int(tokens), task)

    def check(self, info: MoEModelInfo) -> None:
        """Raises UsageError unless the profile has this model's MoE layers and expert counts."""
        expected = {layer.index: layer.num_experts for layer in info.layers}
        got = dict(zip(self.layers, [row.shape[0] for row in self.frequencies]))
        if got != expected:
            raise UsageError(
                f"routing profile{f' of task {self.task!r}' if self.task else ''} does not fit this model "
                f"(layers/experts {sorted(got.items())[:3]}..., the model has {sorted(expected.items())[:3]}...)"
            )

    def to_json(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "task": self.task,
            "tokens": self.tokens,
            "layers": self.layers,
            "frequencies": [[round(float(v), 8) for v in row] for row in self.frequencies],
        }


def write_routing_profile(directory: str | Path, profile: RoutingProfile) -> Path:
    """Write ``profile`` as ``directory/routing_profile.json`` (atomically)."""
    path = Path(directory) / PROFILE_FILE
    atomic_write_json(path, profile.to_json())
    return path


def _from_json(obj: dict, where: str) -> RoutingProfile:
    try:
        layers = [int(x) for x in obj["layers"]]
        freqs = np.asarray(obj["frequencies"], dtype=np.float64)
        if (
            freqs.ndim != 2
            or freqs.shape[0] != len(layers)
            or not np.isfinite(freqs).all()
            or (freqs < 0).any()
        ):
            raise ValueError("frequencies must be [layers, experts] non-negative numbers")
        return RoutingProfile.from_counts(layers, freqs, int(obj.get("tokens", 0)), obj.get("task"))
    except (KeyError, TypeError, ValueError) as exc:
        raise UsageError(f"routing profile '{where}': unreadable ({exc})") from None


def load_routing_profile(path: str | Path, *, missing_ok: bool = False) -> RoutingProfile | None:
    """Read a task routing profile.

    Args:
        path: a ``routing_profile.json`` file, a directory holding one (an adapter directory), a
            task directory of a ``moe-runtime profile`` output (``PROFILE/TASK``), or a profile
            directory with exactly one task.
        missing_ok: return None instead of raising when ``path`` holds no profile.

    Raises:
        UsageError: no profile there (unless ``missing_ok``), or an unreadable one.
    """
    from ..profiler import load_profile

    path = Path(path)
    if path.is_dir() and (path / PROFILE_FILE).is_file():
        path = path / PROFILE_FILE
    if path.is_file():
        try:
            obj = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise UsageError(f"routing profile '{path}': unreadable ({exc})") from None
        return _from_json(obj, str(path))
    for directory, task in ((path, None), (path.parent, path.name)):
        if (directory / "meta.json").is_file() and (task is None or (path / "counts.json").is_file()):
            meta, tasks = load_profile(directory)
            if task is None:
                if len(tasks) != 1:
                    raise UsageError(
                        f"profile '{path}' has {len(tasks)} tasks ({', '.join(tasks)}): give PROFILE/TASK"
                    )
                task = next(iter(tasks))
            found = tasks[task]
            return RoutingProfile.from_counts(meta.layers, found.counts, found.tokens, task)
    if missing_ok:
        return None
    raise UsageError(f"routing profile '{path}': no {PROFILE_FILE} and not a profile directory")


def _js_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence along the last dim of ``p [..., E]`` and ``q [..., E]`` (nats)."""
    m = 0.5 * (p + q)

    def kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.where(a > 0, a * (a.clamp_min(1e-300).log() - b.clamp_min(1e-300).log()), 0.0).sum(-1)

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def profile_distances(counts: dict[int, torch.Tensor], profiles: list[RoutingProfile]) -> torch.Tensor:
    """``[B, P]`` mean over the profiles' layers of the JS divergence between each prompt's expert
    frequencies (``counts {layer index: [B, E]}`` selections) and each profile's."""
    batch = next(iter(counts.values())).shape[0]
    out = torch.zeros(batch, len(profiles), dtype=torch.float64)
    for j, profile in enumerate(profiles):
        used = 0
        for layer, row in zip(profile.layers, profile.frequencies):
            if layer not in counts:
                continue
            c = counts[layer].to(torch.float64)
            p = c / c.sum(-1, keepdim=True).clamp_min(1.0)
            out[:, j] += _js_divergence(p, torch.from_numpy(row)[None, :])
            used += 1
        out[:, j] /= max(used, 1)
    return out


def closest_profile(counts: dict[int, torch.Tensor], profiles: list[RoutingProfile]) -> list[int]:
    """For each prompt (``counts {layer index: [B, E]}``), the index of the closest profile."""
    if not profiles:
        raise UsageError("no adapter with a routing profile is loaded")
    return profile_distances(counts, profiles).argmin(dim=1).tolist()
