"""peft LoRA adapter directories made elsewhere (``adapter_config.json`` + ``adapter_model.safetensors``).

    adapter_config.json          peft_type LORA, r, lora_alpha, target_modules (nn.Linear) and
                                 target_parameters (fused expert parameters, dim 0 = expert),
                                 rank_pattern / alpha_pattern
    adapter_model.safetensors    base_model.model.<module>.lora_{A,B}.weight; for a parameter target
                                 <module>[.base_layer...].lora_{A,B}.weight (one nesting per further
                                 parameter of the same module)

Serving (a mixed batch, per request): LoRA on linear layers (attention projections) runs as a
per-token low-rank term for the adapter's tokens, ``scale * B (A x)`` as peft computes it; LoRA on
fused expert parameters (``target_parameters``) is folded into a copy of every expert of each
targeted layer, ``W_e + dW_e`` with peft's own ``dW``, held in arena slots of the adapter's owner
row (so such an adapter costs the memory of those layers' experts).

Such a directory has none of our metadata, so there is no base fingerprint to check: peft's own
loader checks names and shapes, and an adapter for another model class is refused. Options whose
weights do not reduce to ``W + scale * B @ A`` (DoRA, LoRA biases, bias != "none", modules_to_save,
other peft types) are refused. Dropout only acts in training and is accepted.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ...errors import AdapterError
from ...models.weights import split_slices
from ..registry import Method, register

__all__ = [
    "METHOD",
    "PEFT_CONFIG",
    "PEFT_WEIGHTS",
    "PeftLoraAdapter",
    "merge_peft",
    "merge_peft_target",
    "read_peft_config",
    "serve_peft",
]

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"


@dataclass
class PeftLoraAdapter:
    """A peft LoRA adapter directory (checked config, weights not loaded).

    Attributes:
        path: the directory.
        config: its ``adapter_config.json``.
    """

    path: Path
    config: dict = field(repr=False)
    meta: dict | None = None


def read_peft_config(path: str | Path) -> dict:
    """The ``adapter_config.json`` of a peft LoRA directory, refused if this package cannot use it.

    Raises:
        AdapterError: missing or unreadable files, another peft type, or unsupported options
            (DoRA, biases, modules_to_save), naming the file and key.
    """
    path = Path(path)
    config_file, weights = path / PEFT_CONFIG, path / PEFT_WEIGHTS
    try:
        config = json.loads(config_file.read_text())
    except FileNotFoundError:
        raise AdapterError(f"adapter '{path}': no {PEFT_CONFIG}") from None
    except (OSError, ValueError) as exc:
        raise AdapterError(f"{config_file}: unreadable ({exc})") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{config_file}: not a JSON object")
    if config.get("peft_type") != "LORA":
        raise AdapterError(
            f"{config_file}: peft_type {config.get('peft_type')!r}, only LORA adapters are supported"
        )
    refused = {
        "use_dora": "DoRA",
        "lora_bias": "LoRA biases",
        "use_qalora": "QA-LoRA",
        "layer_replication": "layer replication",
        "modules_to_save": "modules_to_save (whole trained copies)",
        "trainable_token_indices": "trainable token indices",
    }
    for key, what in refused.items():
        if config.get(key):
            raise AdapterError(f"{config_file}: {key}: {what} is not supported")
    if config.get("bias", "none") != "none":
        raise AdapterError(f'{config_file}: bias: {config["bias"]!r} is not supported (only "none")')
    if not weights.is_file():
        raise AdapterError(f"adapter '{path}': no {PEFT_WEIGHTS}")
    try:
        with safe_open(str(weights), "pt") as handle:
            keys = list(handle.keys())
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterError(
            f"{weights}: corrupt safetensors file ({str(exc).splitlines()[0] if str(exc) else exc})"
        ) from None
    if not any(".lora_A." in k or k.endswith(".lora_A.weight") for k in keys):
        raise AdapterError(f"{weights}: no lora_A weights")
    return config


def _check_model_class(adapter: PeftLoraAdapter, model: nn.Module) -> None:
    base_class = (adapter.config.get("auto_mapping") or {}).get("base_model_class")
    if base_class and base_class != type(model).__name__:
        raise AdapterError(
            f"{adapter.path / PEFT_CONFIG}: auto_mapping.base_model_class {base_class}, "
            f"the base model is {type(model).__name__}"
        )


def merge_peft(model: nn.Module, adapter: PeftLoraAdapter) -> tuple[nn.Module, list[str]]:
    """Merge a peft LoRA adapter into ``model`` with peft itself.

    Returns:
        ``(model, changed)``: the base model with ``W + scale * B @ A`` in every targeted weight,
        and the targeted parameters' names (``...q_proj.weight``, ``...experts.gate_up_proj``).

    Raises:
        AdapterError: another model class, or peft cannot load the weights into this model.
    """
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer, ParamWrapper

    _check_model_class(adapter, model)
    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter.path))
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise AdapterError(f"adapter '{adapter.path}': cannot load the LoRA weights ({first})") from None
    changed = set()
    for name, module in peft_model.base_model.model.named_modules():
        owner = name.replace(".base_layer", "")
        if isinstance(module, ParamWrapper):
            changed.add(f"{owner}.{module.parameter_name}")
        elif isinstance(module, LoraLayer):
            changed.add(f"{owner}.weight")
    merged = peft_model.merge_and_unload()
    params = dict(merged.named_parameters())
    missing = sorted(changed - set(params))
    if missing:
        raise AdapterError(
            f"adapter '{adapter.path}': merged weight {missing[0]} is not a parameter of the model"
        )
    return merged, sorted(changed)


@dataclass
class _ServedExperts:
    """Merged expert copies handed to the arena (every expert of each targeted layer)."""

    path: Path
    experts: dict[tuple[int, int], dict[str, torch.Tensor]]
    others: dict = field(default_factory=dict)


def _lora_parts(
    model: nn.Module, adapter: PeftLoraAdapter
) -> tuple[dict[str, nn.Module], dict[str, torch.Tensor]]:
    """peft loads the adapter into ``model``; we keep the linear layers' LoRA pairs and the parameter
    targets' ``dW``, then peft unloads it again (``model`` is left as it was).

    Returns:
        ``({linear module name: LowRank}, {parameter name: dW with the parameter's shape})``.
    """
    from peft import PeftModel
    from peft.tuners.lora import Linear, LoraLayer, ParamWrapper

    from ...runtime.linear_terms import LowRank

    _check_model_class(adapter, model)
    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter.path), adapter_name="served")
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise AdapterError(f"adapter '{adapter.path}': cannot load the LoRA weights ({first})") from None
    linear: dict[str, nn.Module] = {}
    deltas: dict[str, torch.Tensor] = {}
    try:
        with torch.no_grad():
            for name, module in peft_model.base_model.model.named_modules():
                owner = name.replace(".base_layer", "")
                if isinstance(module, ParamWrapper):
                    deltas[f"{owner}.{module.parameter_name}"] = (
                        module.get_delta_weight("served").detach().clone()
                    )
                elif isinstance(module, Linear):
                    linear[owner] = LowRank(
                        module.lora_A["served"].weight.detach().clone(),
                        module.lora_B["served"].weight.detach().clone(),
                        module.scaling["served"],
                    )
                elif isinstance(module, LoraLayer):
                    raise AdapterError(
                        f"adapter '{adapter.path}': {owner}: LoRA on a {type(module).__name__} layer is not supported"
                    )
    finally:
        peft_model.unload()
        if hasattr(model, "peft_config"):
            del model.peft_config
    return linear, deltas


def serve_peft(target, name: str, adapter: PeftLoraAdapter) -> None:
    """Serve a peft LoRA adapter per request (see the module docstring).

    Raises:
        AdapterError: peft cannot load it into the served model, or it puts LoRA on a parameter
            other than a routed expert weight (which every request would share).
    """
    linear, deltas = _lora_parts(target.model, adapter)
    by_module = {layer.experts_name: layer for layer in target.info.layers}
    per_layer: dict[int, dict[str, torch.Tensor]] = {}
    for full, delta in deltas.items():
        module_name, param = full.rsplit(".", 1)
        layer = by_module.get(module_name)
        if layer is None:
            raise AdapterError(
                f"adapter '{adapter.path}': {full}: LoRA on a parameter that is not a routed expert weight "
                "cannot differ per request (merge it with 'moe-runtime export' instead)"
            )
        per_layer.setdefault(layer.index, {})[param] = delta
    experts: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    layers = {index: target.info.by_index(index) for index in per_layer}
    with target.base_experts({index: list(range(layer.num_experts)) for index, layer in layers.items()}):
        for index, layer in layers.items():
            fused = {}
            for param in layer.layout.param_names():
                base = getattr(layer.experts, param).detach()
                fused[param] = base + per_layer[index][param] if param in per_layer[index] else base
            for expert in range(layer.num_experts):
                experts[(index, expert)] = split_slices(
                    layer.layout, {p: t[expert] for p, t in fused.items()}
                )
    target.add_experts(name, _ServedExperts(adapter.path, experts))
    if linear:
        target.add_linear_terms(name, linear)


def _serve(target, name: str, adapter: PeftLoraAdapter, allow_base_mismatch: bool) -> None:
    serve_peft(target, name, adapter)


def _recognizes(path: Path) -> bool:
    return (Path(path) / PEFT_CONFIG).is_file() and not (Path(path) / "expert_cfg.json").exists()


def _apply(model: nn.Module, adapter: PeftLoraAdapter, allow_base_mismatch: bool) -> nn.Module:
    return merge_peft(model, adapter)[0]


def _targeted_modules(adapter: PeftLoraAdapter, model: nn.Module) -> list[str]:
    """The modules the adapter's weights name (``...q_proj``, ``...mlp.experts``), from its keys."""
    with safe_open(str(adapter.path / PEFT_WEIGHTS), "pt") as handle:
        keys = list(handle.keys())
    modules = dict(model.named_modules())
    found = set()
    for key in keys:
        stem = key.removeprefix("base_model.model.").split(".lora_", 1)[0].replace(".base_layer", "")
        if stem in modules:
            found.add(stem)
    return sorted(found)


def merge_peft_target(target, adapter: PeftLoraAdapter) -> tuple[nn.Module, list[str]]:
    """:func:`merge_peft` into a registry ``MergeTarget``: only the targeted modules' weights are read."""
    model = target.model
    target.materialize(
        f"{name}.{param}"
        for name in _targeted_modules(adapter, model)
        for param, _ in model.get_submodule(name).named_parameters(recurse=False)
    )
    return merge_peft(model, adapter)


def _merge(
    target, adapter: PeftLoraAdapter, allow_base_mismatch: bool
) -> Iterator[tuple[nn.Module, list[str]]]:
    yield merge_peft_target(target, adapter)


@dataclass
class PeftLoraConfig:
    """Adapters of this method are made by peft; ``tune`` does not offer it (``--method lora`` does)."""

    def validate(self) -> None:
        pass


METHOD = register(
    Method(
        name="peft-lora",
        config=PeftLoraConfig,
        tune=None,
        read=lambda path, meta: PeftLoraAdapter(Path(path), read_peft_config(path), meta),
        apply=_apply,
        adapter_type=PeftLoraAdapter,
        recognizes=_recognizes,
        merge=_merge,
        serve=_serve,
    )
)
