"""Tuning methods by name: each ``tuning/<method>/`` folder registers one :class:`Method`.

    tuning/<method>/__init__.py  ->  register(Method(name, config, tune, read, apply, serve))
    cli tune / eval, tuning.adapters, runtime.engine  ->  get(name) / method_of(adapter dir)

A method's config is a dataclass whose fields carry their command-line flag, help text and
parser (:func:`option`); ``tune`` builds its arguments from the configs of every method, so a new
method (or routed-LoRA variant) is one new folder. Packages under ``tuning/`` are found by
:func:`load_methods`; nothing else lists them.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from torch import nn

from ..errors import AdapterError, ConfigError, UsageError
from .meta import META_FILE, read_meta

__all__ = [
    "ConfigError",
    "MergeTarget",
    "Method",
    "ServingTarget",
    "TuneJob",
    "config_options",
    "get",
    "load_methods",
    "method_of",
    "methods",
    "tunable",
    "option",
    "read_adapter_dir",
    "register",
]


def option(
    default: Any,
    help: str,
    *,
    flag: str | None = None,
    metavar: str | None = None,
    type: Callable[[str], Any] | None = None,
    choices: tuple | Callable[[], tuple] | None = None,
    parse: Callable[[Any], Any] | None = None,
) -> Any:
    """A config field that is also a ``tune`` flag.

    Args:
        default: the field's default (shown in the help when not None).
        help: the flag's help text.
        flag: the flag without ``--`` (default: the field name with dashes).
        metavar, type, choices: as argparse's (``choices`` may be a function, for registries).
        parse: turns the flag's value into the field's type at the edge (e.g. a file into a selection).
    """
    meta = {"help": help, "flag": flag, "metavar": metavar, "type": type, "choices": choices, "parse": parse}
    return dataclasses.field(default=default, metadata={"option": meta})


def config_options(config: type) -> Iterator[tuple[str, dict]]:
    """``(field name, option metadata with its flag)`` for every flag field of a config dataclass."""
    for f in dataclasses.fields(config):
        meta = f.metadata.get("option")
        if meta is not None:
            yield f.name, {**meta, "flag": meta["flag"] or f.name.replace("_", "-"), "default": f.default}


@dataclass
class TuneJob:
    """What every method's training needs besides its own config.

    Attributes:
        model: the causal LM, loaded in the training dtype.
        info: its MoE layers.
        features: the encoded training examples.
        train: optimizer and schedule settings.
        out: adapter directory to write.
        pad_id: padding token id.
        work_dir: checkpoint directory (default ``OUT.checkpoints``).
        resume: continue from the newest checkpoint in ``work_dir``.
        write: write the adapter (rank 0 under torchrun).
        progress: show a progress bar.
        log_file: where the Trainer's log rows go as JSON lines (None: nowhere).
        offload: an offload tier serving the routed experts, which ``model`` holds on the meta device
            (only for methods with ``Method.offloads``); None: every weight is in ``model``.
        base_fingerprint: the untrained base's ``model_fingerprint`` when already known (``tune``'s
            routing profile computes it); None: :meth:`base_fp` computes it once.
    """

    model: nn.Module
    info: Any
    features: list
    train: Any
    out: Path
    pad_id: int
    work_dir: Path | None = None
    resume: bool = False
    write: bool = True
    progress: bool = True
    log_file: Path | None = None
    offload: Any = None
    base_fingerprint: str | None = None

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if self.work_dir is None:
            self.work_dir = self.out.with_name(self.out.name + ".checkpoints")

    def base_fp(self) -> str:
        """The base model's fingerprint before training: given, or computed once (with an offload tier,
        its experts are read from the tier, so it equals the resident model's)."""
        if self.base_fingerprint is None:
            from ..models import model_fingerprint

            parts = self.offload.expert_parts if self.offload is not None else None
            self.base_fingerprint = model_fingerprint(self.model, parts)
        return self.base_fingerprint

    def run(self, trainable) -> dict:
        """Train ``trainable`` (a :class:`~moe_runtime.tuning.trainer.TrainableModel`); the summary."""
        from .trainer import train

        summary = train(
            trainable,
            self.features,
            self.train,
            pad_id=self.pad_id,
            work_dir=self.work_dir,
            resume=self.resume,
            progress=self.progress,
            log_file=self.log_file,
        )
        summary["trainable_params"] = trainable.trainable_parameters()
        return summary


