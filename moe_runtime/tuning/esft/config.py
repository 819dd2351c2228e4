"""The ESFT expert configuration (``expert_cfg.json``), validated against a model."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import UsageError
from ...models import MoEModelInfo

__all__ = ["ExpertSelection", "read_expert_config"]


@dataclass
class ExpertSelection:
    """Which routed experts an ESFT adapter trains, per decoder layer index.

    Attributes:
        experts: layer index -> sorted expert ids (layers with no experts are omitted).
        shared_experts: shared experts are trained too.
        non_expert_modules: attention, norms, embeddings, ... are trained too (routers stay frozen).
    """

    experts: dict[int, list[int]] = field(default_factory=dict)
    shared_experts: bool = False
    non_expert_modules: bool = False
    source: str = field(default="expert_cfg.json", repr=False, compare=False)

    @property
    def num_experts(self) -> int:
        return sum(len(ids) for ids in self.experts.values())

    def to_json(self) -> dict:
        return {
            "experts": {str(layer): ids for layer, ids in sorted(self.experts.items())},
            "shared_experts": self.shared_experts,
            "non_expert_modules": self.non_expert_modules,
        }

    def validate(self, info: MoEModelInfo, where: str, error: type[UsageError] = UsageError) -> None:
        """Every layer must be an MoE layer of the model and every id in range.

        Raises:
            UsageError: naming the file, layer and id.
        """
        for layer, ids in self.experts.items():
            try:
                moe = info.by_index(layer)
            except KeyError:
                raise error(
                    f"{where}: layer {layer} is not an MoE layer (MoE layers: {info.layer_indices})"
                ) from None
            bad = [e for e in ids if not 0 <= e < moe.num_experts]
            if bad:
                raise error(f"{where}: layer {layer}: expert id {bad[0]} out of range [0, {moe.num_experts})")


def parse_expert_config(obj: object, where: str) -> ExpertSelection:
    """Validate the shape of an ``expert_cfg.json`` object."""
    if not isinstance(obj, dict) or not isinstance(obj.get("experts"), dict):
        raise UsageError(f'{where}: expected {{"experts": {{layer: [ids]}}, ...}}')
    experts: dict[int, list[int]] = {}
    for key, ids in obj["experts"].items():
        try:
            layer = int(key)
        except ValueError:
            raise UsageError(f"{where}: layer key '{key}' is not an integer") from None
        if not isinstance(ids, list) or not all(isinstance(e, int) and not isinstance(e, bool) for e in ids):
            raise UsageError(f"{where}: layer {key}: expert ids must be a list of integers")
        if len(set(ids)) != len(ids):
            raise UsageError(f"{where}: layer {key}: duplicate expert ids")
        if ids:
            experts[layer] = sorted(ids)
    for flag in ("shared_experts", "non_expert_modules"):
        if not isinstance(obj.get(flag, False), bool):
            raise UsageError(f"{where}: '{flag}' must be true or false")
    return ExpertSelection(
        experts=experts,
        shared_experts=bool(obj.get("shared_experts", False)),
        non_expert_modules=bool(obj.get("non_expert_modules", False)),
    )


def read_expert_config(path: str | Path) -> ExpertSelection:
    """Read and validate an ``expert_cfg.json`` file (shape only; see ``ExpertSelection.validate``)."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file") from None
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path}: unreadable expert config ({exc})") from None
    selection = parse_expert_config(obj, str(path))
    selection.source = str(path)
    return selection
