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

    path = resolve_model_path(model)
    headers = []
    if any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").exists():
        from .checkpoint_files import check_shards

        headers = check_shards(path)  # a missing or truncated shard: one line naming it
    try:
        with _read_once(cpu="device_map" not in kwargs, path=path, headers=headers, dtype=dtype):
            from transformers import AutoModelForCausalLM  # its model code: imported while weights are read

            loaded = AutoModelForCausalLM.from_pretrained(
                path, local_files_only=True, dtype=dtype or "auto", **kwargs
            )
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise UsageError(f"model '{model}': cannot load ({first})") from None
    return loaded.eval()


_LOADING = threading.Lock()  # _read_once patches transformers process-wide: one load at a time


@contextlib.contextmanager
def _read_once(cpu: bool, path: Path | None = None, headers=(), dtype=None) -> Iterator[None]:
    """Load safetensors weights so that the process never holds them twice (a CPU load).

    transformers memory-maps each shard and reads tensors ahead on 4 threads: every page read stays in
    the process's resident set as long as the map is open (the fused expert parameters are new memory
    beside it), and the read-ahead holds per-expert tensors of many layers before they are fused. The
    load peaked at about 2.1x the weights. Here tensors are read with ``pread`` into fresh memory, one
    parameter group at a time (each group converted, e.g. experts stacked into ``[E, ...]``, before
    the next is read), and freed heap pages go back to the system afterwards: about 1.0x, plus one
    layer's experts while they are fused. Per-expert tensors stored in the parameter's dtype (or a
    16-bit float widened to float32) are read with ``pread`` straight into their slot of the fused
    parameter (:class:`_DirectReads`, off the GIL): no temporary tensor, no second copy; these reads
    start before transformers imports its modeling code and builds the model, and run beside it.
    Tensors stored in the compute dtype are not read at all where their pages line up: the fused
    parameter (or the plain one) is made of the file's own pages, mapped copy-on-write
    (:meth:`_DirectReads._mapped`), as llama.cpp maps its GGUF.
    """
    if not cpu:
        yield
        return
    with _LOADING:
        direct = _DirectReads(headers)
        try:
            if headers and path is not None:
                _start_prefetch(direct, path, dtype)
            yield from _read_once_locked(direct)
        finally:
            direct.close()


def _start_prefetch(direct: _DirectReads, path: Path, dtype) -> None:
    """Plan and start the fused reads; a checkpoint or table this cannot plan is read as it comes."""
    try:
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
        if dtype is None or dtype == "auto":
            dtype = stored_dtype(path)
        elif isinstance(dtype, str):
            dtype = getattr(torch, dtype, None)
        if isinstance(model_type, str) and isinstance(dtype, torch.dtype):
            direct.prefetch(model_type, dtype)
    except (ImportError, AttributeError, KeyError, TypeError, ValueError, UsageError):
        direct.close()


def _read_once_locked(direct: _DirectReads) -> Iterator[None]:
    import transformers.core_model_loading as core_model_loading
    import transformers.modeling_utils as modeling_utils

    opener = modeling_utils.safe_open
    spawn = core_model_loading.spawn_materialize

    def pread_open(file, framework="pt", device="cpu", backend=None, **kw):
        if str(device) == "cpu" and backend in (None, "mmap"):
            backend = "pread"
        handle = opener(file, framework=framework, device=device, backend=backend, **kw)
        return _Handle(handle, os.fspath(file)) if str(device) == "cpu" else handle

    def pending_spawn(thread_pool, tensor, device=None, dtype=None, sharding_op=None, tensor_idx=None):
        source = tensor.source if isinstance(tensor, _Slice) else None
        job = spawn(thread_pool, tensor, device, dtype, sharding_op=sharding_op, tensor_idx=tensor_idx)
        if source is None or sharding_op is not None or not callable(job) or not _on_cpu(device):
            return job
        return _Pending(job, source, dtype, direct.map_whole)

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
        into.direct = direct
        operations, self.operations = self.operations, [into]
        try:
            return convert(self, layer_name, **kw)
        finally:
            self.operations = operations

    saved = os.environ.get("HF_DEACTIVATE_ASYNC_LOAD")
    os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = "1"
    modeling_utils.safe_open = pread_open
    core_model_loading.spawn_materialize = pending_spawn
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
        core_model_loading.spawn_materialize = spawn
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
        direct: _DirectReads | None = None

        @torch.no_grad()
        def convert(self, input_dict, source_patterns, target_patterns, **kwargs):
            target = target_patterns[0] if join is None else join.get_target_pattern(target_patterns)
            order = [pattern for pattern in source_patterns if pattern in input_dict]
            if self.direct is not None:
                out = self.direct.read([[load.read for load in input_dict[p]] for p in order], join)
                if out is not None:
                    input_dict.clear()
                    return {target: out}
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


