"""The OpenAI-compatible HTTP server: a starlette app over a running ``MultiAdapterEngine``.

    GET    /v1/models                  base, every loaded adapter, auto
    GET    /v1/models/NAME
    POST   /v1/completions             prompt -> text (``stream: true``: server-sent events)
    POST   /v1/chat/completions        messages -> reply (when the tokenizer has a chat template)
    POST   /v1/adapters                {"name", "path"}: load an adapter     (admin: off by default)
    DELETE /v1/adapters/NAME           unload it                             (admin: off by default)

The engine decodes in its own background thread (``engine.start()`` at startup); each request
waits for its handle's events in a worker thread (``handle.next_event`` with a timeout), so the
event loop never blocks. A client that goes away before its answer is complete has its request
cancelled, which frees its rows at the engine's next step. Errors are OpenAI's error bodies:
400 for a bad request (the server keeps serving), 401 without the API key, 403 for admin calls on
a server started without them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor

import anyio
import uvicorn
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..errors import AdapterError, UsageError
from .protocol import (
    AUTO,
    BASE,
    BadRequest,
    GenerationParams,
    chat_body,
    chat_chunk,
    completion_body,
    completion_chunk,
    error_body,
    model_of,
    parse_chat,
    parse_completion,
    usage_of,
)

__all__ = ["BoundServer", "bind", "create_app"]

_POLL_S = 0.5  # how long a waiting worker blocks before the request checks its client again


def _error(
    status: int, message: str, *, type: str = "invalid_request_error", code: str | None = None
) -> JSONResponse:
    return JSONResponse(error_body(message, type=type, code=code), status_code=status)


def _sse(obj: dict | str) -> str:
    data = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    return f"data: {data}\n\n"


def _drain(handle, timeout: float) -> list:
    """The handle's next events: wait up to ``timeout`` for one, then take what else is ready."""
    event = handle.next_event(timeout)
    if event is None:
        return []
    events = [event]
    while event.finish_reason is None:
        event = handle.next_event(0)
        if event is None:
            break
        events.append(event)
    return events


class _EventStream(StreamingResponse):
    """Server-sent events that stop (and close their iterator) as soon as the client disconnects.

    Starlette notices a disconnect only when a write fails, which may be long after it happened when
    tokens come slowly; this listens for the disconnect message alongside the stream. ``on_close``
    runs however the response ends (even if the stream never started).
    """

    def __init__(self, content, *, on_close: Callable[[], None], **kwargs) -> None:
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        async with anyio.create_task_group() as group:

            async def stream() -> None:
                with contextlib.suppress(OSError):
                    await self.stream_response(send)
                group.cancel_scope.cancel()

            group.start_soon(stream)
            await self.listen_for_disconnect(receive)
            group.cancel_scope.cancel()
        try:
            await self.body_iterator.aclose()  # type: ignore[attr-defined]
        finally:
            self.on_close()


