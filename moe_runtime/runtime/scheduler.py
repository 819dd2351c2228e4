"""Continuous batching: requests join and leave the running batch between decode steps.

One scheduling iteration (:meth:`Scheduler.step`, run by the engine in the caller's thread or in its
one background thread):

    waiting queue --admit (FIFO, up to max_batch_size live rows)--> newcomers
      newcomers with adapter "auto": a prefill on the base model measures each prompt's routing
                                     -> the adapter with the closest task profile
      newcomers: one left-padded prefill forward (own cache)  -> first token of each
                 (so an offloaded layer reads each expert once for all of them, by expert; the
                  left padding skips the experts)
      every running group: one decode forward (1 token/row)   -> next token of each
      finished (EOS, stop string, max tokens) and cancelled rows leave: cut from cache, mask, positions
      groups whose caches can be merged become one group      -> one decode forward serves them all

A *group* is a set of rows sharing one transformers cache, attention mask ``[B, L]`` (0 on left
padding) and per-row positions. Merging left-pads the shorter group's keys and values to the longer
length (masked out), so every row attends exactly to its own tokens: a row gets the tokens it gets
alone. Merging needs a cache of plain key/value layers (``DynamicCache`` of ``DynamicLayer``); for
other caches (sliding-window layers, the linear-attention / SSM states of hybrid families, MiniMax's
own cache) and for families that must not be padded (``models.UNPADDED_FAMILIES``, whose newcomers
are also prefilled per prompt length) the groups stay apart and each decodes in its own forward:
correct, at some batching efficiency. Columns that became padding for every row of a group are
dropped from its cache.

Every forward is tagged ``"prefill"`` or ``"decode"`` (``phase``): an offload tier counts its reads,
misses and stalls per phase (``OffloadStats.phases``).

Every row has its own adapter owner (set on the executor before each forward), sampling generator
(seeded per request, so its tokens do not depend on the batch mix), token limit, stop strings and
text decoder (:class:`TextStream`).
"""

from __future__ import annotations

import collections
import contextlib
import json
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Cache, DynamicCache
from transformers.cache_utils import DynamicLayer

from .arena import BASE_OWNER
from .fast_decode import FastDecode, KVBuffers
from .generation import _accepts_logits_to_keep, _cache_argument, _keep_rows, _output_cache, left_pad
from .requests import Completion, DecodeConfig, Request, StreamEvent

__all__ = ["RequestHandle", "Scheduler", "TextStream"]


_LOCAL_DECODERS = frozenset(
    {"ByteLevel", "Metaspace", "Replace", "ByteFallback", "Fuse", "Strip", "BPEDecoder"}
)
"""tokenizers' decoders whose text for a token does not depend on tokens further back than the
first of the text (which :class:`TextStream`'s context covers)."""


def decodes_locally(tokenizer) -> bool:
    """Whether ``tokenizer`` is a fast tokenizer whose decoder (a sequence of) :data:`_LOCAL_DECODERS`
    and which cleans up no spaces: then :class:`TextStream` decodes only the newest tokens."""
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    if decoder is None or getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return False
    try:
        spec = json.loads(decoder.__getstate__())
    except (TypeError, ValueError, AttributeError):
        return False

    def local(part) -> bool:
        if not isinstance(part, dict):
            return False
        if part.get("type") == "Sequence":
            return all(local(inner) for inner in part.get("decoders", []))
        return part.get("type") in _LOCAL_DECODERS

    return local(spec)