class ServingTarget(Protocol):
    """What a serving engine offers a method's serving hook.

    Attributes:
        model: the base model (its weights are never modified).
        info: its MoE layers.
    """

    model: nn.Module
    info: Any

    def base_fingerprint(self) -> str:
        """The whole base model's fingerprint (computed once)."""

    def base_experts(self, experts: dict[int, list[int]]) -> AbstractContextManager:
        """While open, the listed base experts are readable in the experts modules (offloading)."""

    def add_experts(self, name: str, adapter: Any) -> None:
        """Serve ``name`` with tuned experts in slots (``adapter.experts``: (layer, expert) -> tensors)."""

    def add_term(self, name: str, term: Any) -> None:
        """Serve ``name`` with the base experts plus a per-token term (``term.layer(index)``)."""


class MergeTarget(Protocol):
    """What ``export`` offers a method's merge: the base model, possibly not in memory.

    Attributes:
        model: the base model; parameters not asked for may be on the meta device (not read).
        info: its MoE layers.
    """

    model: nn.Module
    info: Any

    def materialize(self, names: Iterable[str]) -> None:
        """Read these parameters (full names) from the checkpoint into ``model``, in place."""

    def release(self, names: Iterable[str]) -> None:
        """Drop these parameters from memory again (after the caller saved what it needs)."""

    def parts(self, name: str, tensor: Any) -> Iterable[Any]:
        """The contents of a tensor not in memory (a model parameter, or one routed expert's classic
        tensor ``<experts>.<e>.gate_proj.weight``), for fingerprints (``models.fingerprint.Parts``)."""

    def base_fingerprint(self) -> str:
        """The whole base model's fingerprint (what is not in memory is read piece by piece)."""


@dataclass(frozen=True)
class Method:
    """One tuning method.

    Attributes:
        name: the ``tune --method`` name.
        config: its config dataclass (fields made with :func:`option` are flags).
        tune: ``tune(job, config) -> summary`` with ``trainable_params``, ``adapter_bytes`` and
            ``what`` (a short description for the CLI's result line); writes the adapter. None for
            adapters made elsewhere (not a ``tune --method``).
        read: ``read(path, meta) -> adapter`` (meta: our metadata, read once, or None).
        apply: ``apply(model, adapter, allow_base_mismatch) -> model`` for evaluation.
        adapter_type: the class ``read`` returns (engine and ``apply`` accept such objects too).
        stored_as: the ``method`` recorded in our metadata (default ``name``).
        recognizes: for adapters without our metadata (made elsewhere): True if ``path`` is one.
        serve: the serving hook ``serve(target, name, adapter, allow_base_mismatch)``, where
            ``target`` is a :class:`ServingTarget` (the serving engine); None when the method
            changes weights every request shares (it cannot be served per request).
        config_classes: further config dataclasses whose flags this method accepts (variants).
        make_config: ``make_config(values) -> config`` from parsed flag values by field name
            (default: ``config(**values)``).
        check_model: ``check_model(config, info)``: checks that need the model, run before training.
        merge: ``merge(target, adapter, allow_base_mismatch) -> iterator of (model, changed)`` for
            ``export``: ``target`` is a :class:`MergeTarget`; the method checks the adapter, then
            materializes the parameters it changes and merges into them, in as many steps as it
            likes (e.g. one MoE layer each), yielding the model and the names merged in that step;
            the caller saves them and releases them before the next step. None when the
            adapter cannot live in the base weights (``unmergeable`` says why).
        unmergeable: why adapters of this method cannot be merged (shown when ``merge`` is None).
        offloads: ``tune`` trains with the routed experts offloaded (``TuneJob.offload``).
        trainable_bytes: ``trainable_bytes(config, info) -> int``: bytes of the parameters the method
            trains on the model ``info`` describes, in its dtype (for ``tune --plan``); None: not sized.
    """

    name: str
    config: type
    tune: Callable[[TuneJob, Any], dict] | None
    read: Callable[[Path, dict | None], Any]
    apply: Callable[[nn.Module, Any, bool], nn.Module]
    adapter_type: type | None = None
    stored_as: str | None = None
    recognizes: Callable[[Path], bool] | None = None
    serve: Callable[..., None] | None = None
    config_classes: Callable[[], list[type]] | None = None
    make_config: Callable[[dict[str, Any]], Any] | None = None
    check_model: Callable[[Any, Any], None] | None = None
    merge: Callable[[MergeTarget, Any, bool], Iterator[tuple[nn.Module, list[str]]]] | None = None
    unmergeable: str = "its weights cannot be merged into the base model"
    offloads: bool = False
    trainable_bytes: Callable[[Any, Any], int] | None = None

    @property
    def stored_name(self) -> str:
        return self.stored_as or self.name

    def all_configs(self) -> list[type]:
        """The config dataclasses whose flags this method accepts."""
        return [self.config, *(self.config_classes() if self.config_classes else [])]

    def build_config(self, values: dict[str, Any]) -> Any:
        """The validated config from parsed flag values by field name (absent: the default).

        Raises:
            ConfigError: naming the field.
        """
        config = self.make_config(values) if self.make_config is not None else self.config(**values)
        config.validate()
        return config


