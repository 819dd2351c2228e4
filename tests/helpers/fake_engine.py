"""A tiny engine with ``MultiAdapterEngine``'s serving contract (submit / handles / events / start / stop,
run-time adapters) and no model: the HTTP layer's tests run against it in milliseconds.

Tokens are bytes (id = byte + 1, id 0 = EOS). A greedy request's i-th token is a letter fixed by its
prompt, its adapter and i, so :func:`expected_tokens` is the reference the served tokens must equal.
A prompt containing ``<eos>`` ends with EOS after three tokens.
"""

from __future__ import annotations

import queue
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moe_runtime.errors import AdapterError, UsageError

EOS = 0
LETTERS = "abcdefghijklmnopqrstuvwxyz "


@dataclass
class FakeCompletion:
    id: Any
    adapter: str | None
    completion: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int


@dataclass
class FakeEvent:
    token_ids: list[int]
    text: str
    finish_reason: str | None


class FakeTokenizer:
    """Bytes as ids (+1); ``chat_template`` set: ``role: content`` lines then ``assistant:``."""

    eos_token_id = EOS
    bos_token_id = None

    def __init__(self, chat_template: str | None = None) -> None:
        self.chat_template = chat_template

    def __call__(self, text: str) -> dict:
        return {"input_ids": [b + 1 for b in text.encode()]}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return bytes(i - 1 for i in ids if i != EOS).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages, *, add_generation_prompt=False, tokenize=True, return_dict=False):
        if any(m["role"] == "tool" for m in messages):
            raise ValueError("tool messages are not supported by this template")
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        if add_generation_prompt:
            text += "assistant:"
        return self(text)["input_ids"] if tokenize else text


def expected_tokens(prompt_ids: list[int], adapter: str | None, max_new_tokens: int, stop=None) -> list[int]:
    """The greedy tokens the fake engine generates (before stop strings cut them)."""
    salt = sum(map(ord, adapter or ""))
    ids = []
    for i in range(max_new_tokens):
        if b"<eos>" in bytes(p - 1 for p in prompt_ids) and i == 3:
            ids.append(EOS)
            break
        ids.append(ord(LETTERS[(sum(prompt_ids) * 31 + salt * 7 + i * 13) % len(LETTERS)]) + 1)
    return ids


class FakeHandle:
    def __init__(self, engine: FakeEngine, request, prompt: list[int], adapter: str | None) -> None:
        self.request, self.prompt, self.adapter = request, prompt, adapter
        self._engine = engine
        self._events: queue.Queue = queue.Queue()
        self._done = threading.Event()
        self._result: FakeCompletion | None = None
        self.cancelled = False
        self.tokens: list[int] = []
        self.text = ""
        seed = request.seed or 0
        self._rng = random.Random(seed) if request.temperature else None

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        with self._engine._lock:
            self.cancelled = True
            self._engine._wake.notify_all()

    def result(self, timeout: float | None = None) -> FakeCompletion:
        if not self._engine._thread:
            while not self.done:
                self._engine.step()
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.request.id!r} is not done")
        assert self._result is not None
        return self._result

    def next_event(self, timeout: float | None = None) -> FakeEvent | None:
        try:
            return self._events.get(timeout=timeout) if timeout != 0 else self._events.get_nowait()
        except queue.Empty:
            return None

    def events(self, timeout: float | None = None):
        while True:
            event = self.next_event(timeout)
            if event is None:
                return
            yield event
            if event.finish_reason is not None:
                return

    # driven by the engine, under its lock
    def _advance(self, tokenizer: FakeTokenizer) -> bool:
        """One decode step; True when the request finished. Text that may begin a stop string is
        held back until it cannot."""
        if self.cancelled:
            return self._finish("cancelled", [], self.text)
        limit = self.request.max_new_tokens or 16
        i = len(self.tokens)
        if self._rng is not None:
            token = ord(self._rng.choice(LETTERS)) + 1
        else:
            token = expected_tokens(self.prompt, self.adapter, i + 1)[i]
        self.tokens.append(token)
        text = tokenizer.decode(self.tokens)
        stops = self.request.stop or []
        hits = [text.index(s) for s in stops if s in text]
        if hits:
            return self._finish("stop", [token], text[: min(hits)])
        if token == EOS:
            return self._finish("stop", [token], text)
        if len(self.tokens) >= limit:
            return self._finish("length", [token], text)
        held = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        safe = text[: len(text) - held]
        self._events.put(FakeEvent([token], safe[len(self.text) :], None))
        self.text = safe
        return False

    def _finish(self, reason: str, token_ids: list[int], text: str) -> bool:
        delta, self.text = text[len(self.text) :], text
        self._result = FakeCompletion(
            self.request.id, self.adapter, self.text, list(self.tokens), reason, len(self.prompt)
        )
        self._events.put(FakeEvent(token_ids, delta, reason))
        self._done.set()
        return True


