"""esft-lora-merge adapters on disk, their checks against a base model, and their merge.

An adapter directory holds::

    expert_cfg.json             the selected experts, official ESFT format
    adapter.safetensors         per selected expert and weight, the low-rank factors only:
                                <experts module>.<e>.{gate_proj,up_proj,down_proj}.lora_A.weight  [r, in]
                                <experts module>.<e>.{gate_proj,up_proj,down_proj}.lora_B.weight  [out, r]
    moe_runtime_adapter.json    method, lora {rank, alpha}, base fingerprints, training config

The tuned expert is ``W + (alpha / r) * B @ A`` for each of its weights (biases unchanged), computed
in float32 and rounded once to the base dtype, the same way wherever it is merged (serving slots,
``eval``, ``export``, ``convert``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ...errors import AdapterError
from ...io import atomic_dir, atomic_write_json
from ...models import MoEModelInfo, model_fingerprint, split_expert
from ...models.fingerprint import Parts
from ...models.weights import merge_expert
from ..esft import replaced_fingerprint
from ..esft.adapter import check_selection
from ..esft.config import ExpertSelection, parse_expert_config
from ..meta import write_meta
from .trainable import weight_names

__all__ = ["METHOD", "EsftLoraAdapter", "merged_weight", "read_adapter", "write_adapter"]

METHOD = "esft-lora-merge"
WEIGHTS_FILE = "adapter.safetensors"
_KEY = re.compile(
    r"^(?P<module>.+)\.(?P<expert>\d+)\.(?P<proj>(?:gate|up|down)_proj)\.lora_(?P<ab>[AB])\.weight$"
)


def merged_weight(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """``W + scale * B @ A`` computed in float32, in ``W``'s dtype (``W [out, in]``, ``A [r, in]``, ``B [out, r]``)."""
    return (weight.float() + scale * (b.float() @ a.float())).to(weight.dtype)


