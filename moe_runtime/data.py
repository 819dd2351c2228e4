"""Task data: JSONL files with one example per line, validated with file and line in every error.

Accepted example shapes:
    {"text": "..."}
    {"prompt": "...", "response": "..."}
    {"messages": [{"role": "...", "content": "..."}, ...]}
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import DataError, UsageError

__all__ = ["Example", "read_examples", "encode_example", "parse_task_spec"]


@dataclass(frozen=True)
class Example:
    """One validated example; exactly one of the three shapes is set."""

    text: str | None = None
    prompt: str | None = None
    response: str | None = None
    messages: tuple[dict, ...] | None = None


def _example(obj: object, where: str) -> Example:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "text" in obj:
        if not isinstance(obj["text"], str):
            raise DataError(f"{where}: 'text' must be a string")
        return Example(text=obj["text"])
    if "prompt" in obj or "response" in obj:
        for key in ("prompt", "response"):
            if not isinstance(obj.get(key), str):
                raise DataError(f"{where}: '{key}' must be a string (examples with a prompt need a response)")
        return Example(prompt=obj["prompt"], response=obj["response"])
    if "messages" in obj:
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: 'messages' must be a non-empty list")
        for i, msg in enumerate(messages):
            if (
                not isinstance(msg, dict)
                or not isinstance(msg.get("role"), str)
                or not isinstance(msg.get("content"), str)
            ):
                raise DataError(f"{where}: messages[{i}] needs string 'role' and 'content'")
        return Example(messages=tuple(messages))
    raise DataError(f"{where}: no 'text', 'prompt'/'response' or 'messages' key")


def read_examples(path: str | Path, *, allow_empty: bool = False) -> list[Example]:
    """Read and validate a JSONL task file.

    Blank lines are skipped. Raises:
        DataError: unreadable file, invalid JSON or an example of the wrong shape (file:line named),
            or no example at all unless ``allow_empty``.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        # a leading byte-order mark is not data; not splitlines: U+2028 / U+0085 are text inside JSON strings
        lines = raw.decode("utf-8-sig").split("\n")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    examples = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number}: invalid JSON ({exc.msg} at column {exc.colno})") from None
        examples.append(_example(obj, f"{path}:{number}"))
    if not examples and not allow_empty:
        raise DataError(f"{path}: no examples (empty task)")
    return examples


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def encode_example(tokenizer, example: Example) -> tuple[list[int], int]:
    """Token ids of an example and where its supervised part starts.

    ``text`` is tokenized exactly as ``tokenizer(text)``; ``prompt``/``response`` as
    ``tokenizer(prompt + response)`` with the loss starting after the prompt's tokens;
    ``messages`` through the tokenizer's chat template when it has one (loss on the last
    assistant turn), else as the contents joined by newlines.

    Returns:
        ``(ids, response_start)``: ``ids[response_start:]`` is the supervised part (0 for text).
    """
    if example.text is not None:
        return list(tokenizer(example.text)["input_ids"]), 0
    if example.prompt is not None:
        prompt_ids = list(tokenizer(example.prompt)["input_ids"])
        ids = list(tokenizer(example.prompt + example.response)["input_ids"])
        return ids, _common_prefix(ids, prompt_ids)
    messages = list(example.messages)
    if getattr(tokenizer, "chat_template", None):
        ids = list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False))
        head = messages[:-1] if messages[-1]["role"] == "assistant" else messages
        head_ids = list(
            tokenizer.apply_chat_template(head, tokenize=True, return_dict=False, add_generation_prompt=True)
        )
        return ids, _common_prefix(ids, head_ids)
    head = "\n".join(m["content"] for m in messages[:-1])
    return encode_example(
        tokenizer, Example(prompt=head + ("\n" if head else ""), response=messages[-1]["content"])
    )


def parse_task_spec(spec: str) -> tuple[str, Path]:
    """Parse ``NAME=PATH`` (``--task``)."""
    name, sep, path = spec.partition("=")
    name = name.strip()
    if not sep or not name or not path:
        raise UsageError(f"task '{spec}': expected NAME=PATH")
    if "/" in name or name.startswith("."):
        raise UsageError(f"task '{spec}': the name must not contain '/' or start with '.'")
    return name, Path(path)