class TextStream:
    """Incremental text of a growing list of token ids, cut before the first stop string.

    Byte-level BPE can split a character over tokens: a trailing U+FFFD (an incomplete character)
    is held back, and so is a trailing piece of text that may be the start of a stop string.

    With a decoder that works token by token (byte-level BPE, SentencePiece's pieces and byte
    fallback: :func:`decodes_locally`), each step decodes only the newest tokens behind a few
    tokens of context, so a decoder that treats the first token of a text specially (the leading
    space) sees them as the full decode does: the cost per token stays flat where decoding the whole
    list each step grew with the length (0.29 ms a step at 2,048 tokens, docs/benchmarks.md). Where
    the context does not decode as it reads in the text (it starts inside a character) or the new
    tokens change it, that step decodes the whole list; so does every step with another decoder
    (WordPiece, space clean-up), which may rewrite across tokens. :meth:`flush` keeps one full
    decode: the completion's text is always exactly ``tokenizer.decode(ids)`` cut at a stop.
    """

    CONTEXT = 4
    """Tokens decoded before the new ones each step."""

    def __init__(self, tokenizer, stop: list[str] | None = None) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self.text = ""  # all the text so far (cut before a stop string)
        self.emitted = ""  # the text handed out as deltas
        self._ids: list[int] = []  # the last update's ids (flush decodes them)
        self._seen: list[int] = []  # its ids[_context:_read], to tell a grown list from another
        self._stable = ""  # the text of ids[:_read]: ends on a whole character
        self._context = 0  # ids[_context:_read] are decoded again before the new ones
        self._read = 0
        self._searched = ""  # the text searched for stop strings so far
        self._stopped = False
        self._local = decodes_locally(tokenizer)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _full_text(self, token_ids: list[int]) -> str:
        """``decode(token_ids)``, from the newest tokens where the earlier ones are unchanged."""
        if not self._local:
            return self._decode(token_ids)
        if len(token_ids) < self._read or token_ids[self._context : self._read] != self._seen:
            self._stable, self._context, self._read = "", 0, 0  # not the list grown so far: start over
        before = self._decode(token_ids[self._context : self._read]) if self._read > self._context else ""
        window = self._decode(token_ids[self._context :])
        # the context must decode as it reads in the full text (not, e.g., from inside a character
        # some decoders only decode whole), and the new tokens must leave it as it is
        if not (self._stable.endswith(before) and window.startswith(before)):
            full = self._decode(token_ids)
            whole = not full.endswith("\ufffd")
            self._stable, self._read = (full, len(token_ids)) if whole else (self._stable, self._read)
            self._context = max(0, self._read - self.CONTEXT)
            return full
        text = self._stable + window[len(before) :]
        if not text.endswith("\ufffd"):
            self._stable, self._read = text, len(token_ids)
            self._context = max(0, self._read - self.CONTEXT)
        return text

    def _remember(self, token_ids: list[int]) -> None:
        self._ids = token_ids
        self._seen = token_ids[self._context : self._read]

    def update(self, token_ids: list[int]) -> tuple[str, bool]:
        """The new delta for ``token_ids`` (all ids so far), and whether a stop string appeared."""
        if self.tokenizer is None:
            return "", False
        full = self._full_text(token_ids)
        self._remember(token_ids)
        longest = max((len(s) for s in self.stop), default=1)
        # text searched before and unchanged since holds no stop string (a whole search otherwise)
        searched = len(self._searched) if full.startswith(self._searched) else 0
        start = max(0, searched - longest + 1)
        found = [i for i in (full.find(s, start) for s in self.stop) if i >= 0]
        visible = full.rstrip("\ufffd")
        self._searched = visible
        if found:
            self._stopped = True
            self.text = full[: min(found)]
            return self._emit(self.text), True
        self.text = full
        return self._emit(visible[: len(visible) - self._held(visible)]), False

    def flush(self, token_ids: list[int] | None = None) -> str:
        """The rest of the text at the end of the request (of ``token_ids``, default: the last
        update's): the full decode's, cut at a stop."""
        if token_ids is not None and not self._stopped:
            self._ids = token_ids
        if self.tokenizer is not None and self._ids and not self._stopped:
            full = self._decode(self._ids)
            found = [i for i in (full.find(s) for s in self.stop) if i >= 0]
            self.text = full[: min(found)] if found else full
        return self._emit(self.text)

    def _held(self, text: str) -> int:
        """Length of the longest end of ``text`` that begins a stop string."""
        for n in range(min(len(text), max((len(s) for s in self.stop), default=1) - 1), 0, -1):
            if any(s.startswith(text[-n:]) for s in self.stop):
                return n
        return 0

    def _emit(self, visible: str) -> str:
        if not visible.startswith(self.emitted):  # earlier text decoded differently now: wait
            return ""
        delta, self.emitted = visible[len(self.emitted) :], visible
        return delta