@dataclass
class EsftLoraAdapter:
    """A loaded esft-lora-merge adapter (:meth:`check` matches it to a base model).

    Attributes:
        path: the directory.
        selection: its expert_cfg.json.
        tensors: its factors by key.
        meta: our metadata (rank, alpha, fingerprints).
        factors: after :meth:`check`, ``(layer, expert) -> {classic weight name: (A, B)}``.
        experts: after :meth:`merge_experts`, ``(layer, expert) -> merged classic tensors`` (what the
            serving arena takes, as from an ESFT adapter).
    """

    path: Path
    selection: ExpertSelection
    tensors: dict[str, torch.Tensor] = field(repr=False)
    meta: dict = field(repr=False)
    factors: dict[tuple[int, int], dict[str, tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    experts: dict[tuple[int, int], dict[str, torch.Tensor]] = field(default_factory=dict)
    others: dict = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return int(self.meta["lora"]["rank"])

    @property
    def scale(self) -> float:
        return float(self.meta["lora"]["alpha"]) / self.rank

    def check_selection(self, info: MoEModelInfo) -> None:
        """Model type, layers and expert ids (no weights needed).

        Raises:
            AdapterError: naming the adapter and what does not fit.
        """
        check_selection(self.path, self.meta, self.selection, info)

    def check(
        self,
        model: nn.Module,
        info: MoEModelInfo,
        *,
        base_fingerprint: str | Callable[[], str] | None = None,
        allow_base_mismatch: bool = False,
        parts: Parts | None = None,
    ) -> None:
        """Match every factor to the selected experts of ``model`` (names, shapes, finite values)
        and the base fingerprints; fills :attr:`factors`. Only the shapes of the base experts are
        needed, and their values for the fingerprint (in memory, or read through ``parts``).

        Args:
            base_fingerprint: the whole base model's fingerprint, or a function computing it.
            allow_base_mismatch: accept an adapter tuned on other base weights.
            parts: reads base experts that are not in memory (meta), by classic name.

        Raises:
            AdapterError: naming the adapter, the key and what does not fit.
        """
        where = str(self.path)
        self.check_selection(info)
        by_module = {layer.experts_name: layer for layer in info.layers}
        pairs: dict[tuple[int, int], dict[str, dict[str, torch.Tensor]]] = {}
        for key, tensor in self.tensors.items():
            match = _KEY.match(key)
            layer = match and (by_module.get(match["module"]) or by_module.get(f"model.{match['module']}"))
            if not match or layer is None:
                raise AdapterError(f"{where}: {key}: not a low-rank factor of a routed expert of this model")
            expert = int(match["expert"])
            if expert not in self.selection.experts.get(layer.index, []):
                raise AdapterError(
                    f"{where}: {key}: expert {expert} of layer {layer.index} is not in expert_cfg.json"
                )
            name = f"{match['proj']}.weight"
            pairs.setdefault((layer.index, expert), {}).setdefault(name, {})[match["ab"]] = tensor
        factors = {}
        for layer_index, ids in self.selection.experts.items():
            layer = info.by_index(layer_index)
            names = [*weight_names(layer), "down_proj.weight"]
            for expert in ids:
                got = pairs.get((layer_index, expert), {})
                base = split_expert(layer, expert)
                extra = set(got) - set(names)
                if extra:
                    raise AdapterError(
                        f"{where}: {layer.experts_name}.{expert}.{sorted(extra)[0]}: not a weight of this family's experts"
                    )
                factors[(layer_index, expert)] = {}
                for name in names:
                    prefix = f"{layer.experts_name}.{expert}.{name.removesuffix('.weight')}"
                    if set(got.get(name, {})) != {"A", "B"}:
                        raise AdapterError(
                            f"{where}: missing {prefix}.lora_A/B.weight (listed in expert_cfg.json)"
                        )
                    a, b = got[name]["A"], got[name]["B"]
                    out_dim, in_dim = base[name].shape
                    if tuple(a.shape) != (self.rank, in_dim) or tuple(b.shape) != (out_dim, self.rank):
                        raise AdapterError(
                            f"{where}: {prefix}: factors A {tuple(a.shape)}, B {tuple(b.shape)}; "
                            f"rank {self.rank} on a [{out_dim}, {in_dim}] weight needs A {(self.rank, in_dim)}, "
                            f"B {(out_dim, self.rank)}"
                        )
                    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
                        raise AdapterError(f"{where}: {prefix}: non-finite values")
                    factors[(layer_index, expert)][name] = (a, b)
        if not allow_base_mismatch:
            expected = self.meta.get("replaced_fingerprint")
            actual = replaced_fingerprint(model, info, self.selection, parts=parts)
            if expected != actual:
                raise AdapterError(
                    f"{where}: tuned on different base weights (fingerprint {expected} != base {actual})"
                )
            whole = self.meta.get("base_fingerprint")
            if whole is not None:
                base_fp = base_fingerprint() if callable(base_fingerprint) else base_fingerprint
                if whole != (base_fp or model_fingerprint(model)):
                    raise AdapterError(
                        f"{where}: tuned on different base weights (the whole model's fingerprint differs; "
                        "only the experts it updates match)"
                    )
        self.factors = factors

    def merged_expert(self, info: MoEModelInfo, layer_index: int, expert: int) -> dict[str, torch.Tensor]:
        """One selected expert with its updates, classic tensors (after :meth:`check`; that base
        expert must be in memory)."""
        tensors = split_expert(info.by_index(layer_index), expert)
        for name, (a, b) in self.factors[(layer_index, expert)].items():
            tensors[name] = merged_weight(tensors[name], a, b, self.scale)
        return tensors

    def merge_experts(self, info: MoEModelInfo) -> dict[tuple[int, int], dict[str, torch.Tensor]]:
        """Every selected expert merged (:meth:`merged_expert`); also kept in :attr:`experts`, which
        the serving arena takes as an ESFT adapter's tuned experts."""
        self.experts = {key: self.merged_expert(info, *key) for key in sorted(self.factors)}
        return self.experts

    def merge_layer(self, info: MoEModelInfo, layer_index: int) -> None:
        """Write one layer's selected experts, merged, into its fused expert weights, in place."""
        layer = info.by_index(layer_index)
        for index, expert in sorted(self.factors):
            if index == layer_index:
                merge_expert(layer, expert, self.merged_expert(info, index, expert))

    def merge_into(self, info: MoEModelInfo) -> None:
        """Write every merged expert into the model's own expert weights, in place (after :meth:`check`)."""
        for layer_index in sorted({layer for layer, _ in self.factors}):
            self.merge_layer(info, layer_index)

    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def read_adapter(path: str | Path, meta: dict | None) -> EsftLoraAdapter:
    """Read an adapter directory (its metadata already read by the registry).

    Raises:
        AdapterError: missing or unreadable files, or metadata without rank / alpha.
    """
    path = Path(path)
    if meta is None or meta.get("method") != METHOD:
        raise AdapterError(f"adapter '{path}': not an {METHOD} adapter")
    lora = meta.get("lora")
    if (
        not isinstance(lora, dict)
        or not isinstance(lora.get("rank"), int)
        or lora["rank"] <= 0
        or not isinstance(lora.get("alpha"), (int, float))
        or not lora["alpha"] > 0
    ):
        raise AdapterError(
            f"adapter '{path}': metadata needs lora.rank (a positive integer) and lora.alpha (> 0)"
        )
    cfg_file = path / "expert_cfg.json"
    try:
        selection = parse_expert_config(json.loads(cfg_file.read_text()), str(cfg_file))
    except FileNotFoundError:
        raise AdapterError(f"adapter '{path}': no expert_cfg.json") from None
    except (OSError, ValueError) as exc:
        raise AdapterError(f"{cfg_file}: unreadable ({exc})") from None
    weights = path / WEIGHTS_FILE
    try:
        tensors = load_file(weights)
    except FileNotFoundError:
        raise AdapterError(f"adapter '{path}': no {WEIGHTS_FILE}") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterError(
            f"{weights}: corrupt safetensors file ({str(exc).splitlines()[0] if str(exc) else exc})"
        ) from None
    for key, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise AdapterError(f"{weights}: {key}: dtype {tensor.dtype}, expected floating-point factors")
    return EsftLoraAdapter(path=path, selection=selection, tensors=tensors, meta=meta)


def write_adapter(
    out: str | Path,
    *,
    info: MoEModelInfo,
    selection: ExpertSelection,
    factors: dict[tuple[int, int], dict[str, tuple[torch.Tensor, torch.Tensor]]],
    rank: int,
    alpha: float,
    replaced: str,
    base_fingerprint: str | None,
    training: dict | None = None,
) -> Path:
    """Write an adapter directory atomically (an earlier adapter at ``out`` is replaced)."""
    from ..meta import META_FILE

    tensors = {}
    for (layer_index, expert), pairs in sorted(factors.items()):
        prefix = f"{info.by_index(layer_index).experts_name}.{expert}"
        for name, (a, b) in pairs.items():
            stem = f"{prefix}.{name.removesuffix('.weight')}"
            tensors[f"{stem}.lora_A.weight"] = a.detach().to("cpu").contiguous()
            tensors[f"{stem}.lora_B.weight"] = b.detach().to("cpu").contiguous()
    with atomic_dir(out, replace_marker=META_FILE) as tmp:
        atomic_write_json(tmp / "expert_cfg.json", selection.to_json())
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "method": METHOD})
        write_meta(
            tmp,
            method=METHOD,
            model_type=info.model_type,
            base_fingerprint=base_fingerprint,
            replaced_fingerprint=replaced,
            num_tuned_experts=selection.num_experts,
            lora={"rank": rank, "alpha": alpha},
            training=training or {},
        )
    return Path(out)
