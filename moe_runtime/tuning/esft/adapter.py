"""ESFT adapters on disk, in the official layout, and their checks against a base model.

An adapter directory holds::

    expert_cfg.json                 {"experts": {"<layer>": [ids]}, "shared_experts": ..., "non_expert_modules": ...}
    *.safetensors                   tuned weights only, keyed per expert
                                    model.layers.<l>.mlp.experts.<e>.{gate_proj,up_proj,down_proj}.weight
                                    (+ shared-expert / non-expert weights by their model names when flagged)
    moe_runtime_adapter.json        ours: method, base fingerprints, training config (absent in adapters
                                    made elsewhere; then the fingerprint check is skipped)

Keys may also omit the leading ``model.`` (the official loader applies the state dict to ``model.model``).
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ...errors import AdapterError, AdapterWarning
from ...io import atomic_dir, atomic_write_json
from ...models import MoEModelInfo, fingerprint_tensors, model_fingerprint, split_expert
from ...models.fingerprint import Parts
from ...models.weights import expert_tensor_names, merge_expert
from ..meta import META_FILE, read_meta, write_meta
from .config import ExpertSelection, parse_expert_config

__all__ = [
    "ESFTAdapter",
    "read_adapter",
    "write_adapter",
    "replaced_fingerprint",
    "META_FILE",
    "WEIGHTS_FILE",
]

WEIGHTS_FILE = "adapter.safetensors"
_EXPERT_KEY = re.compile(
    r"^(?P<module>.+)\.(?P<expert>\d+)\.(?P<tensor>(?:gate|up|down)_proj\.(?:weight|bias))$"
)


def check_selection(path: Path, meta: dict | None, selection: ExpertSelection, info: MoEModelInfo) -> None:
    """An expert adapter's model type (from ``meta``) and its ``expert_cfg.json`` against ``info``.

    Raises:
        AdapterError: naming ``path`` and what does not fit.
    """
    tuned_on = (meta or {}).get("model_type")
    if tuned_on and tuned_on != info.model_type:  # equal expert weights do not make it the same model
        raise AdapterError(f"{path}: tuned on model type '{tuned_on}', the base model is '{info.model_type}'")
    selection.validate(info, f"{path}/expert_cfg.json", AdapterError)


@dataclass
class ESFTAdapter:
    """A loaded (not yet checked) ESFT adapter.

    Attributes:
        path: the directory.
        selection: its expert_cfg.json.
        tensors: every tensor of its safetensors files, by key.
        meta: our metadata, or None for adapters made elsewhere.
    """

    path: Path
    selection: ExpertSelection
    tensors: dict[str, torch.Tensor]
    meta: dict | None = None
    experts: dict[tuple[int, int], dict[str, torch.Tensor]] = field(default_factory=dict)
    others: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.name

    def check_selection(self, info: MoEModelInfo) -> None:
        """The part of :meth:`check` that needs no weights: model type, layers and expert ids.

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
        """Match every tensor to the base model: names, shapes, expert ids, base fingerprint.

        An adapter with our metadata records the whole base model's fingerprint and is refused on
        any other base (unless ``allow_base_mismatch``). An adapter in the official layout has no
        fingerprint: only its replaced experts are checked (names, shapes), with a warning.

        Fills ``experts`` ((layer, expert) -> classic tensors) and ``others`` (model param name -> tensor).

        Args:
            base_fingerprint: ``model_fingerprint(model)``, or a function computing it, if the
                caller caches it (computed here otherwise).
            allow_base_mismatch: accept an adapter tuned on other base weights.
            parts: reads base experts that are not in memory (meta), for the fingerprint of the
                experts it replaces (only shapes are needed otherwise).

        Raises:
            AdapterError: naming the adapter, the key and what does not fit.
        """
        where = str(self.path)
        self.check_selection(info)
        params = dict(model.named_parameters())
        by_module = {layer.experts_name: layer for layer in info.layers}
        shared_prefixes = tuple(f"{name}." for layer in info.layers for name in layer.shared_names)
        experts: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        others: dict[str, torch.Tensor] = {}
        for key, tensor in self.tensors.items():
            match = _EXPERT_KEY.match(key)
            module = match and (by_module.get(match["module"]) or by_module.get(f"model.{match['module']}"))
            if match and module is not None:
                expert = int(match["expert"])
                if expert not in self.selection.experts.get(module.index, []):
                    raise AdapterError(
                        f"{where}: {key}: expert {expert} of layer {module.index} is not in expert_cfg.json"
                    )
                experts.setdefault((module.index, expert), {})[match["tensor"]] = tensor
                continue
            name = key if key in params else f"model.{key}" if f"model.{key}" in params else None
            if name is None:
                raise AdapterError(f"{where}: {key}: no such weight in the base model")
            is_shared = name.startswith(shared_prefixes)
            if is_shared and not self.selection.shared_experts:
                raise AdapterError(
                    f"{where}: {key}: shared-expert weight but expert_cfg.json has shared_experts=false"
                )
            if not is_shared and not self.selection.non_expert_modules:
                raise AdapterError(
                    f"{where}: {key}: non-expert weight but expert_cfg.json has non_expert_modules=false"
                )
            if tuple(tensor.shape) != tuple(params[name].shape):
                raise AdapterError(
                    f"{where}: {key}: shape {tuple(tensor.shape)}, base has {tuple(params[name].shape)}"
                )
            others[name] = tensor
        for layer_index, ids in self.selection.experts.items():
            layer = info.by_index(layer_index)
            for expert in ids:
                got = experts.get((layer_index, expert), {})
                reference = split_expert(layer, expert)
                for tensor_name in expert_tensor_names(layer.layout):
                    if tensor_name not in got:
                        raise AdapterError(
                            f"{where}: missing {layer.experts_name}.{expert}.{tensor_name} (listed in expert_cfg.json)"
                        )
                    if tuple(got[tensor_name].shape) != tuple(reference[tensor_name].shape):
                        raise AdapterError(
                            f"{where}: {layer.experts_name}.{expert}.{tensor_name}: shape {tuple(got[tensor_name].shape)}, "
                            f"base expert has {tuple(reference[tensor_name].shape)}"
                        )
                    if not torch.isfinite(got[tensor_name]).all():
                        raise AdapterError(
                            f"{where}: {layer.experts_name}.{expert}.{tensor_name}: non-finite values"
                        )
                extra = set(got) - set(reference)
                if extra:
                    raise AdapterError(
                        f"{where}: {layer.experts_name}.{expert}.{sorted(extra)[0]}: not a tensor of this family's experts"
                    )
        if self.meta is None:
            warnings.warn(
                f"adapter '{where}' has no base fingerprint (official ESFT layout): only its replaced "
                "experts are checked against this base model, the rest is unchecked",
                AdapterWarning,
                stacklevel=2,
            )
        elif not allow_base_mismatch:
            expected = self.meta.get("replaced_fingerprint")
            actual = replaced_fingerprint(model, info, self.selection, others, parts=parts)
            if expected != actual:
                raise AdapterError(
                    f"{where}: tuned on different base weights (fingerprint {expected} != base {actual})"
                )
            whole = self.meta.get("base_fingerprint")
            if whole is not None:
                base = base_fingerprint() if callable(base_fingerprint) else base_fingerprint
                if whole != (base or model_fingerprint(model)):
                    raise AdapterError(
                        f"{where}: tuned on different base weights (the whole model's fingerprint differs; "
                        "only the experts it replaces match)"
                    )
        self.experts, self.others = experts, others

    def merge_into(self, model: nn.Module, info: MoEModelInfo) -> None:
        """Write the tuned weights into the base model in place (after :meth:`check`)."""
        for (layer_index, expert), tensors in self.experts.items():
            merge_expert(info.by_index(layer_index), expert, tensors)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, tensor in self.others.items():
                params[name].copy_(tensor.to(params[name].dtype))

    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def replaced_fingerprint(
    model: nn.Module,
    info: MoEModelInfo,
    selection: ExpertSelection,
    other_names: dict | list | None = None,
    *,
    parts: Parts | None = None,
) -> str:
    """Fingerprint of exactly the base weights an adapter replaces (selected experts + other params);
    ``parts`` reads experts that are not in memory, by their classic name (``<experts>.<e>.<tensor>``)."""
    named = []
    for layer_index, ids in selection.experts.items():
        layer = info.by_index(layer_index)
        for expert in ids:
            named += [
                (f"{layer.experts_name}.{expert}.{n}", t) for n, t in split_expert(layer, expert).items()
            ]
    params = dict(model.named_parameters())
    named += [(name, params[name]) for name in sorted(other_names or [])]
    return fingerprint_tensors(named, parts)