class _ApiKey:
    """ASGI middleware: every HTTP request must carry ``Authorization: Bearer <key>``."""

    def __init__(self, app, key: str) -> None:
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            scheme, _, token = Headers(scope=scope).get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.key):
                response = JSONResponse(
                    error_body(
                        "missing or wrong API key (send 'Authorization: Bearer KEY')", code="invalid_api_key"
                    ),
                    status_code=401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _Service:
    """The routes' state: the engine, the settings, and the worker threads that wait on handles."""

    def __init__(
        self,
        engine,
        *,
        default_max_tokens: int,
        enable_admin: bool,
        allow_base_mismatch: bool,
        start_engine: bool,
        wait_threads: int,
    ) -> None:
        self.engine = engine
        self.default_max_tokens = default_max_tokens
        self.enable_admin = enable_admin
        self.allow_base_mismatch = allow_base_mismatch
        self.start_engine = start_engine
        self.wait_threads = wait_threads
        self.pool: ThreadPoolExecutor | None = None
        self.live: set = set()  # handles of requests being answered
        self.admin_lock = asyncio.Lock()
        self.started = int(time.time())
        config = getattr(getattr(engine, "model", None), "config", None)
        self.max_context: int | None = getattr(config, "max_position_embeddings", None)

    # lifecycle ------------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def lifespan(self, app) -> AsyncIterator[None]:
        self.pool = ThreadPoolExecutor(self.wait_threads, thread_name_prefix="moe-serve-wait")
        if self.start_engine:
            self.engine.start()
        try:
            yield
        finally:
            for handle in list(self.live):
                handle.cancel()
            if self.start_engine:
                await asyncio.to_thread(self.engine.stop)
            self.pool.shutdown(wait=False, cancel_futures=True)

    async def _in_pool(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    # models ---------------------------------------------------------------------------------------

    def model_names(self) -> list[str]:
        return [BASE, *self.engine.adapters, AUTO]

    def _model_card(self, name: str) -> dict:
        return {"id": name, "object": "model", "created": self.started, "owned_by": "moe-runtime"}

    async def list_models(self, request: HttpRequest) -> Response:
        return JSONResponse({"object": "list", "data": [self._model_card(n) for n in self.model_names()]})

    async def get_model(self, request: HttpRequest) -> Response:
        name = request.path_params["name"]
        if name not in self.model_names():
            return _error(404, f"model '{name}' is not served", code="model_not_found")
        return JSONResponse(self._model_card(name))

    # generation -----------------------------------------------------------------------------------

    async def _body(self, request: HttpRequest) -> object:
        raw = await request.body()
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise BadRequest(f"the request body is not valid JSON ({exc})") from None

    def _fit_context(self, params: GenerationParams, max_tokens_given: bool) -> None:
        """Refuse (or, for a default ``max_tokens``, shorten) a request that overruns the model's context."""
        if self.max_context is None:
            return
        prompt = params.prompt
        if isinstance(prompt, str):
            tokenizer = getattr(self.engine, "tokenizer", None)
            if tokenizer is None:
                return
            prompt = tokenizer(prompt)["input_ids"]
        room = self.max_context - len(prompt)
        if room < 1:
            raise BadRequest(
                f"the prompt is {len(prompt)} tokens: this model's context is {self.max_context}",
                param="prompt",
            )
        if params.max_tokens > room:
            if max_tokens_given:
                raise BadRequest(
                    f"the prompt ({len(prompt)} tokens) plus max_tokens ({params.max_tokens}) exceed this "
                    f"model's context of {self.max_context} tokens",
                    param="max_tokens",
                )
            params.max_tokens = room

    async def completions(self, request: HttpRequest) -> Response:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: HttpRequest) -> Response:
        return await self._generate(request, chat=True)

    async def _generate(self, request: HttpRequest, *, chat: bool) -> Response:
        try:
            body = await self._body(request)
            models = self.model_names()
            if chat:
                params = parse_chat(
                    body,
                    models=models,
                    default_max_tokens=self.default_max_tokens,
                    tokenizer=getattr(self.engine, "tokenizer", None),
                )
            else:
                params = parse_completion(body, models=models, default_max_tokens=self.default_max_tokens)
            given = any(
                isinstance(body, dict) and body.get(k) is not None
                for k in ("max_tokens", "max_completion_tokens")
            )
            self._fit_context(params, given)
            request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
            handle = self.engine.submit(params.request(request_id), claim=True)
        except BadRequest as exc:
            return JSONResponse(exc.body(), status_code=exc.status)
        except UsageError as exc:  # AdapterError included: refused at submit
            return _error(400, str(exc))
        self.live.add(handle)
        created = int(time.time())
        if params.stream:
            return _EventStream(
                self._stream(handle, params, request_id, created, chat),
                on_close=lambda: self._release(handle),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        try:
            completion = await self._wait(request, handle)
        finally:
            self._release(handle)
        if completion is None:  # the client left
            return Response(status_code=499)
        make = chat_body if chat else completion_body
        return JSONResponse(make(request_id, created, completion, return_token_ids=params.return_token_ids))

    def _release(self, handle) -> None:
        if not handle.done:
            handle.cancel()
        self.live.discard(handle)

    async def _wait(self, request: HttpRequest, handle):
        """The handle's completion, or None if the client disconnected first (the request is cancelled)."""
        while True:
            events = await self._in_pool(_drain, handle, _POLL_S)
            if events and events[-1].finish_reason is not None:
                return await self._in_pool(handle.result, 60.0)
            if await request.is_disconnected():
                return None

    async def _stream(
        self, handle, params: GenerationParams, request_id: str, created: int, chat: bool
    ) -> AsyncIterator[str]:
        model = params.model
        ids = params.return_token_ids

        def chunk(
            text: str, finish: str | None = None, token_ids=None, model: str = model, first: bool = False
        ):
            if chat:
                delta = (
                    {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
                )
                return chat_chunk(
                    request_id, created, model, delta, finish_reason=finish, token_ids=token_ids
                )
            return completion_chunk(
                request_id, created, model, text, finish_reason=finish, token_ids=token_ids
            )

        try:
            if chat:
                yield _sse(chunk("", first=True, token_ids=[] if ids else None))
            while True:
                try:
                    events = await self._in_pool(_drain, handle, _POLL_S)
                except Exception as exc:  # noqa: BLE001 - the engine failed this request; report in band
                    yield _sse(error_body(f"generation failed: {exc}", type="server_error"))
                    break
                final = events[-1] if events and events[-1].finish_reason is not None else None
                body = events[:-1] if final is not None else events
                text = "".join(e.text for e in body)
                tokens = [t for e in body for t in e.token_ids]
                if tokens or text:
                    yield _sse(chunk(text, token_ids=tokens if ids else None))
                if final is None:
                    continue
                try:
                    completion = await self._in_pool(handle.result, 60.0)
                except Exception as exc:  # noqa: BLE001 - the stream has begun: report in band
                    yield _sse(error_body(f"generation failed: {exc}", type="server_error"))
                    break
                finish = completion.finish_reason
                yield _sse(
                    chunk(final.text, finish, list(final.token_ids) if ids else None, model_of(completion))
                )
                if params.include_usage:
                    usage = usage_of(completion)
                    maker = chat_chunk if chat else completion_chunk
                    yield _sse(
                        maker(request_id, created, model_of(completion), {} if chat else "", usage=usage)
                    )
                break
            yield _sse("[DONE]")
        finally:
            self._release(handle)

    # admin ----------------------------------------------------------------------------------------

    def _admin_off(self) -> Response | None:
        if self.enable_admin:
            return None
        return _error(
            403,
            "the admin endpoints are off: start the server with --enable-admin to load and unload adapters",
            type="permission_error",
        )

    async def load_adapter(self, request: HttpRequest) -> Response:
        if (refused := self._admin_off()) is not None:
            return refused
        try:
            body = await self._body(request)
            if not isinstance(body, dict):
                raise BadRequest('the request body must be a JSON object {"name", "path"}')
            name, path = body.get("name"), body.get("path")
            if not isinstance(name, str) or not name or "/" in name:
                raise BadRequest("'name' must be a non-empty string without '/'", param="name")
            if name in (BASE, AUTO):
                raise BadRequest(
                    f"'{name}' is reserved (it names the base model or the automatic choice)", param="name"
                )
            if not isinstance(path, str) or not path:
                raise BadRequest("'path' must be the adapter directory on the server", param="path")
        except BadRequest as exc:
            return JSONResponse(exc.body(), status_code=exc.status)
        async with self.admin_lock:
            if name in self.engine.adapters:
                return _error(
                    409, f"adapter '{name}' is already loaded (unload it first)", code="adapter_exists"
                )
            try:
                await asyncio.to_thread(
                    self.engine.add_adapter, name, path, allow_base_mismatch=self.allow_base_mismatch
                )
            except UsageError as exc:
                return _error(400, str(exc))
        return JSONResponse(self._model_card(name), status_code=201)

    async def unload_adapter(self, request: HttpRequest) -> Response:
        if (refused := self._admin_off()) is not None:
            return refused
        name = request.path_params["name"]
        async with self.admin_lock:
            if name not in self.engine.adapters:
                return _error(404, f"adapter '{name}' is not loaded", code="model_not_found")
            try:
                await asyncio.to_thread(self.engine.remove_adapter, name)
            except AdapterError as exc:  # live requests name it
                return _error(409, str(exc), code="adapter_in_use")
        return JSONResponse({"id": name, "object": "model", "deleted": True})


async def _http_error(request: HttpRequest, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    messages = {404: f"no such endpoint: {request.method} {request.url.path}", 405: "method not allowed"}
    message = messages.get(exc.status_code, str(exc.detail))
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return JSONResponse(error_body(message, type=kind), status_code=exc.status_code, headers=exc.headers)


async def _internal_error(request: HttpRequest, exc: Exception) -> Response:
    return _error(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error")


def create_app(
    engine,
    *,
    api_key: str | None = None,
    enable_admin: bool = False,
    default_max_tokens: int = 32,
    allow_base_mismatch: bool = False,
    start_engine: bool = True,
    wait_threads: int = 64,
) -> Starlette:
    """The ASGI app serving ``engine``.

    Args:
        engine: a ``MultiAdapterEngine`` (or anything with its serving contract).
        api_key: when set, every request must send ``Authorization: Bearer <api_key>`` (else 401).
        enable_admin: allow loading and unloading adapters over HTTP (they read server-side paths).
        default_max_tokens: for requests without ``max_tokens``.
        allow_base_mismatch: admin loads accept adapters tuned on other base weights.
        start_engine: start the engine's background thread at startup and stop it at shutdown.
        wait_threads: worker threads waiting on request handles (requests beyond it take turns).
    """
    service = _Service(
        engine,
        default_max_tokens=default_max_tokens,
        enable_admin=enable_admin,
        allow_base_mismatch=allow_base_mismatch,
        start_engine=start_engine,
        wait_threads=wait_threads,
    )
    routes = [
        Route("/v1/models", service.list_models, methods=["GET"]),
        Route("/v1/models/{name:path}", service.get_model, methods=["GET"]),
        Route("/v1/completions", service.completions, methods=["POST"]),
        Route("/v1/chat/completions", service.chat_completions, methods=["POST"]),
        Route("/v1/adapters", service.load_adapter, methods=["POST"]),
        Route("/v1/adapters/{name:path}", service.unload_adapter, methods=["DELETE"]),
    ]
    app = Starlette(
        routes=routes,
        middleware=[Middleware(_ApiKey, key=api_key)] if api_key else [],
        exception_handlers={HTTPException: _http_error, Exception: _internal_error},
        lifespan=service.lifespan,
    )
    app.state.service = service
    return app


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket (``port=0``: a free one); UsageError when the address cannot be used."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port} ({exc.strerror or exc})") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class BoundServer:
    """uvicorn serving ``app`` on a listening socket (``sock``, or one bound to ``host:port`` here;
    ``port=0`` picks a free port).

    ``url`` is known (and connections queue) as soon as the object exists; :meth:`run` serves in
    this thread until SIGINT/SIGTERM, :meth:`start` serves in a background thread until :meth:`stop`.
    """

    def __init__(
        self,
        app,
        *,
        sock: socket.socket | None = None,
        host: str = "127.0.0.1",
        port: int = 8000,
        log_level: str = "warning",
    ) -> None:
        self.socket = sock if sock is not None else bind(host, port)
        address = self.socket.getsockname()
        host, bound_port = address[0], address[1]
        self.url = f"http://[{host}]:{bound_port}" if ":" in host else f"http://{host}:{bound_port}"
        config = uvicorn.Config(app, log_level=log_level, access_log=False, timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    def run(self) -> None:
        self.server.run(sockets=[self.socket])

    def start(self, timeout: float = 30.0) -> BoundServer:
        self._thread = threading.Thread(target=self.run, name="moe-serve-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the HTTP server did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
        self.socket.close()

    def __enter__(self) -> BoundServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
