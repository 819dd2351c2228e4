"""Multi-adapter serving in one process: one base model, many adapters (ESFT, routed LoRA), mixed batches.

    engine = MultiAdapterEngine.from_pretrained("demo")
    engine.add_adapter("arith", "adapters/arith")        # tuned experts -> arena slots
    engine.add_adapter("rl", "adapters/rl")              # routed LoRA -> owner row + LoRA terms
    engine.generate([Request("12 + 35 =", adapter="arith"), Request("def f(", adapter=None)])
    engine.remove_adapter("arith")                       # slots and owner row freed for reuse

Requests of different adapters run together: the engine tells the slot-routed executor the owner of
every row before each forward. Adapters are read and handed over by their tuning method
(``tuning.registry``); the base experts are the model's own or an offload tier's
(``runtime.executor.BaseExperts``).

Shape of the serving loop (continuous batching, :mod:`runtime.scheduler`): ``submit`` queues a
request and returns a :class:`RequestHandle`; ``step()`` is one scheduling iteration (admit and
prefill newcomers, one decode token for every live row, retire finished and cancelled rows) run in
the caller's thread. ``start()`` runs ``step()`` in one background thread while there is work
(``stop()`` joins it); without it, waiting on a handle, ``stream``, ``run`` and ``generate`` drive
``step()`` in the waiting thread. One step runs at a time (a lock); adapters are added and removed
between steps. ``submit``, ``cancel``, ``add_adapter`` and ``remove_adapter`` are safe from any thread.

    handle = engine.submit(Request("12 + 35 =", adapter="auto", max_new_tokens=8))
    for event in engine.stream(Request("def f(", temperature=0.7, seed=1, stop=["\\n"])):
        print(event.text, end="", flush=True)
    handle.result().adapter                                  # the adapter "auto" chose
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import AdapterError, UsageError
from ..models import (
    UNPADDED_FAMILIES,
    MoEModelInfo,
    compute_dtype,
    install,
    load_model,
    load_tokenizer,
    model_fingerprint,
    stored_dtype,
    uninstall,
)
from ..tuning.registry import method_of, read_adapter_dir
from .arena import ArenaMemory, ExpertArena, TunedExperts
from .executor import BaseExperts, ResidentExperts, SlotRoutedExecutor, TokenTerm
from .fast_decode import FastDecode
from .generation import left_pad
from .linear_terms import LinearTerms
from .offload import OffloadConfig, OffloadedExperts, load_offloaded_model
from .offload.host import move_resident
from .profiles import RoutingProfile, closest_profile, load_routing_profile
from .requests import AUTO, Completion, DecodeConfig, Request, StreamEvent, check_sampling
from .scheduler import RequestHandle, Row, Scheduler
from .streamed_linears import StreamedLinears

__all__ = ["MultiAdapterEngine", "RequestHandle", "eos_ids_of", "pad_id_of"]


def eos_ids_of(model: nn.Module, tokenizer=None) -> set[int]:
    """EOS ids that end a request: the model's generation config, else the tokenizer's."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None and tokenizer is not None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return set()
    return {int(e) for e in eos} if isinstance(eos, (list, tuple)) else {int(eos)}


def pad_id_of(model: nn.Module, tokenizer=None) -> int:
    """An id for left padding (masked out, so any valid id works)."""
    candidates = [getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)]
    candidates.append(getattr(getattr(model, "generation_config", None), "pad_token_id", None))
    return next((int(c) for c in candidates if isinstance(c, int)), 0)


def _stored(model: str | Path, dtype) -> torch.dtype | None:
    """The checkpoint's dtype, read only when ``dtype`` is ``"auto"`` (it depends on it)."""
    return stored_dtype(model) if dtype == "auto" else None


