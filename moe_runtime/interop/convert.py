"""Adapter format conversion (``moe-runtime convert``).

==================  =========================================  ===========================================
from                to                                         what changes
==================  =========================================  ===========================================
ours: lora          peft                                       our metadata file is left out; the peft
                                                               files are copied byte for byte
peft LoRA           moe-runtime (needs the base ``model``)     the files are copied; metadata added after
                                                               peft loaded the adapter into that base
ours: esft          esft-official                              our metadata file is left out; expert_cfg.json
                                                               and the per-expert safetensors are copied
official ESFT       moe-runtime (needs the base ``model``)     the files are copied; metadata (fingerprints
                                                               of the base and of the experts it replaces)
                                                               added after the adapter was checked
ours: esft-lora-    esft-official (needs the base ``model``)   one way: the selected experts with their
merge                                                          low-rank updates merged (``W + s * B @ A``),
                                                               written as whole experts
==================  =========================================  ===========================================

Our LoRA adapters are peft directories already (peft >= 0.17 naming, ``target_parameters`` for
fused experts) and our ESFT adapters are official-layout directories, so a round trip gives the
same weight and config files, byte for byte; our metadata comes back with the same fingerprints
(the training record, which the other formats have no place for, is not carried).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ..errors import AdapterError, UsageError
from ..io import atomic_dir, check_output_dir
from ..models import resolve_model_path
from ..tuning.meta import META_FILE, write_meta
from ..tuning.registry import read_adapter_dir

__all__ = ["FORMATS", "convert_adapter"]

FORMATS = ("peft", "esft-official", "moe-runtime")


def _copy_files(source: Path, out: Path, names: list[str]) -> None:
    for name in names:
        shutil.copyfile(source / name, out / name)


def _peft_files(path: Path) -> list[str]:
    """peft's files: config, weights and the model card peft writes beside them (when present)."""
    from ..tuning.peft_lora import PEFT_CONFIG, PEFT_WEIGHTS

    return [PEFT_CONFIG, PEFT_WEIGHTS, *(["README.md"] if (path / "README.md").is_file() else [])]


def _esft_files(path: Path) -> list[str]:
    return ["expert_cfg.json", *sorted(p.name for p in path.glob("*.safetensors"))]


def _peft_to_ours(adapter, model: str | Path, out: Path) -> None:
    from ..models import find_moe_layers, load_model, model_fingerprint
    from ..tuning.peft_lora import merge_peft

    net = load_model(model)
    fingerprint = model_fingerprint(net)  # of the base, before peft merges into it
    merge_peft(net, adapter)  # peft's own loader checks every name and shape against this base
    config = adapter.config
    with atomic_dir(out) as tmp:
        _copy_files(adapter.path, tmp, _peft_files(adapter.path))
        write_meta(
            tmp,
            method="lora",
            model_type=find_moe_layers(net).model_type,
            base_fingerprint=fingerprint,
            lora={
                "rank": config.get("r"),
                "alpha": config.get("lora_alpha"),
                "dropout": config.get("lora_dropout", 0.0),
            },
        )


def _official_to_ours(adapter, model: str | Path, out: Path) -> None:
    from ..models import find_moe_layers, load_model, model_fingerprint
    from ..tuning.esft import replaced_fingerprint

    net = load_model(model)
    info = find_moe_layers(net)
    adapter.check(net, info)  # official layout: names, ids and shapes (warns that there is no fingerprint)
    with atomic_dir(out) as tmp:
        _copy_files(adapter.path, tmp, _esft_files(adapter.path))
        write_meta(
            tmp,
            method="esft",
            model_type=info.model_type,
            base_fingerprint=model_fingerprint(net),
            replaced_fingerprint=replaced_fingerprint(net, info, adapter.selection, adapter.others),
            num_tuned_experts=adapter.selection.num_experts,
            training={},
        )


