"""Routed-LoRA adapters on disk, and their checks against a base model.

An adapter directory holds only the LoRA and router weights::

    adapter.safetensors          <experts module>.routed_lora.lora_A   [N, r, H]
                                 <experts module>.routed_lora.lora_B   [N, H, r]
                                 <experts module>.routed_lora.router   [N, H]      (perft-r)
    moe_runtime_adapter.json     method "routed_lora", variant, rank, alpha, top_k, per-layer plan
                                 {"<layer>": {"num_lora": N, "experts": [ids] (perft-e, esft-lora)}},
                                 fingerprint of the whole base model, training config

The LoRA term depends on every base weight before it, so the check is against the whole base
model's fingerprint.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ...errors import AdapterError
from ...models import MoEModelInfo, model_fingerprint
from ..meta import META_FILE, read_meta, save_adapter_dir
from .config import VARIANTS, LayerPlan, RoutedLoraSettings, known_variant
from .model import RoutedLora

__all__ = ["METHOD", "WEIGHTS_FILE", "RoutedLoraAdapter", "read_routed_lora", "write_routed_lora"]

METHOD = "routed_lora"
WEIGHTS_FILE = "adapter.safetensors"


def write_routed_lora(
    out: str | Path,
    lora: RoutedLora,
    *,
    base_fingerprint: str,
    training: dict | None = None,
) -> Path:
    """Write the adapter directory atomically (weights, then metadata)."""
    settings = lora.settings

    def save(tmp: Path) -> None:
        save_file(lora.tensors(), str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "method": METHOD})

    return save_adapter_dir(
        Path(out),
        save,
        method=METHOD,
        model_type=lora.info.model_type,
        base_fingerprint=base_fingerprint,
        routed_lora={**settings.to_json(), "layers": lora.layer_json(), "layer_spec": settings.layers},
        training=training or {},
    )


@dataclass
class RoutedLoraAdapter:
    """A loaded (not yet checked) routed-LoRA adapter.

    Attributes:
        path: the directory.
        meta: our metadata.
        tensors: the weights file's tensors by key.
    """

    path: Path
    meta: dict
    tensors: dict[str, torch.Tensor] = field(repr=False)

    @property
    def name(self) -> str:
        return self.path.name

    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def _settings_and_plans(self, info: MoEModelInfo) -> tuple[RoutedLoraSettings, list[LayerPlan]]:
        where = f"{self.path}/{META_FILE}"
        cfg = self.meta.get("routed_lora")
        if not isinstance(cfg, dict) or not isinstance(cfg.get("layers"), dict):
            raise AdapterError(f"{where}: no 'routed_lora' section with 'layers'")
        variant = cfg.get("variant")
        if not known_variant(variant):
            raise AdapterError(
                f"{where}: routed_lora.variant {variant!r} is not one of {', '.join(VARIANTS)}"
            )
        spec = VARIANTS[variant]
        try:
            settings = RoutedLoraSettings(
                variant=variant,
                rank=int(cfg["rank"]),
                alpha=float(cfg["alpha"]),
                top_k=int(cfg["top_k"]) if spec.uses_top_k else None,
                aux_loss_coef=float(cfg.get("aux_loss_coef", 0.01)),
            )
            if spec.options is not None:
                settings.options = spec.options.from_json(cfg.get("options") or {})
        except (KeyError, TypeError, ValueError) as exc:
            raise AdapterError(f"{where}: routed_lora: missing or bad field ({exc})") from None
        if (
            settings.rank <= 0
            or not settings.alpha > 0
            or (settings.top_k is not None and settings.top_k <= 0)
        ):
            raise AdapterError(f"{where}: routed_lora: rank, alpha and top_k must be positive")
        plans = []
        for key, row in sorted(cfg["layers"].items(), key=lambda item: str(item[0])):
            try:
                layer = info.by_index(int(key))
                num = int(row["num_lora"])
                ids = tuple(int(e) for e in row.get("experts", []))
            except KeyError:
                raise AdapterError(
                    f"{where}: layer {key} is not an MoE layer of this model (MoE layers: {info.layer_indices})"
                ) from None
            except (TypeError, ValueError, AttributeError):
                raise AdapterError(
                    f"{where}: layer {key}: expected {{'num_lora': N, 'experts': [ids]}}"
                ) from None
            if num <= 0:
                raise AdapterError(f"{where}: layer {key}: num_lora must be positive")
            if settings.kind == "expert":
                bad = [e for e in ids if not 0 <= e < layer.num_experts]
                if bad:
                    raise AdapterError(
                        f"{where}: layer {key}: expert id {bad[0]} out of range [0, {layer.num_experts})"
                    )
                if len(ids) != num or len(set(ids)) != num:
                    raise AdapterError(f"{where}: layer {key}: needs {num} distinct expert ids")
            if settings.kind == "routed" and settings.top_k > num:
                raise AdapterError(f"{where}: layer {key}: top_k {settings.top_k} exceeds num_lora {num}")
            plans.append(LayerPlan(layer.index, num, tuple(sorted(ids))))
        if not plans:
            raise AdapterError(f"{where}: no layers")
        return settings, sorted(plans, key=lambda p: p.layer)

    def build(
        self,
        model: nn.Module,
        info: MoEModelInfo,
        *,
        base_fingerprint: str | None = None,
        allow_base_mismatch: bool = False,
    ) -> RoutedLora:
        """Check the adapter against ``model`` and return its modules, in the model's dtype and device.

        Args:
            model: the base model.
            info: its MoE layers.
            base_fingerprint: ``model_fingerprint(model)`` if already known.
            allow_base_mismatch: accept an adapter tuned on other base weights.

        Raises:
            AdapterError: other base weights, a layer or expert id the model lacks, a missing,
                unexpected, mis-shaped or non-finite tensor; naming the file and key.
        """
        if not allow_base_mismatch:
            expected = self.meta.get("base_fingerprint")
            if expected != (base_fingerprint or model_fingerprint(model)):
                raise AdapterError(
                    f"adapter '{self.path}': tuned from different base weights than this model"
                )
        settings, plans = self._settings_and_plans(info)
        param = next(model.parameters())
        lora = RoutedLora(info, settings, plans, dtype=param.dtype, device=param.device, seed=None)
        where = self.path / WEIGHTS_FILE
        shapes = lora.expected_shapes()
        for key, shape in shapes.items():
            if key not in self.tensors:
                raise AdapterError(f"{where}: missing {key}")
            tensor = self.tensors[key]
            if tuple(tensor.shape) != shape:
                raise AdapterError(f"{where}: {key}: shape {tuple(tensor.shape)}, expected {shape}")
            if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
                raise AdapterError(f"{where}: {key}: not finite floating-point values")
        extra = sorted(set(self.tensors) - set(shapes))
        if extra:
            raise AdapterError(f"{where}: {extra[0]}: not a tensor of this adapter's plan")
        lora.load_tensors(self.tensors)
        return lora.requires_grad_(False).eval()


_UNREAD = object()


def read_routed_lora(path: str | Path, meta: dict | None | object = _UNREAD) -> RoutedLoraAdapter:
    """Read a routed-LoRA adapter directory (``meta``: its metadata, if the caller read it already).

    Raises:
        AdapterError: not a directory, no or other-method metadata, a missing or corrupt weights file.
    """
    path = Path(path)
    if not path.is_dir():
        raise AdapterError(f"adapter '{path}': not a directory")
    meta = read_meta(path) if meta is _UNREAD else meta
    if meta is None or meta.get("method") != METHOD:
        raise AdapterError(
            f"adapter '{path}': not a routed-LoRA adapter (no {META_FILE} with method {METHOD})"
        )
    file = path / WEIGHTS_FILE
    try:
        tensors = load_file(file)
    except FileNotFoundError:
        raise AdapterError(f"adapter '{path}': no {WEIGHTS_FILE}") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterError(
            f"{file}: corrupt safetensors file ({str(exc).splitlines()[0] if str(exc) else exc})"
        ) from None
    for key, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise AdapterError(f"{file}: {key}: dtype {tensor.dtype}, expected floating-point weights")
    return RoutedLoraAdapter(path=path, meta=meta, tensors=tensors)