_UNREAD = object()


def read_adapter(path: str | Path, meta: dict | None | object = _UNREAD) -> ESFTAdapter:
    """Read an adapter directory (ours or the official layout).

    Args:
        path: the directory.
        meta: its metadata if the caller already read it (None: it has none).

    Raises:
        AdapterError: missing directory, config or weights; unreadable or corrupt files.
    """
    path = Path(path)
    if not path.is_dir():
        raise AdapterError(f"adapter '{path}': not a directory")
    cfg_file = path / "expert_cfg.json"
    try:
        selection = parse_expert_config(json.loads(cfg_file.read_text()), str(cfg_file))
    except FileNotFoundError:
        raise AdapterError(f"adapter '{path}': no expert_cfg.json") from None
    except (OSError, ValueError) as exc:
        raise AdapterError(f"{cfg_file}: unreadable ({exc})") from None
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise AdapterError(f"adapter '{path}': no .safetensors weights")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            loaded = load_file(file)
        except (SafetensorError, OSError, ValueError) as exc:
            raise AdapterError(
                f"{file}: corrupt safetensors file ({str(exc).splitlines()[0] if str(exc) else exc})"
            ) from None
        for key, tensor in loaded.items():
            if key in tensors:
                raise AdapterError(f"{file}: {key} also appears in another weights file")
            if not tensor.is_floating_point():
                raise AdapterError(f"{file}: {key}: dtype {tensor.dtype}, expected floating-point weights")
        tensors.update(loaded)
    meta = read_meta(path) if meta is _UNREAD else meta
    return ESFTAdapter(path=path, selection=selection, tensors=tensors, meta=meta)