class RequestHandle:
    """A submitted request: its events, its completion, and a way to cancel it.

    Without the engine's background thread, waiting on a handle (``result``, ``events``,
    ``next_event``) runs the engine's steps in the waiting thread.

    Attributes:
        request: the request.
        submitted_at, first_token_at, finished_at: ``time.perf_counter()`` at submission, at its
            first token and at its final event (None until then).
    """

    def __init__(self, request: Request, driver: Callable[[], bool]) -> None:
        self.request = request
        self._drive = driver  # runs one step in this thread if no background thread does; False otherwise
        self._cond = threading.Condition()
        self._events: collections.deque[StreamEvent] = collections.deque()
        self._completion: Completion | None = None
        self._error: BaseException | None = None
        self._cancelled = False
        self._claimed = False  # read by its owner: not returned by the engine's run()
        self.submitted_at = time.perf_counter()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None

    @property
    def done(self) -> bool:
        """True once the completion is ready (finished, stopped, cancelled or failed)."""
        return self._completion is not None or self._error is not None

    def cancel(self) -> None:
        """Stop generating: the rows are freed at the next step; the final event says ``cancelled``."""
        self._cancelled = True

    def result(self, timeout: float | None = None) -> Completion:
        """The completion (waits for it). Raises TimeoutError after ``timeout`` seconds."""
        self._claimed = True
        if not self._wait(lambda: self.done, timeout):
            raise TimeoutError(f"request {self.request.id!r} is not done after {timeout} s")
        if self._error is not None:
            raise self._error
        return self._completion  # type: ignore[return-value]

    def next_event(self, timeout: float | None = None) -> StreamEvent | None:
        """The next event, or None on timeout (or when the final event was already taken)."""
        self._claimed = True
        if not self._wait(lambda: bool(self._events) or self.done, timeout):
            return None
        with self._cond:
            if self._events:
                return self._events.popleft()
        if self._error is not None:
            raise self._error
        return None

    def events(self, timeout: float | None = None) -> Iterator[StreamEvent]:
        """The events as they come, ending after the final one. Raises TimeoutError when one takes
        longer than ``timeout`` seconds."""
        self._claimed = True
        while True:
            event = self.next_event(timeout)
            if event is None:
                if self.done:
                    return
                raise TimeoutError(f"request {self.request.id!r}: no event within {timeout} s")
            yield event
            if event.finish_reason is not None:
                return

    def _wait(self, ready: Callable[[], bool], timeout: float | None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._cond:
                if ready():
                    return True
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            if self._drive():  # no background thread: this thread ran a step
                continue
            with self._cond:
                if not ready():  # the background thread notifies; poll in case it stops
                    self._cond.wait(0.5 if remaining is None else min(remaining, 0.5))

    def _push(self, event: StreamEvent, completion: Completion | None = None) -> None:
        now = time.perf_counter()
        if self.first_token_at is None and event.token_ids:
            self.first_token_at = now
        if completion is not None:
            self.finished_at = now
        with self._cond:
            self._events.append(event)
            if completion is not None:
                self._completion = completion
            self._cond.notify_all()

    def _fail(self, error: BaseException) -> None:
        with self._cond:
            self._error = error
            self._cond.notify_all()


@dataclass(eq=False)
class Row:
    """The state of one request in the scheduler."""

    handle: RequestHandle
    prompt: list[int]
    owner: int | None  # None: "auto", chosen at admission
    adapter: str | None
    config: DecodeConfig | None = None  # defaults, set by generate()/run() (else DecodeConfig())
    seed_offset: int = 0  # added to config.seed when the request has no seed of its own
    limit: int = 0
    temperature: float = 0.0
    top_p: float = 1.0
    generator: torch.Generator | None = None
    stop_on_eos: bool = True
    keep_logits: bool = False
    tokens: list[int] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)
    text: TextStream | None = None
    finish_reason: str | None = None
    quiet: bool = False  # nobody reads its events' text deltas (engine.generate): decode the text once

    @property
    def request(self) -> Request:
        return self.handle.request

    def resolve(self, tokenizer) -> None:
        """Fix the decoding settings (request fields over the config's defaults)."""
        config, request = self.config or DecodeConfig(), self.request
        self.limit = request.max_new_tokens or config.max_new_tokens
        default_t = config.temperature if config.do_sample else 0.0
        self.temperature = default_t if request.temperature is None else float(request.temperature)
        self.top_p = float(
            request.top_p if request.top_p is not None else config.top_p if config.do_sample else 1.0
        )
        if self.temperature > 0:
            seed = request.seed if request.seed is not None else config.seed + self.seed_offset
            self.generator = torch.Generator().manual_seed(int(seed))
        self.stop_on_eos = config.stop_on_eos
        self.keep_logits = config.output_logits
        self.text = TextStream(tokenizer, request.stop)


