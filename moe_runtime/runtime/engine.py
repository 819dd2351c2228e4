"""Multi-adapter serving in one process: one base model, many adapters (ESFT, routed LoRA), mixed batches.

    engine = MultiAdapterEngine.from_pretrained("demo")
    engine.add_adapter("arith", "adapters/arith")        # tuned experts -> arena slots
    engine.add_adapter("rl", "adapters/rl")              # routed LoRA -> owner row + LoRA terms
    engine.generate([Request("12 + 35 =", adapter="arith"), Request("def f(", adapter=None)])
    engine.remove_adapter("arith")                       # slots and owner row freed for reuse

Requests of different adapters run together: the engine tells the slot-routed executor the owner of
every row before each forward, and the generation loop drops finished rows from the batch. Adapters
are read and handed over by their tuning method (``tuning.registry``); the base experts are the
model's own or an offload tier's (``runtime.executor.BaseExperts``).
"""

from __future__ import annotations

import contextlib
import itertools
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
from .generation import generate_batch, left_pad
from .linear_terms import LinearTerms
from .offload import OffloadConfig, OffloadedExperts, load_offloaded_model
from .offload.host import move_resident
from .requests import Completion, DecodeConfig, Request

__all__ = ["MultiAdapterEngine", "eos_ids_of", "pad_id_of"]


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
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer=None,
        *,
        info: MoEModelInfo | None = None,
        max_chunks: int | None = 1,
        offload: OffloadedExperts | None = None,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.info = install(model, info)
        self.base: BaseExperts = ResidentExperts() if offload is None else offload.tier(self.info)
        self.arena = ExpertArena(self.info, max_chunks=max_chunks, base_segment=self.base.segment)
        self.executor = SlotRoutedExecutor(self.arena, self.base)
        self.executor.attach()
        self.linear_terms = LinearTerms(model, lambda: self.executor.token_owner)
        # with the prompt's token ids and the owner id (checked once, at submit; an adapter named by
        # a pending request cannot be removed, so the id stays valid)
        self._pending: list[tuple[Request, list[int], int]] = []
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
        self._closed = True
        self.linear_terms.close()
        self.executor.close()
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
        uninstall(self.model, self.info)
        try:
            yield self.model
        finally:
            install(self.model, self.info)
            self.executor.attach()

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
    ) -> None:
        """Load an adapter (a directory, or an object a tuning method's ``read`` returned) as ``name``.

        Its method's serving hook checks it against the base model (names, shapes, expert ids,
        base fingerprint) and hands it over: an ESFT adapter's tuned experts go to arena slots, a
        routed-LoRA adapter gets an owner row of base experts and its LoRA terms run beside them; a
        peft LoRA adapter (ours or peft's own directory) gets merged copies of the experts it
        targets and low-rank terms on the linear layers it targets. Adapters with our metadata are refused on a base model other than the one they were tuned
        on (whole-model fingerprint) unless ``allow_base_mismatch``.

        Raises:
            AdapterError: the name is taken, or the adapter is missing, corrupt, does not fit this
                base model, or changes weights every request shares (full).
        """
        self._check_open()
        self.arena.check_new_name(name)  # before any file is read
        if isinstance(adapter, (str, Path)):
            method, adapter = read_adapter_dir(adapter)
        else:
            method = method_of(adapter)
        if method.serve is None:
            raise AdapterError(
                f"adapter '{getattr(adapter, 'path', name)}': a '{method.stored_name}' adapter changes weights "
                "shared by every request and cannot be served per request (serve esft, LoRA or "
                "routed-lora adapters, or merge it into the model)"
            )
        method.serve(self, name, adapter, allow_base_mismatch)

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
            AdapterError: it is not loaded, or a pending request names it.
        """
        waiting = [r.id for r, _, _ in self._pending if r.adapter == name]
        if waiting:
            raise AdapterError(
                f"adapter '{name}' is named by {len(waiting)} pending request(s) (first id {waiting[0]!r}); "
                "run or cancel them before removing it"
            )
        self.executor.terms.pop(self.arena.owner(name), None)
        self.linear_terms.remove(self.arena.owner(name))
        self.arena.remove(name)

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
        """Requests submitted and not yet served."""
        return len(self._pending)

    def submit(self, requests: Request | Iterable[Request]) -> None:
        """Queue requests for the next :meth:`run`.

        Raises:
            AdapterError: a request names an adapter that is not loaded.
            UsageError: a bad prompt or token limit.
        """
        self._check_open()
        batch = [requests] if isinstance(requests, Request) else list(requests)
        encoded = []
        for request in batch:
            owner = self.arena.owner(request.adapter)
            if request.max_new_tokens is not None and request.max_new_tokens <= 0:
                raise UsageError(f"request {request.id!r}: max_new_tokens must be positive")
            encoded.append((request, self._encode(request), owner))
        self._pending.extend(encoded)

    def cancel_pending(self) -> None:
        """Drop every queued request."""
        self._pending.clear()

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
        """Serve every pending request in mixed batches; completions in submission order."""
        self._check_open()
        config = config or DecodeConfig()
        config.validate()
        pending, self._pending = self._pending, []
        try:
            with self.base.threads():
                return self._serve(*map(list, zip(*pending)), config) if pending else []
        except BaseException:
            self._pending = pending + self._pending
            raise

    def generate(self, requests: Iterable[Request], config: DecodeConfig | None = None) -> list[Completion]:
        """Submit ``requests`` and serve them (with anything already pending, which comes first)."""
        self.submit(requests)
        return self.run(config)

    def _serve(
        self, requests: list[Request], prompts: list[list[int]], owner_ids: list[int], config: DecodeConfig
    ) -> list[Completion]:
        device = next(self.model.parameters()).device
        owners = torch.tensor(owner_ids, dtype=torch.int64, device=device)
        limits = [r.max_new_tokens or config.max_new_tokens for r in requests]
        eos, pad = eos_ids_of(self.model, self.tokenizer), pad_id_of(self.model, self.tokenizer)
        order = sorted(range(len(requests)), key=lambda i: len(prompts[i]))
        groups = [order]
        if self.info.model_type in UNPADDED_FAMILIES:  # one prompt length per wave: no row is padded
            groups = [list(g) for _, g in itertools.groupby(order, key=lambda i: len(prompts[i]))]
        waves = [
            g[s : s + config.max_batch_size] for g in groups for s in range(0, len(g), config.max_batch_size)
        ]
        results: list[Completion | None] = [None] * len(requests)
        for wave in waves:
            wave_owners = owners[torch.tensor(wave, device=device)]

            def before_forward(rows: torch.Tensor, seq_len: int, wave_owners=wave_owners) -> None:
                self.executor.set_owners(wave_owners[rows], seq_len)

            try:
                generated = generate_batch(
                    self.model,
                    [prompts[i] for i in wave],
                    [limits[i] for i in wave],
                    config=config,
                    eos_ids=eos,
                    pad_id=pad,
                    before_forward=before_forward,
                    seeds=[config.seed + i for i in wave],
                )
            finally:
                self.executor.clear_owners()
            for i, out in zip(wave, generated):
                text = (
                    self.tokenizer.decode(out.token_ids, skip_special_tokens=True) if self.tokenizer else ""
                )
                results[i] = Completion(requests[i].id, requests[i].adapter, text, out.token_ids, out.logits)
        return results  # type: ignore[return-value]

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
        self.executor.set_owners(torch.tensor(owners, device=device), input_ids.shape[1])
        try:
            with self.base.threads():
                logits = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions).logits
        finally:
            self.executor.clear_owners()
        return [logits[i, input_ids.shape[1] - len(p) :] for i, p in enumerate(prompts)]