def _on_cpu(device) -> bool:
    if device is None:
        return True
    try:
        return torch.device(device).type == "cpu"
    except (RuntimeError, TypeError):
        return False


class _Handle:
    """A safetensors file opened by transformers, whose slices remember where they come from."""

    def __init__(self, handle, path: str) -> None:
        self._handle, self._path = handle, path

    def get_slice(self, key):
        return _Slice(self._handle.get_slice(key), (self._path, key))

    def __enter__(self):
        self._handle.__enter__()
        return self

    def __exit__(self, *exc_info):
        return self._handle.__exit__(*exc_info)

    def __getattr__(self, name):
        return getattr(self._handle, name)


class _Slice:
    """A checkpoint tensor not read yet (safetensors' slice) and its ``(file, key)``."""

    def __init__(self, inner, source: tuple[str, str]) -> None:
        self._inner, self.source = inner, source

    def __getitem__(self, index):
        return self._inner[index]

    def __getattr__(self, name):
        return getattr(self._inner, name)


class _Pending:
    """transformers' deferred read of one checkpoint tensor, with its ``(file, key)`` and the dtype
    it is to be read in (None: the file's). Called, it maps the tensor from the file where
    ``mapper`` can (see :meth:`_DirectReads.map_whole`), else runs transformers' read."""

    __slots__ = ("job", "source", "dtype", "mapper")

    def __init__(self, job, source: tuple[str, str], dtype, mapper=None) -> None:
        self.job, self.source, self.dtype, self.mapper = job, source, dtype, mapper

    def __call__(self):
        mapped = self.mapper(self.source, self.dtype) if self.mapper is not None else None
        return mapped if mapped is not None else self.job()