class Group:
    """Rows decoded together over one cache.

    Attributes:
        rows: the live rows, in batch order.
        cache: the model's cache (``[B, ...]`` states).
        mask: ``[B, L]`` attention mask over the cached tokens (0 on left padding).
        last_position: ``[B]`` position of each row's last cached token.
        next_ids: ``[B]`` the token each row feeds next.
    """

    def __init__(self, rows: list[Row], cache: Cache, mask, last_position, next_ids) -> None:
        self.rows, self.cache, self.mask = rows, cache, mask
        self.last_position, self.next_ids = last_position, next_ids
        self.kv: KVBuffers | None = None  # the compiled decode step's buffers (the cache views them)
        self.trimmed = False  # the mask's first column is known live for some row (trim_left: nothing to do)

    def owners(self, device) -> torch.Tensor:
        return torch.tensor([r.owner for r in self.rows], dtype=torch.int64, device=device)

    def keep(self, index: list[int]) -> None:
        """Keep only the rows at ``index`` (cut from the cache and every per-row tensor)."""
        if len(index) == len(self.rows):
            return
        if not index:
            self.rows = []
            return
        self.trimmed = False  # the rows that kept the first column may be gone
        rows = torch.tensor(index, dtype=torch.long, device=self.mask.device)
        _keep_rows(self.cache, rows)
        self.rows = [self.rows[i] for i in index]
        self.mask, self.last_position, self.next_ids = (
            self.mask[rows],
            self.last_position[rows],
            self.next_ids[rows],
        )


def plain_layers(cache: Cache, length: int) -> list[DynamicLayer] | None:
    """The cache's layers if they are plain key/value layers of ``length`` cached tokens (mergeable)."""
    if type(cache) is not DynamicCache:
        return None
    layers = list(cache.layers)
    for layer in layers:
        if type(layer) is not DynamicLayer:
            return None
        if layer.is_initialized and (layer.keys.dim() != 4 or layer.keys.shape[-2] != length):
            return None
    return layers


