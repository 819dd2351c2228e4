"""OpenAI's completions and chat completions bodies <-> engine requests and results (no HTTP here).

A body is checked field by field; the first problem raises :class:`BadRequest` naming the field
(the server answers it with HTTP 400 and an OpenAI-style error body). Supported: ``model`` (``base``,
a loaded adapter name or ``auto``), ``prompt`` / ``messages``, ``max_tokens`` (chat also
``max_completion_tokens``), ``temperature`` (0 = greedy), ``top_p``, ``seed``, ``stop``, ``stream``,
``stream_options.include_usage`` and ``n = 1``. Fields that do not change the tokens (``user``,
``metadata``, ...) are ignored; fields asking for what the engine cannot do (``n > 1``, penalties,
logprobs, tools, ...) are refused. ``return_token_ids: true`` (vLLM's extension) adds the generated
token ids to every choice.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "BadRequest",
    "GenerationParams",
    "chat_body",
    "chat_chunk",
    "completion_body",
    "completion_chunk",
    "error_body",
    "parse_chat",
    "parse_completion",
    "usage_of",
]

BASE, AUTO = "base", "auto"
"""Model names that are not adapters: the base model, and the engine's automatic choice."""

_INT64 = 2**63
_CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


class BadRequest(Exception):
    """A request the server refuses (HTTP ``status``), with OpenAI's error fields."""

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status: int = 400,
        type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.type = message, param, code, status, type

    def body(self) -> dict:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(
    message: str, *, type: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict:
    """``{"error": {"message", "type", "param", "code"}}`` as OpenAI's API answers errors."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


@dataclass
class GenerationParams:
    """One checked request: what to run and how to answer it.

    Attributes:
        model: the name the client used (``base``, an adapter, ``auto``).
        adapter: the engine's adapter argument (None for the base model).
        prompt: text, or token ids (chat prompts are templated here, so they are ids).
        max_tokens, temperature, top_p, seed, stop: as the engine's ``Request`` takes them
            (temperature 0 = greedy).
        stream: answer with server-sent events.
        include_usage: a last streamed chunk carries the usage.
        return_token_ids: choices carry ``token_ids`` too.
    """

    model: str
    adapter: str | None
    prompt: str | list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    return_token_ids: bool = False

    def request(self, request_id: str):
        """The engine request (``moe_runtime.runtime.Request``)."""
        from ..runtime.requests import Request

        return Request(
            self.prompt,
            adapter=self.adapter,
            max_new_tokens=self.max_tokens,
            id=request_id,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            stop=list(self.stop) or None,
        )


# field checks ------------------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


def _kind(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array"}
    names.update({dict: "an object", type(None): "null"})
    return names.get(type(value), type(value).__name__)


def _bool(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise BadRequest(f"'{name}' must be a boolean, got {_kind(value)}", param=name)
    return value


def _model(body: dict, models: Collection[str]) -> tuple[str, str | None]:
    name = body.get("model")
    if name is None:
        raise BadRequest("'model' is required: 'base', 'auto' or a loaded adapter name", param="model")
    if not isinstance(name, str):
        raise BadRequest(f"'model' must be a string, got {_kind(name)}", param="model")
    if name not in models:
        raise BadRequest(
            f"model '{name}' is not served (available: {', '.join(models)})",
            param="model",
            code="model_not_found",
        )
    return name, None if name == BASE else name


def _max_tokens(body: dict, default: int, names: tuple[str, ...]) -> int:
    given = [n for n in names if body.get(n) is not None]
    if not given:
        return default
    name = given[0]
    value = body[name]
    if not _is_int(value):
        raise BadRequest(f"'{name}' must be an integer, got {_kind(value)}", param=name)
    if value < 1:
        raise BadRequest(f"'{name}' must be at least 1, got {value}", param=name)
    return value


def _sampling(body: dict) -> tuple[float, float, int]:
    temperature = body.get("temperature")
    if temperature is None:
        temperature = 1.0  # OpenAI's default: sampling; 0 asks for greedy decoding
    elif not _is_number(temperature) or temperature < 0:
        raise BadRequest(f"'temperature' must be a number >= 0, got {temperature!r}", param="temperature")
    top_p = body.get("top_p")
    if top_p is None:
        top_p = 1.0
    elif not _is_number(top_p) or not 0 < top_p <= 1:
        raise BadRequest(f"'top_p' must be a number in (0, 1], got {top_p!r}", param="top_p")
    seed = body.get("seed")
    if seed is None:
        seed = secrets.randbits(32)  # as OpenAI's API: without a seed, runs differ
    elif not _is_int(seed) or not -_INT64 <= seed < _INT64:
        raise BadRequest(f"'seed' must be a 64-bit integer, got {seed!r}", param="seed")
    return float(temperature), float(top_p), int(seed)


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise BadRequest("'stop' must be a string or an array of strings", param="stop")
    if any(not s for s in stops):
        raise BadRequest("'stop' strings must not be empty", param="stop")
    return stops


def _stream(body: dict) -> tuple[bool, bool]:
    stream = _bool(body, "stream")
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not isinstance(options, dict):
        raise BadRequest(f"'stream_options' must be an object, got {_kind(options)}", param="stream_options")
    if not stream:
        raise BadRequest("'stream_options' goes with 'stream': true", param="stream_options")
    usage = options.get("include_usage")
    if usage is not None and not isinstance(usage, bool):
        raise BadRequest("'stream_options.include_usage' must be a boolean", param="stream_options")
    return stream, bool(usage)


def _refuse_unsupported(body: dict, chat: bool) -> None:
    """Fields whose non-default values would change the answer in ways the engine cannot."""
    n = body.get("n")
    if n is not None and n != 1:
        raise BadRequest(f"'n' must be 1 (one choice per request), got {n!r}", param="n")
    for name, neutral in (("presence_penalty", 0), ("frequency_penalty", 0), ("best_of", 1)):
        value = body.get(name)
        if value is not None and value != neutral:
            raise BadRequest(f"'{name}' is not supported (leave it out or set {neutral})", param=name)
    if body.get("logit_bias"):
        raise BadRequest("'logit_bias' is not supported", param="logit_bias")
    if chat:
        if body.get("logprobs") or body.get("top_logprobs"):
            raise BadRequest("'logprobs' is not supported", param="logprobs")
        if body.get("tools") or body.get("functions"):
            raise BadRequest("tools and functions are not supported", param="tools")
        fmt = body.get("response_format")
        if fmt is not None and fmt != {"type": "text"}:
            raise BadRequest('\'response_format\' must be {"type": "text"}', param="response_format")
    else:
        if body.get("logprobs") is not None:
            raise BadRequest("'logprobs' is not supported", param="logprobs")
        if body.get("echo"):
            raise BadRequest("'echo' is not supported", param="echo")
        if body.get("suffix"):
            raise BadRequest("'suffix' is not supported", param="suffix")


def _prompt(body: dict) -> str | list[int]:
    prompt = body.get("prompt")
    if prompt is None:
        raise BadRequest("'prompt' is required", param="prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        if any(t < 0 for t in prompt):
            raise BadRequest("'prompt' token ids must not be negative", param="prompt")
        return list(prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        raise BadRequest("'prompt' must be one prompt (send one request per prompt)", param="prompt")
    raise BadRequest("'prompt' must be a string or a non-empty array of token ids", param="prompt")


def _common(body: object, models: Collection[str], default_max_tokens: int, chat: bool) -> dict:
    if not isinstance(body, dict):
        raise BadRequest(f"the request body must be a JSON object, got {_kind(body)}")
    model, adapter = _model(body, models)
    _refuse_unsupported(body, chat)
    names = ("max_completion_tokens", "max_tokens") if chat else ("max_tokens",)
    temperature, top_p, seed = _sampling(body)
    stream, include_usage = _stream(body)
    return {
        "model": model,
        "adapter": adapter,
        "max_tokens": _max_tokens(body, default_max_tokens, names),
        "temperature": temperature,
        "top_p": top_p,
        "seed": seed,
        "stop": _stop(body),
        "stream": stream,
        "include_usage": include_usage,
        "return_token_ids": _bool(body, "return_token_ids"),
    }


def parse_completion(body: object, *, models: Collection[str], default_max_tokens: int) -> GenerationParams:
    """Check a ``/v1/completions`` body.

    Args:
        body: the decoded JSON.
        models: the names ``model`` may take.
        default_max_tokens: for a body without ``max_tokens``.

    Raises:
        BadRequest: naming the first bad field.
    """
    common = _common(body, models, default_max_tokens, chat=False)
    return GenerationParams(prompt=_prompt(body), **common)  # type: ignore[arg-type]


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if messages is None:
        raise BadRequest("'messages' is required", param="messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty array", param="messages")
    out = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise BadRequest(f"'{where}' must be an object", param=where)
        role, content = message.get("role"), message.get("content")
        if role not in _CHAT_ROLES:
            raise BadRequest(
                f"'{where}.role' must be one of {', '.join(_CHAT_ROLES)}, got {role!r}", param=where
            )
        if isinstance(content, list):  # content parts: text only
            texts = []
            for part in content:
                if not (
                    isinstance(part, dict)
                    and part.get("type") == "text"
                    and isinstance(part.get("text"), str)
                ):
                    raise BadRequest(f"'{where}.content' parts must be text parts", param=where)
                texts.append(part["text"])
            content = "".join(texts)
        if not isinstance(content, str):
            raise BadRequest(f"'{where}.content' must be a string or an array of text parts", param=where)
        out.append({"role": role, "content": content})
    return out


def parse_chat(
    body: object, *, models: Collection[str], default_max_tokens: int, tokenizer
) -> GenerationParams:
    """Check a ``/v1/chat/completions`` body and template its messages with the tokenizer's chat template.

    Raises:
        BadRequest: naming the first bad field; or the tokenizer has no chat template; or the
            template refuses the conversation.
    """
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise BadRequest(
            "this model's tokenizer has no chat template: use /v1/completions with a text prompt",
            code="chat_template_missing",
        )
    common = _common(body, models, default_max_tokens, chat=True)
    messages = _messages(body)  # type: ignore[arg-type]
    try:
        ids = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False
        )
    except Exception as exc:  # noqa: BLE001 - a template may raise anything on a conversation it refuses
        raise BadRequest(f"the chat template refused these messages: {exc}", param="messages") from None
    ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
    if ids and isinstance(ids[0], list):
        ids = ids[0]
    return GenerationParams(prompt=[int(i) for i in ids], **common)  # type: ignore[arg-type]


# responses ---------------------------------------------------------------------------------------


def usage_of(completion) -> dict:
    """OpenAI's usage object of an engine ``Completion``."""
    prompt, generated = int(completion.prompt_tokens), len(completion.token_ids)
    return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}