def write_adapter(
    out: str | Path,
    *,
    info: MoEModelInfo,
    selection: ExpertSelection,
    tuned: dict[tuple[int, int], dict[str, torch.Tensor]],
    others: dict[str, torch.Tensor] | None = None,
    replaced: str,
    base_fingerprint: str | None = None,
    training: dict | None = None,
) -> Path:
    """Write an ESFT adapter directory atomically.

    Args:
        out: directory to create (an earlier adapter there is replaced).
        info: the base model's MoE layers (for module names).
        selection: the trained experts.
        tuned: (layer, expert) -> classic tensors after training.
        others: tuned shared-expert / non-expert weights by model parameter name.
        replaced: :func:`replaced_fingerprint` of the base weights, taken before training.
        base_fingerprint: fingerprint of the whole base model.
        training: the training configuration to record.
    """
    tensors: dict[str, torch.Tensor] = {}
    for (layer_index, expert), classic in sorted(tuned.items()):
        prefix = f"{info.by_index(layer_index).experts_name}.{expert}"
        for name, tensor in classic.items():
            tensors[f"{prefix}.{name}"] = tensor.detach().to("cpu").contiguous()
    for name, tensor in sorted((others or {}).items()):
        tensors[name] = tensor.detach().to("cpu").contiguous()
    with atomic_dir(out, replace_marker=META_FILE) as tmp:
        atomic_write_json(tmp / "expert_cfg.json", selection.to_json())
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "method": "esft"})
        write_meta(
            tmp,
            method="esft",
            model_type=info.model_type,
            base_fingerprint=base_fingerprint,
            replaced_fingerprint=replaced,
            num_tuned_experts=selection.num_experts,
            training=training or {},
        )
    return Path(out)