def trim_left(group: Group) -> None:
    """Drop the leading cache columns that are padding for every row (plain caches only).

    Once the first column is live for some row it stays so while the group keeps its rows (decode
    steps add columns on the right): ``group.trimmed`` skips the check until rows leave or merge."""
    if group.trimmed:
        return
    live = group.mask.any(dim=0)
    start = int(live.to(torch.int8).argmax()) if bool(live.any()) else 0
    if start == 0:
        group.trimmed = bool(live.numel()) and bool(live[0])
        return
    layers = plain_layers(group.cache, group.mask.shape[1])
    if layers is None:
        return
    for layer in layers:
        if layer.is_initialized:
            layer.keys, layer.values = layer.keys[:, :, start:], layer.values[:, :, start:]
    group.mask = group.mask[:, start:]
    group.trimmed = True


def merge(into: Group, other: Group) -> bool:
    """Append ``other``'s rows to ``into`` (both plain caches), left-padding the shorter; False if
    the caches cannot be merged (then nothing changed)."""
    la, lb = into.mask.shape[1], other.mask.shape[1]
    a, b = plain_layers(into.cache, la), plain_layers(other.cache, lb)
    if a is None or b is None or len(a) != len(b):
        return False
    if any(x.is_initialized != y.is_initialized for x, y in zip(a, b)):
        return False
    length = max(la, lb)

    def pad(t: torch.Tensor, n: int) -> torch.Tensor:
        return F.pad(t, (0, 0, n, 0)) if n else t

    for x, y in zip(a, b):
        if x.is_initialized:
            x.keys = torch.cat([pad(x.keys, length - la), pad(y.keys, length - lb)])
            x.values = torch.cat([pad(x.values, length - la), pad(y.values, length - lb)])
    into.mask = torch.cat([F.pad(into.mask, (length - la, 0)), F.pad(other.mask, (length - lb, 0))])
    into.rows = into.rows + other.rows
    into.last_position = torch.cat([into.last_position, other.last_position])
    into.next_ids = torch.cat([into.next_ids, other.next_ids])
    into.trimmed = into.trimmed and other.trimmed  # the longer side's first column is the first column
    return True


def sample_token(logits: torch.Tensor, generator: torch.Generator, temperature: float, top_p: float) -> int:
    """``logits [V]`` -> one id drawn from the temperature / nucleus distribution with ``generator``."""
    probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p  # the token crossing top_p stays
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
    return int(torch.multinomial(probs, 1, generator=generator))


RouteObserver = Callable[[int, torch.Tensor], None]


