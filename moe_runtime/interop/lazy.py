"""A checkpoint's model with no weights in memory until asked for (what ``export`` merges into).

    config.json --from_config on the meta device--> skeleton (no weights, no RAM)
    checkpoint keys --transformers' renamings / converters--> {model tensor name: source keys}
    materialize(names): read those source keys (pread, not memory-mapped), convert them exactly as
        from_pretrained would (per-expert tensors -> fused parameters), put them in the skeleton
    base_fingerprint(): every tensor read and hashed one at a time, then dropped

So a merge holds only the parameters it changes; the rest of the model is never in memory.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ..errors import UsageError
from ..models import MoEModelInfo, find_moe_layers, model_fingerprint
from ..models.weights import split_slices
from .tensor_files import TensorFile

__all__ = ["LazyCheckpoint", "LoadedCheckpoint", "NotStored", "open_base"]

_FINGERPRINT_SKIPPED = ("inv_freq", "original_inv_freq")


class NotStored(Exception):
    """The model holds a tensor the checkpoint files do not store (e.g. a buffer made at init)."""


def _pieces(tensor: torch.Tensor, piece_bytes: int = 8 << 20) -> list[torch.Tensor]:
    """``tensor`` in consecutive pieces along dim 0 of about ``piece_bytes`` (hashing makes copies of
    each piece, not of the whole tensor)."""
    if tensor.dim() == 0:
        return [tensor]
    row = max(1, tensor[0].numel() * tensor.element_size())
    return list(torch.split(tensor, max(1, piece_bytes // row)))


@dataclass
class _Source:
    key: str
    file: str
    pattern: str | None


@dataclass
class LazyCheckpoint:
    """A causal LM built on the meta device over its safetensors files (a registry ``MergeTarget``).

    Args:
        path: the checkpoint directory.
        files: its safetensors files.
        dtype: the parameters' dtype (None: the checkpoint's).
    """

    path: Path
    files: list[Path]
    dtype: torch.dtype | None = None
    model: nn.Module = field(init=False, repr=False)
    info: MoEModelInfo = field(init=False, repr=False)

    def __post_init__(self) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        from ..runtime.offload.store import _resolve_dtype

        config = AutoConfig.from_pretrained(self.path, local_files_only=True)
        self.dtype = _resolve_dtype(config, self.files, self.dtype)
        with torch.device("meta"):
            net = AutoModelForCausalLM.from_config(config, dtype=self.dtype)
        mapping = get_model_conversion_mapping(net)
        renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
        self._converters = [m for m in mapping if isinstance(m, WeightConverter)]
        meta_state = net.state_dict()
        self._sources: dict[str, list[_Source]] = {}
        for file in self.files:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118 - a safetensors handle, not a dict
                    renamed, pattern = rename_source_key(
                        key, renamings, self._converters, net.base_model_prefix, meta_state
                    )
                    self._sources.setdefault(renamed, []).append(_Source(key, str(file), pattern))
        # what from_pretrained records, so that the reverse conversion (saving) matches the files
        net._weight_conversions = [m for m in mapping if m.was_used()]
        self._layer: tuple[int, dict[str, torch.Tensor]] | None = None
        self._files: dict[str, TensorFile] = {}
        self.model = net.eval()
        self.info = find_moe_layers(net)

    def _tensors(self) -> dict[str, torch.Tensor]:
        return dict(list(self.model.named_parameters()) + list(self.model.named_buffers()))

    def stores_everything(self) -> bool:
        """Whether every tensor of the model (but rotary caches) can be read from the files."""
        return all(name in self._sources or name.endswith(_FINGERPRINT_SKIPPED) for name in self._tensors())

    def read(self, name: str) -> torch.Tensor:
        """One model tensor, read and converted as ``from_pretrained`` loads it.

        Raises:
            NotStored: no checkpoint tensor maps to ``name``.
        """
        from transformers.core_model_loading import WeightRenaming, dot_natural_key

        sources = self._sources.get(name)
        if not sources:
            raise NotStored(name)
        like = self._tensors()[name]
        loaded = []
        by_file: dict[str, list[_Source]] = {}
        for source in sources:
            by_file.setdefault(source.file, []).append(source)
        for file, items in by_file.items():
            stored = self._files.setdefault(file, TensorFile(file))
            loaded += [(item, stored.read(item.key)) for item in items]
        loaded.sort(key=lambda pair: dot_natural_key(pair[0].key))
        pattern = loaded[0][0].pattern
        if pattern is None:
            conversion = WeightRenaming(loaded[0][0].key, name)
        else:
            conversion = copy.deepcopy(next(c for c in self._converters if pattern in c.source_patterns))
        for item, tensor in loaded:
            conversion.add_tensor(name, item.key, item.pattern or item.key, tensor)
        loaded.clear()
        converted = conversion.convert(name, model=self.model, config=self.model.config)
        if name not in converted:
            raise NotStored(name)
        out = converted[name][0] if isinstance(converted[name], list) else converted[name]
        if tuple(out.shape) != tuple(like.shape):
            raise UsageError(
                f"model '{self.path}': {name}: the checkpoint gives shape {tuple(out.shape)}, "
                f"the model has {tuple(like.shape)}"
            )
        return out.to(like.dtype) if out.is_floating_point() else out

    def materialize(self, names: Iterable[str]) -> None:
        """Read these parameters (or buffers) into the model, in place (already read ones are kept)."""
        self._layer = None
        for name in dict.fromkeys(names):
            owner_name, _, attr = name.rpartition(".")
            owner = self.model.get_submodule(owner_name)
            current = getattr(owner, attr)
            if not current.is_meta:
                continue
            value = self.read(name)
            if isinstance(current, nn.Parameter):
                owner._parameters[attr] = nn.Parameter(value, requires_grad=False)
            else:
                owner._buffers[attr] = value

    def release(self, names: Iterable[str]) -> None:
        """Put these parameters (or buffers) back on the meta device, freeing their memory."""
        for name in dict.fromkeys(names):
            owner_name, _, attr = name.rpartition(".")
            owner = self.model.get_submodule(owner_name)
            current = getattr(owner, attr)
            empty = torch.empty_like(current, device="meta")
            if isinstance(current, nn.Parameter):
                owner._parameters[attr] = nn.Parameter(empty, requires_grad=False)
            else:
                owner._buffers[attr] = empty

    def parts(self, name: str, tensor: torch.Tensor) -> list[torch.Tensor]:
        """The base contents of a model tensor, or of one routed expert's classic tensor
        (``<experts>.<e>.gate_proj.weight``, read with its layer's experts, one layer cached at a time)."""
        for layer in self.info.layers:
            expert, _, classic = name.removeprefix(f"{layer.experts_name}.").partition(".")
            if name.startswith(f"{layer.experts_name}.") and expert.isdigit():
                if self._layer is None or self._layer[0] != layer.index:
                    self._layer = None  # the previous layer's experts are freed first
                    fused = {p: self.read(f"{layer.experts_name}.{p}") for p in layer.layout.param_names()}
                    self._layer = (layer.index, fused)
                slices = {p: t[int(expert)] for p, t in self._layer[1].items()}
                return [split_slices(layer.layout, slices)[classic]]
        return _pieces(self.read(name))

    def base_fingerprint(self) -> str:
        """The whole model's fingerprint, equal to that of the model loaded by ``from_pretrained``."""
        if not hasattr(self, "_fingerprint"):
            self._fingerprint = model_fingerprint(self.model, lambda name, tensor: _pieces(self.read(name)))
        return self._fingerprint


@dataclass
class LoadedCheckpoint:
    """A ``MergeTarget`` over a model loaded whole (checkpoints whose model holds tensors the files
    do not store, e.g. buffers computed at init)."""

    model: nn.Module
    info: MoEModelInfo = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.info = find_moe_layers(self.model)

    def materialize(self, names: Iterable[str]) -> None:
        pass

    def release(self, names: Iterable[str]) -> None:
        pass

    def parts(self, name: str, tensor: torch.Tensor) -> list[torch.Tensor]:
        raise ValueError(f"{name}: every tensor of a loaded model is in memory")

    def base_fingerprint(self) -> str:
        if not hasattr(self, "_fingerprint"):
            self._fingerprint = model_fingerprint(self.model)
        return self._fingerprint


def open_base(
    model: str | Path, files: list[Path], dtype: torch.dtype | None = None, *, load_whole: bool = False
):
    """The base model as a :class:`LazyCheckpoint` (nothing read yet), or a :class:`LoadedCheckpoint`
    when its model holds tensors the files do not store (or ``load_whole``).

    Raises:
        UsageError: the model cannot be built from its config.
    """
    from ..models import load_model, resolve_model_path

    source = resolve_model_path(model)
    try:
        lazy = LazyCheckpoint(source, files, dtype)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise UsageError(f"model '{model}': cannot build the model from its config ({first})") from None
    if lazy.stores_everything() and not load_whole:
        return lazy
    return LoadedCheckpoint(load_model(source, dtype=dtype))