@dataclass
class FakeEngine:
    """The serving contract over :func:`expected_tokens`; ``step_s`` slows each step down."""

    tokenizer: FakeTokenizer = field(default_factory=FakeTokenizer)
    step_s: float = 0.0
    model: Any = None

    def __post_init__(self) -> None:
        self._adapters: dict[str, str] = {}
        self._live: list[FakeHandle] = []
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.submitted: list[FakeHandle] = []

    @property
    def adapters(self) -> list[str]:
        with self._lock:
            return list(self._adapters)

    @property
    def live(self) -> int:
        """Requests holding rows."""
        with self._lock:
            return len(self._live)

    def add_adapter(self, name: str, path, *, allow_base_mismatch: bool = False) -> None:
        if not Path(path).is_dir():
            raise AdapterError(f"adapter '{path}': no such directory")
        with self._lock:
            if name in self._adapters:
                raise AdapterError(f"an adapter named '{name}' is already loaded")
            self._adapters[name] = str(path)

    def remove_adapter(self, name: str) -> None:
        with self._lock:
            if name not in self._adapters:
                raise AdapterError(f"adapter '{name}' is not loaded")
            if any(h.adapter == name for h in self._live):
                raise AdapterError(f"adapter '{name}' is named by live requests")
            del self._adapters[name]

    def submit(self, request, *, claim: bool = False) -> FakeHandle:
        with self._lock:
            adapter = request.adapter
            if adapter == "auto":
                adapter = sorted(self._adapters)[0] if self._adapters else None
            elif adapter is not None and adapter not in self._adapters:
                raise AdapterError(f"adapter '{adapter}' is not loaded")
            if request.max_new_tokens is not None and request.max_new_tokens <= 0:
                raise UsageError("max_new_tokens must be positive")
            if request.temperature is not None and request.temperature < 0:
                raise UsageError("temperature must not be negative")
            prompt = (
                self.tokenizer(request.prompt)["input_ids"]
                if isinstance(request.prompt, str)
                else request.prompt
            )
            if not prompt:
                raise UsageError("empty prompt")
            if any(not 0 <= t < 257 for t in prompt):
                raise UsageError("token id out of range")
            handle = FakeHandle(self, request, list(prompt), adapter)
            self._live.append(handle)
            self.submitted.append(handle)
            self._wake.notify_all()
            return handle

    def step(self) -> int:
        with self._lock:
            live = list(self._live)
        if self.step_s:
            time.sleep(self.step_s)
        with self._lock:
            for handle in live:
                if handle._advance(self.tokenizer):
                    self._live.remove(handle)
            return len(self._live)

    def generate(self, requests) -> list[FakeCompletion]:
        handles = [self.submit(r) for r in requests]
        return [h.result() for h in handles]

    def start(self) -> None:
        with self._lock:
            if self._thread is not None:
                return
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._live and not self._stopping:
                    self._wake.wait()
                if self._stopping:
                    return
            self.step()

    def stop(self) -> None:
        with self._lock:
            thread, self._stopping = self._thread, True
            self._wake.notify_all()
        if thread is not None:
            thread.join()
        self._thread = None

    def close(self) -> None:
        self.stop()