_METHODS: dict[str, Method] = {}
_LOADED = False


def register(method: Method) -> Method:
    """Add a method (called by each method package when imported)."""
    if method.name in _METHODS and _METHODS[method.name] is not method:
        raise ValueError(f"tuning method '{method.name}' is registered twice")
    _METHODS[method.name] = method
    return method


def load_methods() -> None:
    """Import every package under ``tuning/`` once, so each registers its method."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    from .. import tuning

    for module in pkgutil.iter_modules(tuning.__path__):
        if module.ispkg:
            importlib.import_module(f"{tuning.__name__}.{module.name}")


def methods() -> dict[str, Method]:
    """Every registered method by name, in registration order."""
    load_methods()
    return dict(_METHODS)


def tunable() -> dict[str, Method]:
    """The methods ``tune --method`` offers (those with a ``tune``), by name."""
    return {name: method for name, method in methods().items() if method.tune is not None}


def get(name: str) -> Method:
    """The method called ``name``.

    Raises:
        UsageError: no such method.
    """
    found = methods().get(name)
    if found is None:
        raise UsageError(f"no tuning method '{name}' (choose from {', '.join(methods())})")
    return found


def method_of(adapter: Any) -> Method:
    """The method of an adapter object (as returned by a method's ``read``)."""
    for method in methods().values():
        if method.adapter_type is not None and isinstance(adapter, method.adapter_type):
            return method
    raise AdapterError(f"{type(adapter).__name__} is not an adapter of any registered tuning method")


def read_adapter_dir(path: str | Path) -> tuple[Method, Any]:
    """Read an adapter directory of any method: our metadata is read once and handed to ``read``.

    Raises:
        AdapterError: not a directory, no metadata and no method recognizes it, an unknown method,
            or what the method's ``read`` refuses.
    """
    path = Path(path)
    if not path.is_dir():
        raise AdapterError(f"adapter '{path}': not a directory")
    meta = read_meta(path)
    if meta is None:
        for method in methods().values():
            if method.recognizes is not None and method.recognizes(path):
                return method, method.read(path, None)
        raise AdapterError(f"adapter '{path}': no expert_cfg.json (official ESFT layout) and no {META_FILE}")
    stored = str(meta["method"])
    for method in methods().values():
        if method.stored_name == stored:
            return method, method.read(path, meta)
    raise AdapterError(f"adapter '{path}': method '{stored}' is not supported by this version")
