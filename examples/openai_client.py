"""Talk to ``moe-runtime serve`` with the official ``openai`` Python package.

Without ``--base-url`` this script starts the server itself (``moe-runtime serve --model demo`` with a
few small adapters, on a free port), waits until it listens, and stops it at the end.

    python examples/openai_client.py                                     # starts its own server
    moe-runtime serve --model demo --adapter compare=DIR --api-key s3cret &
    python examples/openai_client.py --base-url http://127.0.0.1:8000/v1 --api-key s3cret

It lists the models (base, each adapter, auto), asks for a completion from an adapter, streams one
from ``auto`` (the server picks the adapter whose routing profile fits the prompt), and shows the
error a bad request gets.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import openai
from demo_adapters import tune_demo_adapters


@contextlib.contextmanager
def local_server(
    adapters: dict[str, Path], api_key: str, extra: tuple[str, ...] = (), timeout: float = 120
) -> Iterator[tuple[str, subprocess.Popen]]:
    """``moe-runtime serve --model demo`` in a subprocess on a free port; yields its base URL (``.../v1``)
    and the process, and stops it (as Ctrl-C does) on exit."""
    command = [sys.executable, "-m", "moe_runtime", "serve", "--model", "demo", "--port", "0", *extra]
    for name, path in adapters.items():
        command += ["--adapter", f"{name}={path}"]
    env = dict(os.environ, MOE_RUNTIME_API_KEY=api_key)
    server = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
    try:
        line = server.stdout.readline()  # "moe-runtime serve: listening on http://127.0.0.1:PORT (...)"
        if "listening on " not in line:
            raise SystemExit(f"the server did not start (exit status {server.wait(timeout)})")
        url = line.split("listening on ", 1)[1].split()[0]
        print(f"started: moe-runtime {' '.join(command[3:])}\n  -> {url}", flush=True)
        yield url + "/v1", server
    finally:
        server.send_signal(signal.SIGINT)  # a graceful stop, as Ctrl-C
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base-url", help="a running server's URL ending in /v1 (default: start one here)")
    parser.add_argument("--api-key", default="example-key", help="the server's API key")
    parser.add_argument("--workdir", default="example-adapters", help="where adapters are tuned (own server)")
    parser.add_argument("--steps", type=int, default=100, help="ESFT steps per adapter (own server)")
    parser.add_argument("--tokens", type=int, default=16, help="max_tokens per request (default 16)")
    args = parser.parse_args()

    if args.base_url:
        server = contextlib.nullcontext((args.base_url, None))
    else:
        server = local_server(tune_demo_adapters(Path(args.workdir), steps=args.steps), args.api_key)
    with server as (base_url, _):
        client = openai.OpenAI(base_url=base_url, api_key=args.api_key)

        models = [m.id for m in client.models.list()]
        print(f"models: {', '.join(models)}")
        adapter = next((m for m in models if m not in ("base", "auto")), "base")

        prompt = "cmp 95 132 ="
        out = client.completions.create(
            model=adapter, prompt=prompt, max_tokens=args.tokens, temperature=0, stop="\n"
        )
        print(
            f"completion ({out.model}): {prompt!r} -> {out.choices[0].text!r} "
            f"[{out.choices[0].finish_reason}, {out.usage.prompt_tokens} + {out.usage.completion_tokens} tokens]"
        )

        prompt = "id=7561 name=xena city=quito age=20 job=chef\nfield of chef:"
        stream = client.completions.create(
            model="auto", prompt=prompt, max_tokens=args.tokens, temperature=0, stream=True
        )
        print(f"stream (auto): {prompt!r} ->", end=" ", flush=True)
        for chunk in stream:
            print(chunk.choices[0].text, end="", flush=True)
            if chunk.choices[0].finish_reason:
                print(f"   [{chunk.choices[0].finish_reason}; served by '{chunk.model}']")

        try:
            client.completions.create(model=adapter, prompt=prompt, max_tokens=-1)
        except openai.BadRequestError as exc:
            print(f"bad request -> HTTP {exc.status_code}: {exc.body['message']}")


if __name__ == "__main__":
    main()