class _DirectReads:
    """Reads per-expert checkpoint tensors with ``pread`` straight into their slot of the fused
    ``[E, ...]`` parameter, on the compiled ExpertLoader's threads (without the GIL).

    Only where the bytes are the values: the tensor is stored in the parameter's dtype, or as
    bfloat16 / float16 for a float32 parameter (widened by the reader, exactly as ``.to`` does), and
    each expert's slot is contiguous (stacked experts, joined along dim 1 at most). For anything else
    :meth:`read` returns None and transformers' tensors are read as before.

    :meth:`prefetch` starts these reads before transformers imports its modeling code and builds the
    model, from the checkpoint's headers and transformers' conversion table; :meth:`read` hands over
    a prefetched tensor only if it was planned from exactly the tensors transformers collected (same
    files, keys, order and dtype). On the first that was not, every prefetched tensor is dropped
    (memory stays that of one copy of the weights) and the rest is read as transformers asks.
    """

    def __init__(self, headers) -> None:
        self._where = {}  # (file, key) -> (where the file's data starts, header entry)
        for header in headers:
            file = os.fspath(header.file)
            for key, entry in header.tensors.items():
                self._where[(file, key)] = (header.data_start, entry)
        self._loader = None
        self._ahead: dict[tuple, tuple[torch.Tensor, list[int]]] = {}
        self._maps_left: int | None = None  # memory mappings this load may still add

    def _slot(self, source: tuple[str, str], want: torch.dtype | None):
        """``(file, offset, nbytes, shape, stored dtype, dtype)`` of one tensor read as ``want``
        (None: its stored dtype), or None if its bytes cannot go straight into a slot."""
        where = self._where.get(source)
        if where is None:
            return None
        start, entry = where
        from ..interop.tensor_files import DTYPES  # the safetensors dtype names

        stored = DTYPES.get(entry.get("dtype"))
        want = want or stored
        if stored is None or want is None:
            return None
        if want != stored and not (want == torch.float32 and stored in (torch.bfloat16, torch.float16)):
            return None
        begin, end = (int(v) for v in entry["data_offsets"])
        shape = tuple(int(v) for v in entry["shape"])
        if end - begin != torch.Size(shape).numel() * stored.itemsize:
            return None
        return source[0], start + begin, end - begin, shape, stored, want

    @staticmethod
    def _layout(slots: list[list], join_dim: int | None):
        """Shape and dtype of the fused tensor of ``slots`` (per source pattern, per expert), or None."""
        if not slots or not all(slots) or any(slot is None for pattern in slots for slot in pattern):
            return None
        if join_dim not in (None, 1) or (join_dim is None and len(slots) != 1):
            return None
        dtype, experts = slots[0][0][5], len(slots[0])
        shapes = [pattern[0][3] for pattern in slots]
        for pattern, shape in zip(slots, shapes, strict=True):
            if len(pattern) != experts or any(slot[3] != shape or slot[5] != dtype for slot in pattern):
                return None
        if join_dim is None:
            return [experts, *shapes[0]], dtype
        if not shapes[0] or any(len(s) != len(shapes[0]) or s[1:] != shapes[0][1:] for s in shapes):
            return None
        return [experts, sum(s[0] for s in shapes), *shapes[0][1:]], dtype

    def map_whole(self, source: tuple[str, str], want: torch.dtype | None) -> torch.Tensor | None:
        """One checkpoint tensor stored as ``want`` (None: as stored), mapped from its file (see
        :meth:`_mapped`), or None."""
        slot = self._slot(source, want)
        if slot is None or slot[4] != slot[5]:
            return None
        return self._mapped([slot[:3]], list(slot[3]), slot[5])

    def _mapped(self, pieces: list[tuple], shape: list[int], dtype: torch.dtype) -> torch.Tensor | None:
        """A tensor of ``shape`` whose bytes are the file ranges ``pieces`` (``(file, offset, nbytes)``,
        back to back, stored as ``dtype``), made of the file's own pages, copy-on-write
        (``map_file_pieces``): nothing is read, nor fresh memory faulted in and zeroed (on this
        machine's VM that cost more than the copy itself, docs/benchmarks.md). None where a range does
        not line up with the tensor's pages, the ranges span files, mapping is off
        (``MOE_RUNTIME_MAP_WEIGHTS=0``) or the mappings would take more than half of what the system
        allows a process (``vm.max_map_count``): then the tensor is read."""
        file = pieces[0][0]
        if not _mapping_enabled() or any(piece[0] != file for piece in pieces):
            return None
        lead, at = pieces[0][1] % _PAGE, 0
        if lead % dtype.itemsize:
            return None
        for _, offset, nbytes in pieces:
            if offset % _PAGE != (lead + at) % _PAGE:
                return None
            at += nbytes
        maps = 2 * len(pieces) + 1  # at most a file mapping and a page of its own per range
        if self._maps_left is None:
            self._maps_left = _map_count_allowance()
        if maps > self._maps_left:
            return None
        try:
            raw = torch.ops.moe_runtime.map_file_pieces(file, [p[1] for p in pieces], [p[2] for p in pieces])
        except RuntimeError:
            return None
        self._maps_left -= maps
        return raw.view(dtype).view(shape)

    def _submit(self, slots, join_dim, shape, dtype, priority: int) -> tuple[torch.Tensor, list[int]]:
        if all(slot[4] == dtype for pattern in slots for slot in pattern):  # no widening: map the file
            pieces = [pattern[expert][:3] for expert in range(shape[0]) for pattern in slots]
            mapped = self._mapped(pieces, shape, dtype)
            if mapped is not None:
                return mapped, []
        out = torch.empty(shape, dtype=dtype)
        loader = self._open()
        tickets = []
        for expert in range(shape[0]):
            row = 0
            for pattern in slots:
                file, offset, nbytes, slot_shape, stored, _ = pattern[expert]
                if join_dim is None:
                    dest = out[expert]
                else:
                    dest = out[expert].narrow(0, row, slot_shape[0])
                    row += slot_shape[0]
                widen = stored if stored != dtype else None
                tickets.append(loader.submit(file, [(offset, nbytes)], dest, priority, widen_from=widen))
        return out, tickets

    def read(self, items: list[list], join) -> torch.Tensor | None:
        """The fused tensor of ``items`` (per source pattern, per expert: transformers' pending
        reads) stacked, and joined along ``join.dim`` (None: one pattern), or None (read them as
        before)."""
        if not items or not all(isinstance(item, _Pending) for loads in items for item in loads):
            return None
        join_dim = None if join is None else join.dim
        slots = [[self._slot(item.source, item.dtype) for item in loads] for loads in items]
        layout = self._layout(slots, join_dim)
        if layout is None:
            return None
        key = (tuple(tuple(item.source for item in loads) for loads in items), join_dim, layout[1])
        ahead = self._ahead.pop(key, None)
        if ahead is None:
            self._drop()  # planned from something else than what transformers collects
            ahead = self._submit(slots, join_dim, *layout, priority=0)
        out, tickets = ahead
        for ticket in tickets:
            self._loader.promote(ticket, 0)
        for ticket in tickets:
            self._loader.wait(ticket)
        return out

    def prefetch(self, model_type: str | None, dtype: torch.dtype | None) -> None:
        """Start reading every fused expert tensor that transformers' conversion table for
        ``model_type`` makes of this checkpoint, as ``dtype`` (None: as stored), layer by layer."""
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
        from transformers.core_model_loading import (
            Concatenate,
            MergeModulelist,
            WeightConverter,
            dot_natural_key,
        )

        groups: dict[tuple, dict[int, list[tuple[str, str]]]] = {}
        joins: dict[int, int | None] = {}
        for index, converter in enumerate(get_checkpoint_conversion_mapping(model_type) or []):
            ops = converter.operations if isinstance(converter, WeightConverter) else None
            if not ops or type(ops[0]) is not MergeModulelist or ops[0].dim != 0:
                continue
            if len(ops) == 1 and len(converter.source_patterns) == 1:
                joins[index] = None
            elif len(ops) == 2 and type(ops[1]) is Concatenate and ops[1].dim == 1:
                joins[index] = 1
            else:
                continue
            for source in self._where:
                match = converter.compiled_sources.search(source[1])
                if match is not None and match.lastgroup is not None:
                    group = (index, source[1][: match.start()], source[1][match.end() :])
                    groups.setdefault(group, {}).setdefault(int(match.lastgroup[1:]), []).append(source)
        for group in sorted(groups, key=lambda g: dot_natural_key(g[1] + g[2])):
            patterns = groups[group]
            sources = [sorted(patterns[p], key=lambda s: dot_natural_key(s[1])) for p in sorted(patterns)]
            slots = [[self._slot(source, dtype) for source in pattern] for pattern in sources]
            layout = self._layout(slots, joins[group[0]])
            if layout is not None:
                key = (tuple(tuple(pattern) for pattern in sources), joins[group[0]], layout[1])
                self._ahead[key] = self._submit(slots, joins[group[0]], *layout, priority=1)

    def _drop(self) -> None:
        """Forget every prefetched tensor (queued reads cancelled, running ones finished first)."""
        if not self._ahead:
            return
        from ..ops.loader import LoaderError

        for _, tickets in self._ahead.values():
            for ticket in tickets:
                self._loader.cancel(ticket)
        for _, tickets in self._ahead.values():
            for ticket in tickets:
                with contextlib.suppress(LoaderError):
                    self._loader.wait(ticket)
        self._ahead.clear()

    def _open(self):
        if self._loader is None:
            from ..ops.loader import ExpertLoader

            self._loader = ExpertLoader(num_threads=_READERS)
        return self._loader

    def close(self) -> None:
        """Drop what was not handed over and stop the reader threads."""
        self._drop()
        if self._loader is not None:
            self._loader.close()
            self._loader = None


# two readers: the page faults and copies out of the page cache (kernel time) overlap on two cores
_READERS = 2

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _mapping_enabled() -> bool:
    """Whether checkpoint tensors may be mapped from their files (the extension is built and
    ``MOE_RUNTIME_MAP_WEIGHTS`` is not 0/false/no/off)."""
    from ..ops import extension_available

    off = os.environ.get("MOE_RUNTIME_MAP_WEIGHTS", "1").lower() in {"0", "false", "no", "off"}
    if off or not extension_available():
        return False
    from ..ops import load_extension

    load_extension()
    return True


def _map_count_allowance() -> int:
    """Memory mappings a load may add: half of ``vm.max_map_count`` less those the process has."""
    try:
        allowed = int(Path("/proc/sys/vm/max_map_count").read_text())
        with open("/proc/self/maps") as maps:
            held = sum(1 for _ in maps)
    except (OSError, ValueError):
        return 0
    return max(0, allowed // 2 - held)


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