def _esft_lora_to_official(adapter, model: str | Path, out: Path) -> None:
    """The merged experts of an esft-lora-merge adapter as an official ESFT directory (holds one
    layer's base experts at a time)."""
    from safetensors.torch import save_file

    from ..io import atomic_write_json
    from .export import source_weights
    from .lazy import open_base

    source = resolve_model_path(model)
    target = open_base(model, [source / name for name in source_weights(source)])
    info = target.info
    adapter.check_selection(info)
    adapter.check(target.model, info, base_fingerprint=target.base_fingerprint, parts=target.parts)
    tensors = {}
    for index in sorted({layer for layer, _ in adapter.factors}):  # one layer's experts in memory at a time
        layer = info.by_index(index)
        names = [f"{layer.experts_name}.{name}" for name in layer.layout.param_names()]
        target.materialize(names)
        for layer_index, expert in sorted(adapter.factors):
            if layer_index == index:
                for name, tensor in adapter.merged_expert(info, index, expert).items():
                    tensors[f"{layer.experts_name}.{expert}.{name}"] = tensor.contiguous()
        target.release(names)
    with atomic_dir(out) as tmp:
        atomic_write_json(tmp / "expert_cfg.json", adapter.selection.to_json())
        save_file(tensors, str(tmp / "adapter.safetensors"), metadata={"format": "pt", "method": "esft"})


def convert_adapter(adapter: str | Path, to: str, out: str | Path, *, model: str | Path | None = None) -> str:
    """Convert an adapter directory to another format.

    Args:
        adapter: the adapter directory.
        to: one of :data:`FORMATS`.
        out: directory to create (absent or empty).
        model: the base model; needed to convert into ``moe-runtime`` (its fingerprint is recorded).

    Returns:
        The source format's name (``lora``, ``peft``, ``esft``, ``esft-official``, ``esft-lora-merge``).

    Raises:
        UsageError / AdapterError: an unknown target, an adapter that has no such format (routed
            LoRA, full, LoRA to ESFT ...), an adapter already in the target format, a corrupt or
            mismatched adapter, or an unusable ``out``; nothing is written then.
    """
    if to not in FORMATS:
        raise UsageError(f"format '{to}': choose from {', '.join(FORMATS)}")
    out = check_output_dir(out)
    method, loaded = read_adapter_dir(adapter)
    ours = getattr(loaded, "meta", None) is not None
    kind = {
        "lora": "lora",
        "peft-lora": "peft",
        "esft": "esft" if ours else "esft-official",
        "esft-lora-merge": "esft-lora-merge",
    }.get(method.name)
    if kind is None:
        raise AdapterError(
            f"adapter '{adapter}': a {method.stored_name} adapter has no {to} format (only LoRA and ESFT adapters convert)"
        )
    if kind == "esft-lora-merge":
        if to != "esft-official":
            raise AdapterError(
                f"adapter '{adapter}': an esft-lora-merge adapter converts only to esft-official (its merged experts)"
            )
        if model is None:
            raise UsageError(
                "--to esft-official: an esft-lora-merge adapter needs --model, the base its factors update"
            )
        _esft_lora_to_official(loaded, model, out)
        return kind
    lora_like = kind in ("lora", "peft")
    if to == "esft-official" and lora_like or to == "peft" and not lora_like:
        raise AdapterError(
            f"adapter '{adapter}': a {'LoRA' if lora_like else 'ESFT'} adapter has no {to} format"
        )
    if (kind, to) in (
        ("lora", "moe-runtime"),
        ("esft", "moe-runtime"),
        ("peft", "peft"),
        ("esft-official", "esft-official"),
    ):
        raise AdapterError(f"adapter '{adapter}': already in the {to} format")
    if to == "moe-runtime" and model is None:
        raise UsageError(f"--to moe-runtime: needs --model, the base model the {kind} adapter was made for")
    path = Path(adapter)
    if kind == "lora":
        from ..tuning.peft_lora import read_peft_config

        read_peft_config(path)  # refuses a corrupt or unsupported peft part
    if to == "moe-runtime":
        (_peft_to_ours if kind == "peft" else _official_to_ours)(loaded, model, out)
    else:
        files = _peft_files(path) if lora_like else _esft_files(path)
        missing = [name for name in files if not (path / name).is_file()]
        if missing:
            raise AdapterError(f"adapter '{adapter}': no {missing[0]}")
        with atomic_dir(out) as tmp:
            _copy_files(path, tmp, [name for name in files if name != META_FILE])
    return kind
