"""Requests and completions of the serving engine, and the JSONL requests file of ``generate``.

A requests line is ``{"id": ..., "prompt": "...", "adapter": "NAME", "auto" or null, "max_new_tokens": N,
"temperature": T, "top_p": P, "seed": S, "stop": [...]}`` (only ``prompt`` is required); an output line is
``{"id", "adapter", "completion", "token_ids"}`` (``adapter``: the one used, also for ``"auto"``).
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import UsageError

__all__ = ["AUTO", "Completion", "DecodeConfig", "Request", "StreamEvent", "check_sampling", "read_requests"]

AUTO = "auto"
"""The adapter name that lets the engine choose the adapter whose routing profile fits the prompt."""


@dataclass
class Request:
    """One generation request.

    Attributes:
        prompt: text (tokenized as ``tokenizer(prompt)`` does) or token ids.
        adapter: name of a loaded adapter, None for the base model, or ``"auto"`` (the loaded adapter
            whose task routing profile is closest to the prompt's routing).
        max_new_tokens: tokens to generate at most; None takes the default (``DecodeConfig``, 32).
        id: echoed in the completion.
        temperature: None or 0: greedy (unless ``generate``'s ``DecodeConfig`` samples); > 0: sample.
        top_p: nucleus mass for sampling (default 1).
        seed: seed of this request's own sampling generator (default 0), so its tokens never depend
            on what else is batched.
        stop: strings that end generation; the completion text is cut before the first one found.
    """

    prompt: str | list[int]
    adapter: str | None = None
    max_new_tokens: int | None = None
    id: Any = None
    _: KW_ONLY
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] | None = None


@dataclass
class StreamEvent:
    """What one request produced since its previous event.

    Attributes:
        token_ids: the new token ids (may be empty in the final event).
        text: the new text (a delta; "" while a multi-byte character is incomplete or while the text
            might be the start of a stop string; never text of a stop string).
        finish_reason: None until the final event, then ``"stop"`` (EOS or a stop string),
            ``"length"`` or ``"cancelled"``.
    """

    token_ids: list[int]
    text: str
    finish_reason: str | None = None


@dataclass
class Completion:
    """The result of one request.

    Attributes:
        id: as in the request.
        adapter: the adapter used (for ``"auto"``, the one chosen; None: the base model).
        completion: the generated text (special tokens skipped; cut before a stop string).
        token_ids: generated ids only, ending with the EOS id when generation stopped on it.
        logits: ``[len(token_ids), V]`` logits each token was chosen from, when requested.
        finish_reason: ``"stop"`` (EOS or a stop string), ``"length"`` or ``"cancelled"``.
        prompt_tokens: tokens in the prompt.
    """

    id: Any
    adapter: str | None
    completion: str
    token_ids: list[int]
    logits: torch.Tensor | None = field(default=None, repr=False)
    finish_reason: str = "length"
    prompt_tokens: int = 0

    def to_json(self) -> dict:
        """The output line of ``moe-runtime generate``."""
        return {
            "id": self.id,
            "adapter": self.adapter,
            "completion": self.completion,
            "token_ids": self.token_ids,
        }


@dataclass
class DecodeConfig:
    """How requests are decoded and batched.

    Attributes:
        max_new_tokens: default for requests that do not set it.
        do_sample: sample instead of greedy decoding.
        temperature, top_p: sampling distribution (softmax temperature, nucleus mass).
        seed: sampling seed; request i of a run samples from its own generator seeded ``seed + i``,
            so its tokens do not depend on what else is in the batch.
        stop_on_eos: finish a request when it emits an EOS id (off for fixed-length benchmarks).
        max_batch_size: requests decoded together; more are served in successive batches.
        output_logits: keep each request's per-step logits in ``Completion.logits``.
    """

    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    stop_on_eos: bool = True
    max_batch_size: int = 64
    output_logits: bool = False

    def validate(self) -> None:
        """Raises UsageError naming the first bad field."""
        if self.max_new_tokens <= 0:
            raise UsageError(f"max_new_tokens must be positive, got {self.max_new_tokens}")
        if self.max_batch_size <= 0:
            raise UsageError(f"max_batch_size must be positive, got {self.max_batch_size}")
        if not self.temperature > 0:
            raise UsageError(f"temperature must be positive, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UsageError(f"top_p must lie in (0, 1], got {self.top_p}")


def _request_of(obj: object, where: str) -> Request:
    if not isinstance(obj, dict):
        raise UsageError(f"{where}: expected a JSON object with a 'prompt'")
    known = {"id", "prompt", "adapter", "max_new_tokens", "temperature", "top_p", "seed", "stop"}
    unknown = sorted(set(obj) - known)
    if unknown:
        raise UsageError(f"{where}: unknown key '{unknown[0]}'")
    prompt = obj.get("prompt")
    if not isinstance(prompt, str):
        raise UsageError(f"{where}: 'prompt' must be a string")
    adapter = obj.get("adapter")
    if adapter is not None and (not isinstance(adapter, str) or not adapter):
        raise UsageError(f"{where}: 'adapter' must be an adapter name, 'auto' or null")
    max_new = obj.get("max_new_tokens")
    if max_new is not None and (isinstance(max_new, bool) or not isinstance(max_new, int) or max_new <= 0):
        raise UsageError(f"{where}: 'max_new_tokens' must be a positive integer")
    numbers = {}
    for key in ("temperature", "top_p"):
        value = obj.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise UsageError(f"{where}: '{key}' must be a number")
        numbers[key] = None if value is None else float(value)
    seed = obj.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise UsageError(f"{where}: 'seed' must be an integer")
    stop = obj.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop)):
        raise UsageError(f"{where}: 'stop' must be a non-empty string or a list of them")
    request = Request(prompt, adapter, max_new, obj.get("id"), seed=seed, stop=stop, **numbers)
    try:
        check_sampling(request)
    except UsageError as exc:
        raise UsageError(f"{where}: {exc}") from None
    return request


def check_sampling(request: Request) -> None:
    """Raises UsageError naming the first bad sampling field or token limit of ``request``."""
    if request.max_new_tokens is not None and (
        isinstance(request.max_new_tokens, bool)
        or not isinstance(request.max_new_tokens, int)
        or request.max_new_tokens <= 0
    ):
        raise UsageError(f"request {request.id!r}: max_new_tokens must be a positive integer")
    if request.temperature is not None and not (0 <= request.temperature < float("inf")):
        raise UsageError(f"request {request.id!r}: temperature must be >= 0, got {request.temperature}")
    if request.top_p is not None and not 0 < request.top_p <= 1:
        raise UsageError(f"request {request.id!r}: top_p must lie in (0, 1], got {request.top_p}")
    if request.stop is not None and (
        isinstance(request.stop, str) or not all(isinstance(s, str) and s for s in request.stop)
    ):
        raise UsageError(f"request {request.id!r}: stop must be a list of non-empty strings")


def read_requests(path: str | Path, *, adapters: Collection[str] | None = None) -> list[Request]:
    """Read a JSONL requests file (blank lines skipped); a missing ``id`` becomes the line number.

    Args:
        path: the requests file.
        adapters: if given, the adapter names requests may use.

    Raises:
        UsageError: naming the file, line and key of the first malformed request, or of a
            request naming an adapter not in ``adapters``.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8-sig").split("\n")  # not splitlines: U+2028 is text in JSON
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: unreadable ({exc})") from None
    requests, implicit, explicit = [], [], set()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise UsageError(f"{where}: not valid JSON ({exc})") from None
        request = _request_of(obj, where)
        if adapters is not None and request.adapter not in (None, AUTO) and request.adapter not in adapters:
            loaded = ", ".join(adapters) or "none"
            raise UsageError(f"{where}: adapter '{request.adapter}' is not loaded (loaded: {loaded})")
        if request.id is None:
            request.id = number
            implicit.append(number)
        elif isinstance(request.id, (str, int, float)):  # any JSON value may be an id
            explicit.add(request.id)
        requests.append(request)
    if not requests:
        raise UsageError(f"{path}: no requests")
    clash = next((number for number in implicit if number in explicit), None)
    if clash is not None:
        raise UsageError(
            f"{path}:{clash}: a request without an id gets its line number, {clash}, which another request "
            "uses as its id (give every request an id)"
        )
    return requests
