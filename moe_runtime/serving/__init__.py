"""An OpenAI-compatible HTTP layer over :class:`~moe_runtime.runtime.MultiAdapterEngine`.

``protocol`` turns OpenAI request bodies into engine requests and engine results into OpenAI
response bodies (no HTTP); ``http`` is the starlette app and the uvicorn runner.
Needs the ``serve`` extra (starlette, uvicorn).
"""

from __future__ import annotations

__all__ = ["BoundServer", "bind", "create_app"]


def __getattr__(name: str):
    if name in __all__:  # the ASGI stack is imported only when the server is wanted
        from . import http

        return getattr(http, name)
    raise AttributeError(name)
