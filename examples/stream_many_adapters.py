"""Serve many adapters from Python with streaming: one engine, its background thread batching every
request as it arrives (continuous batching), each request with its own adapter (or ``"auto"``).

    python examples/stream_many_adapters.py                         # tunes 3 small adapters first (cached)
    python examples/stream_many_adapters.py --adapter compare=DIR --adapter field=DIR --tokens 24

What it shows:
  1. one request streamed to the terminal as it is decoded (``engine.stream``);
  2. many requests submitted from threads at once, mixed adapters and ``"auto"``, each consumed as a
     stream of events (``handle.events()``): time to first token and the adapter ``auto`` chose;
  3. the streamed tokens equal what ``engine.generate`` returns for the same requests (greedy).
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

import transformers
from demo_adapters import tune_demo_adapters

from moe_runtime.data import read_examples
from moe_runtime.demo.tasks import write_tasks
from moe_runtime.runtime import MultiAdapterEngine, Request

OTHER_PROMPTS = ["12 + 35 =", "def total(xs):", "The city of"]


def task_prompts(tasks_dir: Path, name: str) -> list[str]:
    """Held-out prompts of the demo task ``name`` (other adapters get a few generic prompts)."""
    path = tasks_dir / f"{name}_test.jsonl"
    return [ex.prompt for ex in read_examples(path)] if path.is_file() else OTHER_PROMPTS


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--adapter", action="append", default=[], metavar="NAME=DIR", help="adapters to serve"
    )
    parser.add_argument("--workdir", default="example-adapters", help="where tuned adapters are kept")
    parser.add_argument("--steps", type=int, default=100, help="ESFT steps when adapters are tuned here")
    parser.add_argument("--requests", type=int, default=12, help="concurrent requests in part 2 (default 12)")
    parser.add_argument("--tokens", type=int, default=16, help="new tokens per request (default 16)")
    args = parser.parse_args()
    transformers.logging.disable_progress_bar()

    if args.adapter:
        adapters = dict(spec.split("=", 1) for spec in args.adapter)
    else:
        adapters = tune_demo_adapters(Path(args.workdir), steps=args.steps)
    engine = MultiAdapterEngine.from_pretrained("demo")
    for name, path in adapters.items():
        engine.add_adapter(name, path)  # its routing_profile.json makes it a candidate for "auto"
    names = list(adapters)
    tasks_dir = Path(args.workdir) / "tasks"
    if not tasks_dir.is_dir():
        write_tasks(tasks_dir, n_train=64, n_test=50)
    prompts = {name: task_prompts(tasks_dir, name) for name in names}
    engine.start()  # decode in a background thread; submit from anywhere

    # 1. one stream to the terminal
    first = prompts[names[0]][0]
    print(f"1. streaming {names[0]!r}: {first!r} ->", end=" ", flush=True)
    for event in engine.stream(Request(first, names[0], args.tokens, temperature=0, stop=["\n"])):
        print(event.text, end="", flush=True)
        if event.finish_reason:
            print(f"   [{event.finish_reason}]")

    # 2. many streams at once, from threads
    requests = []
    for i in range(args.requests):
        task = names[i % len(names)]
        turn = i // len(names)
        adapter = (task, "auto", None)[turn % 3]  # the task's adapter, the engine's choice, the base model
        prompt = prompts[task][turn % len(prompts[task])]
        requests.append(Request(prompt, adapter, args.tokens, id=i, temperature=0))
    streamed: dict[int, dict] = {}

    def consume(request: Request) -> None:
        start = time.perf_counter()
        handle = engine.submit(request)
        ids, ttft = [], None
        for event in handle.events():
            if ttft is None and event.token_ids:
                ttft = time.perf_counter() - start
            ids += event.token_ids
        streamed[request.id] = {"ids": ids, "ttft": ttft, "done": handle.result()}

    start = time.perf_counter()
    threads = [threading.Thread(target=consume, args=(r,)) for r in requests]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    tokens = sum(len(s["ids"]) for s in streamed.values())
    print(
        f"2. {len(requests)} concurrent streams over {len(names)} adapters + base: {tokens} tokens in {elapsed:.2f} s"
    )
    for request in requests:
        s = streamed[request.id]
        asked = request.adapter or "base"
        used = s["done"].adapter or "base"
        line = s["done"].completion.strip().split("\n")[0]
        print(
            f"   {asked:>8} -> {used:<8} first token {s['ttft'] * 1e3:6.0f} ms  {request.prompt!r} -> {line!r}"
        )

    # 3. the same requests in one call: the same tokens
    engine.stop()
    again = engine.generate(
        [Request(r.prompt, r.adapter, r.max_new_tokens, id=r.id, temperature=0) for r in requests]
    )
    same = all(streamed[c.id]["ids"] == c.token_ids for c in again)
    print(f"3. streamed tokens equal engine.generate's: {'yes' if same else 'NO'}")
    engine.close()
    if not same:
        raise SystemExit("streamed tokens differ")


if __name__ == "__main__":
    main()
