"""Resolve a ``MODEL`` argument and load model and tokenizer from a local directory.

``MODEL`` is a local Hugging Face checkpoint directory or ``demo`` (the embedded default model).
Nothing is ever downloaded: every load passes ``local_files_only=True``.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from ..errors import UsageError

__all__ = [
    "COMPUTE_DTYPES",
    "compute_dtype",
    "resolve_model_path",
    "load_model",
    "load_tokenizer",
    "pad_token_id",
    "DEMO",
]

DEMO = "demo"
COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16")


def compute_dtype(
    choice: torch.dtype | str | None, device: torch.device, stored: torch.dtype | None = None
) -> torch.dtype | None:
    """The dtype to compute in (None: the checkpoint's own).

    ``"auto"`` on a CPU widens 16-bit checkpoints (``stored``) to float32: without bf16/fp16 matrix
    instructions a 16-bit matmul is many times slower (more than 10x measured on AVX2), and float32
    costs twice the RAM of the weights held resident. On a GPU, and for 32/64-bit checkpoints,
    ``"auto"`` keeps the checkpoint's dtype. A name or a dtype is taken as is.

    Raises:
        UsageError: an unknown name.
    """
    if choice is None or isinstance(choice, torch.dtype):
        return choice
    if choice == "auto":
        narrow = stored in (torch.bfloat16, torch.float16)
        return torch.float32 if device.type == "cpu" and narrow else None
    value = getattr(torch, str(choice), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise UsageError(f"compute dtype '{choice}': choose from {', '.join(COMPUTE_DTYPES)}")
    return value


def stored_dtype(model: str | Path) -> torch.dtype | None:
    """The checkpoint's dtype from its config.json (``dtype`` / ``torch_dtype``), else its first
    floating tensor's; None if neither says."""
    path = resolve_model_path(model)
    config = json.loads((path / "config.json").read_text())
    for key in ("dtype", "torch_dtype"):
        value = getattr(torch, str(config.get(key)), None)
        if isinstance(value, torch.dtype):
            return value
    from .checkpoint_files import read_header, safetensors_files

    names = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    try:
        files = safetensors_files(path)
    except UsageError:
        return None
    for entry in read_header(files[0]).tensors.values():
        if entry.get("dtype") in names:
            return names[entry["dtype"]]
    return None


def resolve_model_path(model: str | Path) -> Path:
    """Path of the checkpoint directory named by ``model`` (``demo`` or a directory).

    Raises:
        UsageError: not a directory, or no readable ``config.json`` in it.
    """
    if str(model) == DEMO:
        from ..demo.export import checkpoint_dir

        return checkpoint_dir()
    path = Path(model).expanduser()
    if not path.is_dir():
        raise UsageError(f"model '{model}': not a directory (give a local checkpoint directory or 'demo')")
    config = path / "config.json"
    try:
        json.loads(config.read_text())
    except FileNotFoundError:
        raise UsageError(f"model '{model}': no config.json in the directory") from None
    except (OSError, ValueError) as exc:
        raise UsageError(
            f"model '{model}': unreadable config.json ({exc.__class__.__name__}: {exc})"
        ) from None
    return path


def load_model(model: str | Path, *, dtype: torch.dtype | str | None = None, **kwargs) -> nn.Module:
    """Load a causal LM from a local directory (or ``demo``), in eval mode.

    Args:
        model: directory or ``demo``.
        dtype: parameter dtype; default keeps the checkpoint's dtype.
        **kwargs: forwarded to ``AutoModelForCausalLM.from_pretrained``.

    Raises:
        UsageError: the directory does not hold a loadable model.
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(model)
    if any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").exists():
        from .checkpoint_files import check_shards

        check_shards(path)  # a missing or truncated shard: one line naming it
    try:
        with _read_once(cpu="device_map" not in kwargs):
            loaded = AutoModelForCausalLM.from_pretrained(
                path, local_files_only=True, dtype=dtype or "auto", **kwargs
            )
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise UsageError(f"model '{model}': cannot load ({first})") from None
    return loaded.eval()


_LOADING = threading.Lock()  # _read_once patches transformers process-wide: one load at a time


@contextlib.contextmanager
def _read_once(cpu: bool) -> Iterator[None]:
    """Load safetensors weights so that the process never holds them twice (a CPU load).

    transformers memory-maps each shard and reads tensors ahead on 4 threads: every page read stays in
    the process's resident set as long as the map is open (the fused expert parameters are new memory
    beside it), and the read-ahead holds per-expert tensors of many layers before they are fused. The
    load peaked at about 2.1x the weights. Here tensors are read with ``pread`` into fresh memory, one
    parameter group at a time (each group converted, e.g. experts stacked into ``[E, ...]``, before
    the next is read), and freed heap pages go back to the system afterwards: about 1.0x, plus one
    layer's experts while they are fused.
    """
    if not cpu:
        yield
        return
    with _LOADING:
        yield from _read_once_locked()


def _read_once_locked() -> Iterator[None]:
    import transformers.modeling_utils as modeling_utils

    opener = modeling_utils.safe_open

    def pread_open(file, framework="pt", device="cpu", backend=None, **kw):
        if str(device) == "cpu" and backend in (None, "mmap"):
            backend = "pread"
        return opener(file, framework=framework, device=device, backend=backend, **kw)

    from transformers.core_model_loading import WeightConverter

    convert = WeightConverter.convert

    def fused_convert(self, layer_name, **kw):
        into = _stack_into(self)
        if into is None:
            return convert(self, layer_name, **kw)
        # wrapped, the checkpoint tensors stay unread (transformers reads callables, passes the rest
        # as they are) until ``into`` writes each into its slot
        for key, items in self.collected_tensors.items():
            self.collected_tensors[key] = [_Unread(item) for item in items]
        operations, self.operations = self.operations, [into]
        try:
            return convert(self, layer_name, **kw)
        finally:
            self.operations = operations

    saved = os.environ.get("HF_DEACTIVATE_ASYNC_LOAD")
    os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = "1"
    modeling_utils.safe_open = pread_open
    WeightConverter.convert = fused_convert
    threads = torch.get_num_threads()
    # the load is copies, bound by memory: a second OpenMP thread does not speed them up, and on a
    # busy 2-core machine it slowed a 4 MB copy_ into fresh memory 8x (barrier spinning)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        WeightConverter.convert = convert
        modeling_utils.safe_open = opener
        if saved is None:
            os.environ.pop("HF_DEACTIVATE_ASYNC_LOAD", None)
        else:
            os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = saved
        _trim_heap()


def _stack_into(converter):
    """An op that reads a converter's per-expert tensors straight into the fused ``[E, ...]`` tensor.

    Only for the chains ``MergeModulelist(dim=0)`` (one source: stack the experts) and
    ``MergeModulelist(dim=0), Concatenate(dim>=1)`` (e.g. gate and up, each stacked, joined along
    the output dim), unquantized and loaded synchronously: the same values as ``torch.stack`` then
    ``torch.cat``, written once, with one expert's tensor in flight instead of a layer's three
    copies. None for anything else (transformers' own ops run).
    """
    from transformers.core_model_loading import Concatenate, ConversionOps, MergeModulelist

    ops = converter.operations
    if getattr(converter, "quantization_operation", None) is not None or not ops:
        return None
    if type(ops[0]) is not MergeModulelist or ops[0].dim != 0:
        return None
    if len(ops) == 1:
        join = None
        if len(converter.source_patterns) != 1:
            return None
    elif len(ops) == 2 and type(ops[1]) is Concatenate and ops[1].dim >= 1:
        join = ops[1]
    else:
        return None
    pending = converter.collected_tensors
    if not pending or not all(
        items and all(callable(item) and not isinstance(item, torch.Tensor) for item in items)
        for items in pending.values()
    ):
        return None

    class StackInto(ConversionOps):
        @torch.no_grad()
        def convert(self, input_dict, source_patterns, target_patterns, **kwargs):
            target = target_patterns[0] if join is None else join.get_target_pattern(target_patterns)
            order = [pattern for pattern in source_patterns if pattern in input_dict]
            # each pattern's first expert, read first: the fused shape and dtype, as stack + cat make them
            firsts = {pattern: input_dict[pattern][0].read() for pattern in order}
            head = firsts[order[0]]
            shape = [len(input_dict[order[0]]), *head.shape]
            if join is not None:
                shape[join.dim] = sum(first.shape[join.dim - 1] for first in firsts.values())
            dtype = head.dtype
            for first in firsts.values():
                dtype = torch.promote_types(dtype, first.dtype)
            out = torch.empty(shape, dtype=dtype, device=head.device)
            del head
            offset = 0
            for pattern in order:
                loaders = input_dict.pop(pattern)
                size = firsts[pattern].shape[join.dim - 1] if join is not None else 0
                into = out if join is None else out.narrow(join.dim, offset, size)
                for expert, load in enumerate(loaders):
                    tensor = firsts.pop(pattern) if expert == 0 else load.read()
                    into[expert].copy_(tensor)
                    del tensor
                offset += size
            return {target: out}

    return StackInto()


class _Unread:
    """A checkpoint tensor not read yet (``read()`` reads it)."""

    __slots__ = ("read",)

    def __init__(self, read) -> None:
        self.read = read


def _trim_heap() -> None:
    """Return glibc's freed heap pages to the system (no-op elsewhere)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def load_tokenizer(model: str | Path):
    """Load the tokenizer stored beside the model; pad token falls back to eos.

    Raises:
        UsageError: no loadable tokenizer in the directory (transformers returns an empty-vocabulary
            tokenizer of the model type when there are no tokenizer files; it is refused too).
    """
    from transformers import AutoTokenizer

    path = resolve_model_path(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise UsageError(f"model '{model}': cannot load its tokenizer ({first})") from None
    if not tokenizer("a b", add_special_tokens=False)["input_ids"]:  # no files: an empty-vocabulary stand-in
        raise UsageError(f"model '{model}': no usable tokenizer in the directory (text encodes to no tokens)")
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def pad_token_id(tokenizer) -> int:
    """The id used to pad batches: the tokenizer's pad token, else its EOS, else 0 (always masked out)."""
    for value in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            return value
    return 0
