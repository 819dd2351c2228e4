"""peft LoRA adapter directories made elsewhere (``adapter_config.json`` + ``adapter_model.safetensors``).

    adapter_config.json          peft_type LORA, r, lora_alpha, target_modules (nn.Linear) and
                                 target_parameters (fused expert parameters, dim 0 = expert),
                                 rank_pattern / alpha_pattern
    adapter_model.safetensors    base_model.model.<module>.lora_{A,B}.weight; for a parameter target
                                 <module>[.base_layer...].lora_{A,B}.weight (one nesting per further
                                 parameter of the same module)

Such a directory has none of our metadata, so there is no base fingerprint to check: peft's own
loader checks names and shapes, and an adapter for another model class is refused. Options whose
weights do not reduce to ``W + scale * B @ A`` (DoRA, LoRA biases, bias != "none", modules_to_save,
other peft types) are refused. Dropout only acts in training and is accepted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from safetensors import SafetensorError, safe_open
from torch import nn

from ...errors import AdapterError
from ..registry import Method, register

__all__ = ["METHOD", "PEFT_CONFIG", "PEFT_WEIGHTS", "PeftLoraAdapter", "merge_peft", "read_peft_config"]

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


def _recognizes(path: Path) -> bool:
    return (Path(path) / PEFT_CONFIG).is_file() and not (Path(path) / "expert_cfg.json").exists()


def _apply(model: nn.Module, adapter: PeftLoraAdapter, allow_base_mismatch: bool) -> nn.Module:
    return merge_peft(model, adapter)[0]


def _merge(
    model: nn.Module, adapter: PeftLoraAdapter, allow_base_mismatch: bool
) -> tuple[nn.Module, list[str]]:
    return merge_peft(model, adapter)


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
    )
)