class Scheduler:
    """The waiting queue and the running groups of one engine (see the module docstring).

    Args:
        model: the causal LM (its experts run through ``executor``).
        executor: sets the owner of every token before a forward; observes routing for "auto".
        tokenizer: decodes completions (None: token ids only).
        eos_ids: the ids that end a request (read at every step: the generation config may change).
        pad_id: id written into left padding.
        unpadded: the family must not be left-padded (prefill per prompt length, never merge).
        threads: context manager factory for the torch thread settings of a step.
        phase: ``phase(name, tokens)``, a context manager around every forward, named ``"prefill"``
            or ``"decode"`` (the offload tier counts its reads per phase); None: no tagging.
        choose: ``choose(counts {layer index: [B, E]}) -> [(adapter name, owner id)]`` for "auto" rows.
        fast_decode: the compiled decode step of ``model`` (:mod:`.fast_decode`), used for decode
            steps of base-model rows it can serve; None: every step is the model's forward.
    """

    def __init__(
        self,
        model: nn.Module,
        executor,
        tokenizer,
        *,
        eos_ids: Callable[[], set[int]],
        pad_id: int,
        unpadded: bool,
        threads: Callable[[], Any],
        choose: Callable[[dict[int, torch.Tensor]], list[tuple[str | None, int]]],
        phase: Callable[[str, int], Any] | None = None,
        fast_decode: FastDecode | None = None,
    ) -> None:
        self.model, self.executor, self.tokenizer = model, executor, tokenizer
        self.fast_decode = fast_decode
        self.eos_ids_of, self.pad_id, self.unpadded = eos_ids, pad_id, unpadded
        self.eos_ids: set[int] = set()
        self.threads, self.choose = threads, choose
        self.phase = phase or (lambda name, tokens: contextlib.nullcontext())
        self.device = next(model.parameters()).device
        self.keep_kwargs = {"logits_to_keep": 1} if _accepts_logits_to_keep(model) else {}
        self.cache_name = _cache_argument(model)
        self.lock = threading.Condition(threading.Lock())  # guards the waiting queue and `live`
        self.step_lock = threading.RLock()  # one step (or adapter change) at a time
        self.waiting: collections.deque[Row] = collections.deque()
        self.groups: list[Group] = []
        self.live = 0  # rows in groups
        self.max_batch_size = 64
        self.submitted: list[weakref.ref[RequestHandle]] = []  # for run(): not yet returned nor claimed

    # queue -------------------------------------------------------------------------------------

    def enqueue_locked(self, rows: list[Row]) -> None:
        """Queue ``rows`` (the caller holds ``lock``)."""
        self.waiting.extend(rows)
        self.submitted = [
            r for r in self.submitted if (h := r()) is not None and not h._claimed and not h.done
        ]
        self.submitted.extend(weakref.ref(row.handle) for row in rows)
        self.lock.notify_all()

    def take_unclaimed(self) -> list[RequestHandle]:
        """The handles submitted and not yet returned by ``run()`` nor read by their owner, in order."""
        with self.lock:
            handles = [h for r in self.submitted if (h := r()) is not None and not h._claimed]
            self.submitted = []
        return handles

    def handles(self) -> list[RequestHandle]:
        """Every waiting or live request's handle."""
        with self.lock:
            return [r.handle for r in self.waiting] + [r.handle for g in self.groups for r in g.rows]

    def has_work_locked(self) -> bool:
        return bool(self.waiting) or self.live > 0

    def outstanding(self) -> int:
        """Requests live or waiting."""
        with self.lock:
            return self.live + len(self.waiting)

    def named_adapters_locked(self) -> dict[str | None, int]:
        """Requests naming each adapter, live or waiting (such adapters cannot be removed)."""
        named: dict[str | None, int] = {}
        for row in list(self.waiting) + [r for g in self.groups for r in g.rows]:
            named[row.adapter] = named.get(row.adapter, 0) + 1
        return named

    # one step ----------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, limit: int | None = None) -> int:
        """Admit, prefill, decode one token per live row, retire; returns the requests live or waiting."""
        limit = self.max_batch_size if limit is None else limit
        with self.step_lock:
            self.eos_ids = self.eos_ids_of()
            newcomers, cancelled = self._admit(limit)
            for row in cancelled:
                self._finish(row, "cancelled", [])
            for group in self.groups:
                self._retire(group, [r for r in group.rows if r.handle._cancelled], "cancelled")
            old = [g for g in self.groups if g.rows]
            try:
                with self.threads():
                    fresh = self._prefill(newcomers) if newcomers else []
                    for group in old:
                        self._decode(group)
            except BaseException as error:
                self._abort(newcomers, error)
                raise
            self._regroup(old + fresh)
            with self.lock:
                return self.live + len(self.waiting)

    def _admit(self, limit: int) -> tuple[list[Row], list[Row]]:
        with self.lock:
            cancelled = [r for r in self.waiting if r.handle._cancelled]
            if cancelled:
                self.waiting = collections.deque(r for r in self.waiting if not r.handle._cancelled)
            newcomers = []
            while self.waiting and self.live + len(newcomers) < limit:
                newcomers.append(self.waiting.popleft())
            self.live += len(newcomers)
        return newcomers, cancelled

    def _abort(self, newcomers: list[Row], error: BaseException) -> None:
        """A forward failed: every live request fails with ``error`` (the waiting ones stay)."""
        rows = newcomers + [r for g in self.groups for r in g.rows]
        self.groups = []
        with self.lock:
            self.live = 0
        for row in rows:
            if not row.handle.done:
                row.handle._fail(error)

    def _regroup(self, groups: list[Group]) -> None:
        groups = [g for g in groups if g.rows]
        for group in groups:
            trim_left(group)
        if not self.unpadded:
            merged: list[Group] = []
            for group in groups:
                if not (merged and merge(merged[0], group)):
                    merged.append(group)
            groups = merged
        self.groups = groups

    # forwards ----------------------------------------------------------------------------------

    def _forward(self, ids, mask, positions, owners, cache, phase: str):
        """One forward of ``ids [B, S]``; ``mask`` covers the cache and ``ids`` (its last ``S``
        columns tell real tokens from left padding)."""
        valid = mask[:, -ids.shape[1] :]
        self.executor.set_owners(owners, ids.shape[1], valid)
        try:
            with self.phase(phase, int(valid.sum())):
                out = self.model(
                    input_ids=ids,
                    attention_mask=mask,
                    position_ids=positions,
                    use_cache=True,
                    **{self.cache_name: cache},
                    **self.keep_kwargs,
                )
        finally:
            self.executor.clear_owners()
        return _output_cache(out), out.logits[:, -1, :]

    def _prefill(self, rows: list[Row]) -> list[Group]:
        auto = [r for r in rows if r.owner is None]
        if auto:
            self._choose_adapters(auto)
        for row in rows:
            row.resolve(self.tokenizer)
        if self.unpadded:  # one prompt length per group: no row is padded
            by_length: dict[int, list[Row]] = {}
            for row in rows:
                by_length.setdefault(len(row.prompt), []).append(row)
            batches = list(by_length.values())
        else:
            batches = [rows]
        groups = []
        for batch in batches:
            ids, mask, positions = left_pad([r.prompt for r in batch], self.pad_id, self.device)
            fast, cache = self._fast_prompt(batch, mask)
            if fast is not None:
                reserve = max(row.limit for row in batch)
                with self.phase("prefill", int(mask.sum())):
                    kv, logits = fast.prompt_forward(cache, ids, mask, positions, reserve)
            else:
                owners = torch.tensor([r.owner for r in batch], dtype=torch.int64, device=self.device)
                cache, logits = self._forward(ids, mask, positions, owners, None, "prefill")
                kv = None
            group = Group(batch, cache, mask, positions[:, -1], ids[:, -1])
            group.kv = kv
            self._advance(group, logits)
            groups.append(group)
        return groups

    def _choose_adapters(self, rows: list[Row]) -> None:
        """Prefill the "auto" rows on the base model, counting each prompt's expert selections per
        MoE layer, and give each row the adapter ``choose`` picks."""
        ids, mask, positions = left_pad([r.prompt for r in rows], self.pad_id, self.device)
        valid = mask.reshape(-1).bool()
        row_of_token = torch.arange(len(rows)).repeat_interleave(ids.shape[1])[valid.cpu()]
        counts: dict[int, torch.Tensor] = {}

        def observe(layer: int, top_k_index: torch.Tensor) -> None:
            width = self.executor.arena.layers[layer].layer.num_experts
            chosen = top_k_index[valid.to(top_k_index.device)].cpu().long()
            flat = (row_of_token[:, None] * width + chosen).reshape(-1)
            table = counts.setdefault(layer, torch.zeros(len(rows) * width, dtype=torch.float64))
            table.index_add_(0, flat, torch.ones(flat.shape, dtype=torch.float64))

        self.executor.observer = observe
        try:
            zeros = torch.zeros(len(rows), dtype=torch.int64, device=self.device)
            self._forward(ids, mask, positions, zeros, None, "prefill")
        finally:
            self.executor.observer = None
        tables = {layer: t.view(len(rows), -1) for layer, t in counts.items()}
        for row, (name, owner) in zip(rows, self.choose(tables)):
            row.adapter, row.owner = name, owner

    def _decode(self, group: Group) -> None:
        group.mask = torch.cat([group.mask, group.mask.new_ones(group.mask.shape[0], 1)], dim=1)
        group.last_position = group.last_position + 1
        fast = self._fast_step(group)
        if fast is not None:
            reserve = max(row.limit - len(row.tokens) for row in group.rows)
            group.kv, logits = fast.forward(
                group.kv, group.cache, group.next_ids, group.last_position, group.mask, reserve
            )
            self._advance(group, logits)
            return
        group.kv = None
        cache, logits = self._forward(
            group.next_ids[:, None],
            group.mask,
            group.last_position[:, None],
            group.owners(self.device),
            group.cache,
            "decode",
        )
        group.cache = cache
        self._advance(group, logits)

    def _fast_prompt(self, rows: list[Row], mask: torch.Tensor) -> tuple[FastDecode | None, Cache | None]:
        """The compiled step and the empty cache it fills, if it can serve the prefill of ``rows``
        (left-padded ``mask``): base-model rows only, no routing observer, nothing
        :meth:`FastDecode.prompt_blocked` names; else ``(None, None)``."""
        fast = self.fast_decode
        if fast is None or self.executor.observer is not None or any(row.owner != BASE_OWNER for row in rows):
            return None, None
        cache = fast.prompt_cache(mask)
        return (fast, cache) if cache is not None else (None, None)

    def _fast_step(self, group: Group) -> FastDecode | None:
        """The compiled decode step if it can serve ``group``'s next step: base-model rows only, no
        routing observer, and :meth:`FastDecode.serves` agrees."""
        fast = self.fast_decode
        if fast is None or self.executor.observer is not None:
            return None
        if any(row.owner != BASE_OWNER for row in group.rows):
            return None
        return fast if fast.serves(group.cache, len(group.rows), group.mask.shape[1]) else None

    def _advance(self, group: Group, logits: torch.Tensor) -> None:
        """Choose each row's next token from ``logits [B, V]``, emit it, retire finished rows."""
        chosen = logits.argmax(dim=-1)
        for i, row in enumerate(group.rows):
            if row.temperature > 0:
                chosen[i] = sample_token(logits[i], row.generator, row.temperature, row.top_p)
        keep, finished = [], []
        for i, (row, token) in enumerate(zip(group.rows, chosen.tolist())):
            row.tokens.append(token)
            if row.keep_logits:
                row.logits.append(logits[i].detach().clone())
            if row.quiet and not row.text.stop:  # no one reads its deltas: the text once, at the end
                delta, stopped = "", False
            else:
                delta, stopped = row.text.update(row.tokens)
            if stopped or (row.stop_on_eos and token in self.eos_ids):
                finished.append((row, "stop", delta))
            elif len(row.tokens) >= row.limit:
                finished.append((row, "length", delta))
            else:
                row.handle._push(StreamEvent([token], delta))
                keep.append(i)
        group.next_ids = chosen
        group.keep(keep)
        with self.lock:
            self.live -= len(finished)
        for row, reason, delta in finished:
            self._finish(row, reason, [row.tokens[-1]], delta)

    def _retire(self, group: Group, rows: list[Row], reason: str) -> None:
        if not rows:
            return
        group.keep([i for i, r in enumerate(group.rows) if r not in rows])
        with self.lock:
            self.live -= len(rows)
        for row in rows:
            self._finish(row, reason, [])

    def _finish(self, row: Row, reason: str, token_ids: list[int], delta: str = "") -> None:
        text = row.text or TextStream(self.tokenizer, row.request.stop)
        delta += text.flush(row.tokens)
        completion = Completion(
            row.request.id,
            row.adapter,
            text.text,
            list(row.tokens),
            torch.stack(row.logits) if row.keep_logits and row.logits else None,
            finish_reason=reason,
            prompt_tokens=len(row.prompt),
        )
        row.finish_reason = reason
        row.handle._push(StreamEvent(token_ids, delta, reason), completion)
