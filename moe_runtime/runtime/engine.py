"""Multi-adapter serving in one process: one base model, many ESFT adapters, mixed batches.

    engine = MultiAdapterEngine.from_pretrained("demo")
    engine.add_adapter("arith", "adapters/arith")        # tuned experts -> arena slots
    engine.add_adapter("rl", "adapters/rl")              # routed LoRA -> owner row + LoRA terms
    engine.generate([Request("12 + 35 =", adapter="arith"), Request("def f(", adapter=None)])
    engine.remove_adapter("arith")                       # slots and owner row freed for reuse

Requests of different adapters run together: the engine tells the rerouting executor the owner of
every row before each forward, and the generation loop drops finished rows from the batch.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import nn

from ..errors import AdapterError, UsageError
from ..models import MoEModelInfo, install, load_model, load_tokenizer, model_fingerprint, uninstall
from ..tuning.esft import ESFTAdapter, read_adapter
from ..tuning.routed_lora import RoutedLoraAdapter, read_routed_lora
from .arena import ArenaMemory, ExpertArena
from .executor import ReroutingExecutor
from .generation import generate_batch, left_pad
from .offload import OffloadConfig, OffloadedExperts, load_offloaded_model
from .offload.host import move_resident
from .requests import Completion, DecodeConfig, Request

__all__ = ["MultiAdapterEngine", "eos_ids_of", "pad_id_of", "UNPADDED_FAMILIES"]

UNPADDED_FAMILIES = frozenset(
    {"deepseek_v32", "deepseek_v4", "dots3_note_text", "glm_moe_dsa", "granitemoe_swa"}
)
"""Families whose transformers code gives left-padded rows other tokens than the prompt alone
(compressed / indexed sparse attention; granitemoe_swa's sliding window turns padded rows into NaN):
their requests are batched with prompts of the same length only."""


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


class MultiAdapterEngine:
    """A base model serving many ESFT adapters at once.

    Args:
        model: a transformers causal LM with fused experts (its weights are never modified).
        tokenizer: needed for text prompts and completions (token-id prompts work without).
        info: the model's MoE layers, if already discovered.
        max_chunks: adapter chunks a layer may hold before it is repacked (see :class:`ExpertArena`).
        offload: base experts left on disk (a model from :func:`load_offloaded_model`); None keeps
            them resident. See :meth:`from_pretrained`.
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
        self.arena = ExpertArena(self.info, max_chunks=max_chunks)
        # offload: begin
        self.offload = offload
        self.executor = ReroutingExecutor(self.arena) if offload is None else offload.executor(self.arena)
        # offload: end
        self.executor.attach()
        self._pending: list[tuple[Request, list[int]]] = []  # with the prompt's token ids
        self._base_fingerprint: str | None = None  # computed at the first routed-LoRA load
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
        device; see :mod:`moe_runtime.runtime.offload`.
        """
        # offload: begin
        if offload is not None:
            offload.validate()
            net, info, store = load_offloaded_model(model, dtype=dtype, cache_dir=offload.cache_dir)
            move_resident(net, offload.device())
            return cls(net, load_tokenizer(model), info=info, offload=OffloadedExperts(store, offload))
        # offload: end
        return cls(load_model(model, dtype=dtype), load_tokenizer(model))

    def close(self) -> None:
        """Detach the executor and restore the model's stock experts implementation.

        The engine serves nothing afterwards (a usage error says so); closing again does nothing.
        """
        if self._closed:
            return
        self._closed = True
        if self.offload is not None:  # offload: detach and stop the loader threads
            self.executor.close()
        else:
            self.executor.detach()
        uninstall(self.model, self.info)

    def _check_open(self) -> None:
        if self._closed:
            raise UsageError("this engine is closed (make a new one)")

    @contextlib.contextmanager
    def stock(self) -> Iterator[nn.Module]:
        """Temporarily run the bare base model with its stock experts implementation (baselines)."""
        if self.offload is not None:  # offload
            raise UsageError(
                f"the stock model is not available with offloaded experts (they are on the {self.offload.config.tier} tier)"
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

    def add_adapter(self, name: str, adapter: str | Path | ESFTAdapter | RoutedLoraAdapter) -> None:
        """Load an ESFT adapter (a directory, official layout or ours) or a routed-LoRA adapter under ``name``.

        The adapter is checked against the base model first (names, shapes, expert ids, base
        fingerprint); only its tuned experts are kept, in arena slots. A routed-LoRA adapter gets an
        owner row of base experts and its LoRA modules run beside them.

        Raises:
            AdapterError: the name is taken, or the adapter is missing, corrupt, does not fit this
                base model, or tunes weights other than routed experts.
        """
        self._check_open()
        if name in self.arena.names:
            raise AdapterError(f"adapter '{name}' is already loaded")
        if self._add_routed_lora(name, adapter):
            return
        if not isinstance(adapter, ESFTAdapter):
            from ..tuning.meta import read_meta

            method = (read_meta(Path(adapter)) or {}).get("method", "esft")
            if method != "esft":
                raise AdapterError(
                    f"adapter '{adapter}': a '{method}' adapter changes weights shared by every request and "
                    "cannot be served per request (serve esft or routed-lora adapters, or merge it into the model)"
                )
            adapter = read_adapter(adapter)
        # offload: the check reads the base experts the adapter replaces (ids checked first)
        adapter.check_selection(self.info)
        reading = (
            contextlib.nullcontext()
            if self.offload is None
            else self.executor.base_experts(adapter.selection.experts)
        )
        with reading:
            adapter.check(self.model, self.info)
        self.arena.add(name, adapter)

    # routed-LoRA adapters (issue 8) -------------------------------------------------------------

    def _add_routed_lora(self, name: str, adapter) -> bool:
        """Load ``adapter`` if it is a routed-LoRA adapter (object or directory); False otherwise."""
        from ..tuning.meta import read_meta
        from ..tuning.routed_lora import METHOD

        if isinstance(adapter, (str, Path)) and (read_meta(Path(adapter)) or {}).get("method") == METHOD:
            adapter = read_routed_lora(adapter)
        if not isinstance(adapter, RoutedLoraAdapter):
            return False
        if self._base_fingerprint is None:
            parts = None if self.offload is None else self.executor.expert_parts  # offload
            self._base_fingerprint = model_fingerprint(self.model, parts)
        lora = adapter.build(self.model, self.info, base_fingerprint=self._base_fingerprint)
        self.executor.lora[self.arena.add_owner(name)] = lora
        return True

    # ---------------------------------------------------------------------------------------------

    def remove_adapter(self, name: str) -> None:
        """Unload an adapter; its slots are reused by the next load.

        Raises:
            AdapterError: it is not loaded, or a pending request names it.
        """
        waiting = [r.id for r, _ in self._pending if r.adapter == name]
        if waiting:
            raise AdapterError(
                f"adapter '{name}' is named by {len(waiting)} pending request(s) (first id {waiting[0]!r}); "
                "run or cancel them before removing it"
            )
        self.executor.lora.pop(self.arena.owner(name), None)
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
            self.arena.owner(request.adapter)
            if request.max_new_tokens is not None and request.max_new_tokens <= 0:
                raise UsageError(f"request {request.id!r}: max_new_tokens must be positive")
            encoded.append((request, self._encode(request)))
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
            return self._serve([r for r, _ in pending], [p for _, p in pending], config)
        except BaseException:
            self._pending = pending + self._pending
            raise

    def generate(self, requests: Iterable[Request], config: DecodeConfig | None = None) -> list[Completion]:
        """Submit ``requests`` and serve them (with anything already pending, which comes first)."""
        self.submit(requests)
        return self.run(config)

    def _serve(
        self, requests: list[Request], prompts: list[list[int]], config: DecodeConfig
    ) -> list[Completion]:
        device = next(self.model.parameters()).device
        owners = torch.tensor(
            [self.arena.owner(r.adapter) for r in requests], dtype=torch.int64, device=device
        )
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
            logits = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions).logits
        finally:
            self.executor.clear_owners()
        return [logits[i, input_ids.shape[1] - len(p) :] for i, p in enumerate(prompts)]