class MultiAdapterEngine:
    """A base model serving many adapters at once.

    Args:
        model: a transformers causal LM with fused experts (its weights are never modified).
        tokenizer: needed for text prompts and completions (token-id prompts work without).
        info: the model's MoE layers, if already discovered.
        max_chunks: adapter chunks a layer may hold before it is repacked (see :class:`ExpertArena`).
        offload: base experts left on a slow tier (a model from :func:`load_offloaded_model`);
            None keeps them resident. See :meth:`from_pretrained`.
        max_batch_size: requests decoded together at most; more wait for a free row.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer=None,
        *,
        info: MoEModelInfo | None = None,
        max_chunks: int | None = 1,
        offload: OffloadedExperts | None = None,
        max_batch_size: int = 64,
    ) -> None:
        if max_batch_size <= 0:
            raise UsageError(f"max_batch_size must be positive, got {max_batch_size}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.info = install(model, info)
        self.base: BaseExperts = ResidentExperts() if offload is None else offload.tier(self.info)
        self.arena = ExpertArena(self.info, max_chunks=max_chunks, base_segment=self.base.segment)
        self.executor = SlotRoutedExecutor(self.arena, self.base)
        self.executor.attach()
        self.streamed = StreamedLinears(model)  # decode-sized linear calls stream their weights
        self.streamed.attach()
        self.linear_terms = LinearTerms(model, lambda: self.executor.token_owner)
        self._scheduler = Scheduler(
            model,
            self.executor,
            tokenizer,
            eos_ids=lambda: eos_ids_of(model, tokenizer),
            pad_id=pad_id_of(model, tokenizer),
            unpadded=self.info.model_type in UNPADDED_FAMILIES,
            threads=self.base.threads,
            choose=self._choose_adapters,
            phase=None if offload is None else self.base.phase,
            fast_decode=FastDecode.of(model) if offload is None else None,
        )
        self._scheduler.max_batch_size = max_batch_size
        self._profiles: dict[str, RoutingProfile] = {}  # task routing profiles of "auto" candidates
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._base_fingerprint: str | None = None  # computed at the first adapter load
        self._closed = False

    @classmethod
    def from_pretrained(
        cls,
        model: str | Path,
        *,
        dtype: torch.dtype | str | None = None,
        offload: OffloadConfig | None = None,
    ) -> MultiAdapterEngine:
        """Load the base model and tokenizer from a local directory or ``demo``.

        With ``offload`` the routed experts stay on disk (tier ``disk``: never materialized in RAM)
        or in host memory (tier ``cpu``), and a budget of them is cached per layer on the compute
        device; see :mod:`moe_runtime.runtime.offload`. ``dtype`` is the compute dtype of every
        weight (``"auto"``: see :func:`~moe_runtime.models.compute_dtype`; None keeps the
        checkpoint's); offloaded experts stored narrower are widened as they are read.
        """
        if offload is not None:
            offload.validate()
            dtype = compute_dtype(dtype, offload.device(), _stored(model, dtype))
            net, info, store = load_offloaded_model(
                model, dtype=dtype, cache_dir=offload.cache_dir, pack=offload.pack
            )
            move_resident(net, offload.device())
            return cls(net, load_tokenizer(model), info=info, offload=OffloadedExperts(store, offload))
        dtype = compute_dtype(dtype, torch.device("cpu"), _stored(model, dtype))
        return cls(load_model(model, dtype=dtype), load_tokenizer(model))

    @property
    def offload(self):
        """The offload tier serving the base experts (its ``stats``, ``num_slots``, memory), or None."""
        return None if self.base.offloaded_to is None else self.base

    def close(self) -> None:
        """Detach the executor and restore the model's stock experts implementation.

        The engine serves nothing afterwards (a usage error says so); closing again does nothing.
        """
        if self._closed:
            return
        self.stop()
        self._closed = True
        self.linear_terms.close()
        self.executor.close()
        self.streamed.detach()
        uninstall(self.model, self.info)

    def _check_open(self) -> None:
        if self._closed:
            raise UsageError("this engine is closed (make a new one)")

    @contextlib.contextmanager
    def stock(self) -> Iterator[nn.Module]:
        """Temporarily run the bare base model with its stock experts implementation (baselines)."""
        if self.base.offloaded_to is not None:
            raise UsageError(
                f"the stock model is not available with offloaded experts (they are on the {self.base.offloaded_to} tier)"
            )
        self._check_open()
        self.executor.detach()
        self.streamed.detach()
        uninstall(self.model, self.info)
        try:
            yield self.model
        finally:
            install(self.model, self.info)
            self.executor.attach()
            self.streamed.attach()

    # adapters -------------------------------------------------------------------------------

    @property
    def adapters(self) -> list[str]:
        """Loaded adapter names."""
        return self.arena.names

    def add_adapter(
        self,
        name: str,
        adapter: str | Path | Any,
        *,
        allow_base_mismatch: bool = False,
        profile: str | Path | RoutingProfile | None = None,
    ) -> None:
        """Load an adapter (a directory, or an object a tuning method's ``read`` returned) as ``name``.

        Its method's serving hook checks it against the base model (names, shapes, expert ids,
        base fingerprint) and hands it over: an ESFT adapter's tuned experts go to arena slots, a
        routed-LoRA adapter gets an owner row of base experts and its LoRA terms run beside them; a
        peft LoRA adapter (ours or peft's own directory) gets merged copies of the experts it
        targets and low-rank terms on the linear layers it targets. Adapters with our metadata are refused on a base model other than the one they were tuned
        on (whole-model fingerprint) unless ``allow_base_mismatch``.

        ``profile`` (a routing profile directory or file, or a :class:`RoutingProfile`) is the task
        routing profile that makes the adapter a candidate for requests with adapter ``"auto"``;
        without it, the one the adapter directory stores (``routing_profile.json``, written by
        ``tune``) is used, if any.

        Raises:
            AdapterError: the name is taken, or the adapter is missing, corrupt, does not fit this
                base model, or changes weights every request shares (full).
            UsageError: an unreadable profile, or one of another model shape.
        """
        self._check_open()
        if name == AUTO:
            raise AdapterError(
                f"adapter name '{AUTO}' is reserved (requests name it to let the engine choose)"
            )
        self.arena.check_new_name(name)  # before any file is read
        directory = Path(adapter) if isinstance(adapter, (str, Path)) else getattr(adapter, "path", None)
        if isinstance(adapter, (str, Path)):
            method, adapter = read_adapter_dir(adapter)
        else:
            method = method_of(adapter)
        if profile is None and directory is not None:
            profile = load_routing_profile(directory, missing_ok=True)
        elif profile is not None and not isinstance(profile, RoutingProfile):
            profile = load_routing_profile(profile)
        if profile is not None:
            profile.check(self.info)
        if method.serve is None:
            raise AdapterError(
                f"adapter '{getattr(adapter, 'path', name)}': a '{method.stored_name}' adapter changes weights "
                "shared by every request and cannot be served per request (serve esft, LoRA or "
                "routed-lora adapters, or merge it into the model)"
            )
        with self._scheduler.step_lock, self._scheduler.lock:  # between steps; no submit meanwhile
            self.arena.check_new_name(name)
            method.serve(self, name, adapter, allow_base_mismatch)
            if profile is not None:
                self._profiles[name] = profile

    @property
    def profiled_adapters(self) -> list[str]:
        """Loaded adapters with a task routing profile: the candidates of ``"auto"`` requests."""
        return [name for name in self.arena.names if name in self._profiles]

    # the methods' serving hooks call back these (tuning.registry.ServingTarget) ------------------

    def base_fingerprint(self) -> str:
        """The base model's fingerprint (computed once; offloaded experts are read from their tier)."""
        if self._base_fingerprint is None:
            self._base_fingerprint = model_fingerprint(self.model, self.executor.base.expert_parts)
        return self._base_fingerprint

    def base_experts(self, experts: dict[int, list[int]]) -> contextlib.AbstractContextManager:
        """While open, the listed base experts are readable in the model's experts modules."""
        return self.executor.base.materialized(experts)

    def add_experts(self, name: str, adapter: TunedExperts) -> None:
        """Give ``name`` an owner row whose tuned experts live in arena slots."""
        self.arena.add(name, adapter)

    def add_term(self, name: str, term: TokenTerm) -> None:
        """Give ``name`` an owner row of base experts plus a per-token term run beside them."""
        self.executor.terms[self.arena.add_owner(name)] = term

    def add_linear_terms(self, name: str, terms: dict[str, nn.Module]) -> None:
        """Add ``terms[module name](x [N, in]) -> [N, out]`` to those linear layers' outputs for the
        tokens of ``name`` (already given an owner row by :meth:`add_experts` or :meth:`add_term`)."""
        self.linear_terms.add(self.arena.owner(name), terms)

    # ---------------------------------------------------------------------------------------------

    def remove_adapter(self, name: str) -> None:
        """Unload an adapter; its slots are reused by the next load.

        Raises:
            AdapterError: it is not loaded, or a live or waiting request names it.
        """
        with self._scheduler.step_lock, self._scheduler.lock:
            named = self._scheduler.named_adapters_locked()
            if name in named:
                raise AdapterError(
                    f"adapter '{name}' is named by {named[name]} pending request(s); "
                    "let them finish or cancel them before removing it"
                )
            self.executor.terms.pop(self.arena.owner(name), None)
            self.linear_terms.remove(self.arena.owner(name))
            self.arena.remove(name)
            self._profiles.pop(name, None)

    def compact(self) -> None:
        """Repack adapter slots so each layer holds exactly its live tuned experts in one chunk."""
        self.arena.compact()

    def memory(self) -> ArenaMemory:
        """Bytes and slots the adapters hold beyond the base model."""
        return self.arena.memory()

    def base_bytes(self) -> int:
        """Bytes of the base model's parameters and buffers."""
        tensors = list(self.model.parameters()) + list(self.model.buffers())
        return sum(t.numel() * t.element_size() for t in tensors)

    # requests -------------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Requests submitted and not yet finished (waiting or live)."""
        return self._scheduler.outstanding()

    @property
    def max_batch_size(self) -> int:
        """Requests decoded together at most (the background thread's and ``step()``'s limit)."""
        return self._scheduler.max_batch_size

    @max_batch_size.setter
    def max_batch_size(self, value: int) -> None:
        if value <= 0:
            raise UsageError(f"max_batch_size must be positive, got {value}")
        self._scheduler.max_batch_size = value

    def submit(
        self,
        requests: Request | Iterable[Request],
        config: DecodeConfig | None = None,
        *,
        claim: bool = False,
    ) -> RequestHandle | list[RequestHandle]:
        """Queue requests; they join the running batch at the next step.

        ``config`` gives the defaults of requests that do not set their own (token limit, sampling,
        EOS stops, logits); request i of a list samples with seed ``config.seed + i`` unless it has
        its own seed. Without it: 32 tokens, greedy unless the request sets a temperature.
        ``claim=True``: the caller reads the results through the handles only, so a :meth:`run` or
        :meth:`generate` in another thread never collects them (the HTTP server submits this way).

        Returns:
            A :class:`RequestHandle` (a list of them for a list of requests).

        Raises:
            AdapterError: a request names an adapter that is not loaded (or ``"auto"`` while no
                loaded adapter has a routing profile).
            UsageError: a bad prompt, token limit, temperature, top_p or stop list.
        """
        if config is not None:
            config.validate()
        if isinstance(requests, Request):
            return self._submit([requests], config, claim)[0]
        return self._submit(list(requests), config, claim)

    def _submit(
        self,
        batch: list[Request],
        config: DecodeConfig | None = None,
        claim: bool = False,
        quiet: bool = False,
    ) -> list[RequestHandle]:
        self._check_open()
        rows = []
        for offset, request in enumerate(batch):
            if not isinstance(request, Request):
                raise UsageError(f"expected a Request, got {type(request).__name__}")
            check_sampling(request)
            handle = RequestHandle(request, self._drive)
            handle._claimed = claim
            rows.append(
                Row(handle, self._encode(request), None, request.adapter, config, offset, quiet=quiet)
            )
            handle._row = rows[-1]
        with self._scheduler.lock:  # adapters do not change meanwhile (add/remove take this lock)
            for row in rows:
                if row.adapter == AUTO:
                    if not any(name in self._profiles for name in self.arena.names):
                        raise AdapterError(
                            f"request {row.request.id!r}: adapter 'auto' needs a loaded adapter with a "
                            "routing profile (tune writes one; or add_adapter(..., profile=DIR))"
                        )
                    row.adapter = None
                else:
                    row.owner = self.arena.owner(row.adapter)
            self._scheduler.enqueue_locked(rows)
        return [row.handle for row in rows]

    def cancel_pending(self) -> None:
        """Cancel every request not yet finished (waiting ones never start; live ones stop at the
        next step)."""
        for handle in self._scheduler.handles():
            handle.cancel()

    def step(self) -> int:
        """One scheduling iteration in this thread: admit and prefill waiting requests, one decode
        step for every live row, retire finished and cancelled ones.

        Returns:
            Requests still live or waiting.
        """
        self._check_open()
        return self._scheduler.step()

    def start(self) -> None:
        """Run ``step()`` in one background thread while there is work (idle otherwise)."""
        self._check_open()
        with self._scheduler.lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="moe-runtime-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop and join the background thread (live requests stay; a later ``step()`` or ``start()``
        goes on with them)."""
        with self._scheduler.lock:
            thread, self._stopping = self._thread, True
            self._scheduler.lock.notify_all()
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        self._thread = None

    @property
    def running(self) -> bool:
        """Whether the background thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def _loop(self) -> None:
        scheduler = self._scheduler
        while True:
            with scheduler.lock:
                while not self._stopping and not scheduler.has_work_locked():
                    scheduler.lock.wait()
                if self._stopping:
                    return
            try:
                scheduler.step()
            except Exception:  # the live requests failed with it (their handles raise it)
                continue

    def _drive(self) -> bool:
        """Run one step in the calling thread unless the background thread runs; True if it did."""
        if self.running:
            return False
        self._check_open()
        self._scheduler.step()
        return True

    def stream(self, request: Request, config: DecodeConfig | None = None) -> Iterator[StreamEvent]:
        """Submit ``request`` and yield its events (token ids and text deltas) as they are decoded.

        Closing the iterator before the final event (``break``, a client gone) cancels the request.
        """
        handle = self.submit(request, config)

        def events() -> Iterator[StreamEvent]:
            try:
                yield from handle.events()
            finally:
                if not handle.done:
                    handle.cancel()

        return events()

    def _encode(self, request: Request) -> list[int]:
        if isinstance(request.prompt, str) and self.tokenizer is None:
            raise UsageError(f"request {request.id!r}: a text prompt needs a tokenizer")
        ids = (
            list(request.prompt)
            if not isinstance(request.prompt, str)
            else list(self.tokenizer(request.prompt)["input_ids"])
        )
        vocab = self.model.get_input_embeddings().num_embeddings
        bad = [i for i in ids if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < vocab]
        if bad:
            raise UsageError(f"request {request.id!r}: token id {bad[0]!r} is not in [0, {vocab})")
        if not ids:
            bos = getattr(self.tokenizer, "bos_token_id", None)
            if bos is None:
                raise UsageError(f"request {request.id!r}: empty prompt (and the tokenizer has no BOS token)")
            ids = [int(bos)]
        return ids

    def run(self, config: DecodeConfig | None = None) -> list[Completion]:
        """Serve every request submitted and not yet returned (nor read through its handle) to the
        end; completions in submission order.

        ``config`` gives the defaults of requests that do not set their own (token limit, sampling:
        request i of the run samples with seed ``config.seed + i``) and the batch size.
        """
        self._check_open()
        config = config or DecodeConfig()
        config.validate()
        scheduler = self._scheduler
        with scheduler.step_lock:
            handles = scheduler.take_unclaimed()
            for i, handle in enumerate(handles):
                row = handle._row
                if row.text is None:  # not admitted yet
                    row.config, row.seed_offset = row.config or config, i
        while not all(h.done for h in handles):
            if self.running:
                waiting = next(h for h in handles if not h.done)
                waiting._wait(lambda h=waiting: h.done, None)
            else:
                self._check_open()
                scheduler.step(config.max_batch_size)
        return [h.result() for h in handles]

    def generate(self, requests: Iterable[Request], config: DecodeConfig | None = None) -> list[Completion]:
        """Submit ``requests`` and serve them (with anything already pending, which comes first)."""
        config = config or DecodeConfig()
        config.validate()
        self._submit(list(requests), config, quiet=True)  # the handles stay inside: no one streams them
        return self.run(config)

    def _choose_adapters(self, counts: dict[int, torch.Tensor]) -> list[tuple[str | None, int]]:
        """For each prompt (``counts {layer index: [B, E]}`` expert selections on the base model), the
        profiled adapter whose task routing profile is closest, and its owner id (the base model if
        none is loaded any more)."""
        names = self.profiled_adapters
        if not names:  # the candidates were removed while these requests waited: the base model
            return [(None, 0)] * next(iter(counts.values())).shape[0]
        profiles = [self._profiles[n] for n in names]
        chosen = closest_profile(counts, profiles)
        return [(names[i], self.arena.owner(names[i])) for i in chosen]

    @torch.no_grad()
    def prompt_logits(self, requests: list[Request]) -> list[torch.Tensor]:
        """Logits over each prompt in one mixed, left-padded forward (no generation).

        Returns:
            Per request ``[prompt length, V]``.
        """
        self._check_open()
        owners = [self.arena.owner(r.adapter) for r in requests]
        prompts = [self._encode(r) for r in requests]
        device = next(self.model.parameters()).device
        input_ids, mask, positions = left_pad(prompts, pad_id_of(self.model, self.tokenizer), device)
        with self._scheduler.step_lock:
            self.executor.set_owners(torch.tensor(owners, device=device), input_ids.shape[1], mask)
            try:
                tag = self._scheduler.phase("prefill", sum(len(p) for p in prompts))
                with self.base.threads(), tag:
                    logits = self.model(
                        input_ids=input_ids, attention_mask=mask, position_ids=positions
                    ).logits
            finally:
                self.executor.clear_owners()
        return [logits[i, input_ids.shape[1] - len(p) :] for i, p in enumerate(prompts)]