def model_of(completion) -> str:
    """The model name of the adapter that served a completion (``base`` for none)."""
    return completion.adapter if completion.adapter is not None else BASE


def completion_body(request_id: str, created: int, completion, *, return_token_ids: bool = False) -> dict:
    """A ``text_completion`` object with one choice."""
    choice = {
        "index": 0,
        "text": completion.completion,
        "logprobs": None,
        "finish_reason": completion.finish_reason,
    }
    if return_token_ids:
        choice["token_ids"] = list(completion.token_ids)
    return {
        "id": request_id,
        "object": "text_completion",
        "created": created,
        "model": model_of(completion),
        "choices": [choice],
        "usage": usage_of(completion),
    }


def chat_body(request_id: str, created: int, completion, *, return_token_ids: bool = False) -> dict:
    """A ``chat.completion`` object with one choice."""
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": completion.completion},
        "logprobs": None,
        "finish_reason": completion.finish_reason,
    }
    if return_token_ids:
        choice["token_ids"] = list(completion.token_ids)
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": created,
        "model": model_of(completion),
        "choices": [choice],
        "usage": usage_of(completion),
    }


def _chunk(
    kind: str,
    request_id: str,
    created: int,
    model: str,
    body: dict,
    finish_reason: str | None,
    token_ids: list[int] | None,
    usage: dict | None,
) -> dict:
    """A streamed chunk of ``kind`` whose one choice holds ``body`` (usage set: the usage-only chunk)."""
    chunk = {"id": request_id, "object": kind, "created": created, "model": model}
    if usage is not None:
        return {**chunk, "choices": [], "usage": usage}
    choice = {"index": 0, **body, "logprobs": None, "finish_reason": finish_reason}
    if token_ids is not None:
        choice["token_ids"] = token_ids
    return {**chunk, "choices": [choice]}


def completion_chunk(
    request_id: str,
    created: int,
    model: str,
    text: str,
    *,
    finish_reason: str | None = None,
    token_ids: list[int] | None = None,
    usage: dict | None = None,
) -> dict:
    """One streamed ``text_completion`` chunk (``usage`` set: the usage-only chunk, no choices)."""
    body = {"text": text}
    return _chunk("text_completion", request_id, created, model, body, finish_reason, token_ids, usage)


def chat_chunk(
    request_id: str,
    created: int,
    model: str,
    delta: dict,
    *,
    finish_reason: str | None = None,
    token_ids: list[int] | None = None,
    usage: dict | None = None,
) -> dict:
    """One streamed ``chat.completion.chunk`` (``usage`` set: the usage-only chunk, no choices)."""
    body = {"delta": delta}
    return _chunk("chat.completion.chunk", request_id, created, model, body, finish_reason, token_ids, usage)
