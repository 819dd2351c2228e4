"""Requests and completions of the serving engine, and the JSONL requests file of ``generate``.

A requests line is ``{"id": ..., "prompt": "...", "adapter": "NAME" or null, "max_new_tokens": N}``
(only ``prompt`` is required); an output line is ``{"id", "adapter", "completion", "token_ids"}``.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import UsageError

__all__ = ["Completion", "DecodeConfig", "Request", "read_requests"]


@dataclass
class Request:
    """One generation request.

    Attributes:
        prompt: text (tokenized as ``tokenizer(prompt)`` does) or token ids.
        adapter: name of a loaded adapter, or None for the base model.
        max_new_tokens: tokens to generate at most; None takes ``DecodeConfig.max_new_tokens``.
        id: echoed in the completion.
    """

    prompt: str | list[int]
    adapter: str | None = None
    max_new_tokens: int | None = None
    id: Any = None


@dataclass
class Completion:
    """The result of one request.

    Attributes:
        id, adapter: as in the request.
        completion: the generated text (special tokens skipped).
        token_ids: generated ids only, ending with the EOS id when generation stopped on it.
        logits: ``[len(token_ids), V]`` logits each token was chosen from, when requested.
    """

    id: Any
    adapter: str | None
    completion: str
    token_ids: list[int]
    logits: torch.Tensor | None = field(default=None, repr=False)

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
    unknown = sorted(set(obj) - {"id", "prompt", "adapter", "max_new_tokens"})
    if unknown:
        raise UsageError(f"{where}: unknown key '{unknown[0]}'")
    prompt = obj.get("prompt")
    if not isinstance(prompt, str):
        raise UsageError(f"{where}: 'prompt' must be a string")
    adapter = obj.get("adapter")
    if adapter is not None and (not isinstance(adapter, str) or not adapter):
        raise UsageError(f"{where}: 'adapter' must be an adapter name or null")
    max_new = obj.get("max_new_tokens")
    if max_new is not None and (isinstance(max_new, bool) or not isinstance(max_new, int) or max_new <= 0):
        raise UsageError(f"{where}: 'max_new_tokens' must be a positive integer")
    return Request(prompt=prompt, adapter=adapter, max_new_tokens=max_new, id=obj.get("id"))


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
        if adapters is not None and request.adapter is not None and request.adapter not in adapters:
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
