"""``moe-runtime serve``: the engine behind an OpenAI-compatible HTTP endpoint."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading

from ..errors import UsageError
from ._common import add_verb
from .generate import (
    _adapters,
    _offload_config,
    adapter_profiles,
    add_model_flags,
    add_offload_flags,
    check_engine_flags,
    load_engine,
)

API_KEY_ENV = "MOE_RUNTIME_API_KEY"
RESERVED = ("base", "auto")


def register(sub) -> None:
    parser = add_verb(
        sub,
        "serve",
        help="serve the base model and its adapters over an OpenAI-compatible HTTP API",
        description=(
            "Serve requests over HTTP as OpenAI's API does: GET /v1/models lists 'base', every adapter and "
            "'auto'; POST /v1/completions and /v1/chat/completions (chat only when the tokenizer has a chat "
            "template) take 'model' = base | adapter name | auto, max_tokens, temperature (0 = greedy; "
            "OpenAI's default is 1), top_p, seed, stop and stream (server-sent events ending with "
            "'data: [DONE]'). All requests share the engine's batches, each with its own adapter. With "
            "--enable-admin, POST /v1/adapters {'name', 'path'} and DELETE /v1/adapters/NAME load and unload "
            "adapters (paths on this machine). Bad requests get HTTP 400 with an OpenAI error body. Prints "
            "the URL it listens on; Ctrl-C stops it."
        ),
        examples=[
            "moe-runtime serve --model demo --adapter arith=ad/arith --adapter code=ad/code",
            "moe-runtime serve --model demo --port 0 --api-key s3cret --enable-admin",
            "moe-runtime serve --model ./olmoe --offload disk --expert-budget 25% --host 0.0.0.0 --port 8080",
            "curl localhost:8000/v1/completions -H 'content-type: application/json' "
            '-d \'{"model": "arith", "prompt": "12 + 35 =", "max_tokens": 8, "temperature": 0}\'',
        ],
        threads=True,
        func=run,
    )
    add_model_flags(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument(
        "--port", type=int, default=8000, help="port to listen on; 0 picks a free one (default 8000)"
    )
    parser.add_argument(
        "--api-key",
        metavar="KEY",
        help=f"require 'Authorization: Bearer KEY' on every request (default: ${API_KEY_ENV} if set)",
    )
    parser.add_argument(
        "--enable-admin",
        action="store_true",
        help="allow loading and unloading adapters over HTTP (POST/DELETE /v1/adapters; reads server paths)",
    )
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=32,
        metavar="N",
        help="for requests that do not set max_tokens (default 32)",
    )
    add_offload_flags(parser)


def _check_args(args: argparse.Namespace) -> None:
    check_engine_flags(args)
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port {args.port}: not a port number (0 picks a free one)")
    if args.max_new_tokens <= 0:
        raise UsageError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    if args.api_key is None:
        args.api_key = os.environ.get(API_KEY_ENV) or None
    elif not args.api_key:
        raise UsageError("--api-key must not be empty")


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    adapters = _adapters(args.adapter)
    reserved = sorted(set(adapters) & set(RESERVED))
    if reserved:
        raise UsageError(f"--adapter '{reserved[0]}': the name is reserved (it names a model of the API)")
    try:
        from ..serving.http import BoundServer, bind, create_app
    except ImportError as exc:
        raise UsageError(
            f"serve needs the 'serve' extra ({exc.name} is missing): pip install 'moe-runtime[serve]'"
        ) from None
    profiles = adapter_profiles(args, adapters)
    offload = _offload_config(args)
    sock = bind(args.host, args.port)  # a busy port fails before the model loads
    engine = load_engine(args, adapters, profiles, offload)
    try:
        app = create_app(
            engine,
            api_key=args.api_key,
            enable_admin=args.enable_admin,
            default_max_tokens=args.max_new_tokens,
            allow_base_mismatch=args.allow_base_mismatch,
        )
        server = BoundServer(app, sock=sock)
        models = ", ".join(["base", *engine.adapters, "auto"])
        print(f"moe-runtime serve: listening on {server.url} (models: {models})", flush=True)
        if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
            print(f"note: listening on {args.host} without --api-key: anyone who can reach it may use it",
                  file=sys.stderr)  # fmt: skip
        with _sigterm_as_interrupt():
            server.run()
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: uvicorn has shut down gracefully, then re-raised it
        print("moe-runtime serve: stopped", file=sys.stderr)
    finally:
        engine.close()
    return 0


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM stops the server as Ctrl-C does (uvicorn re-raises the signal after its shutdown)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
