"""Load test of ``moe-runtime serve``: many concurrent ``openai`` clients on loopback, every answer
checked token by token against the in-process engine, and the server's memory watched.

    python examples/serve_load_test.py                                  # 200 requests, 16 clients
    python examples/serve_load_test.py --requests 400 --clients 32 --tokens 48 --json load.json
    python examples/serve_load_test.py --requests 20 --clients 4 --steps 2   # a smoke run

It starts ``moe-runtime serve --model demo`` with a few small adapters (tuned first, cached in
``--workdir``), sends ``--requests`` requests from ``--clients`` threads (each its own client): the
models mixed (base, every adapter, auto), half of them streamed, a quarter with a stop string, greedy,
``max_tokens`` drawn from [tokens/4, tokens]. Then it serves the same requests with an in-process
engine and checks that every answer has exactly its tokens (ids, text, finish reason, usage, the
adapter ``auto`` chose): nothing lost, nothing duplicated. The server's RSS is sampled (psutil)
after a warm-up and after each quarter of the run; it must stay flat. Exit status 1 on any error,
mismatch, or RSS growth over ``--rss-tolerance``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import openai
import psutil
import transformers
from demo_adapters import DEFAULT_TASKS, tune_demo_adapters
from openai_client import local_server

from moe_runtime.data import read_examples
from moe_runtime.runtime import MultiAdapterEngine, Request

OTHER_PROMPTS = ["12 + 35 =", "def total(xs):", "The city of", "sort: 9 4 1 ->"]


@dataclass
class Job:
    """One request of the workload and what the server answered."""

    index: int
    model: str
    prompt: str
    max_tokens: int
    stream: bool
    stop: list[str] | None
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    served_by: str | None = None
    usage: tuple[int, int] | None = None
    error: str | None = None
    latency_s: float = 0.0
    ttft_s: float | None = None


def workload(adapters: list[str], tasks_dir: Path, n: int, tokens: int, seed: int) -> list[Job]:
    rng = random.Random(seed)
    prompts = list(OTHER_PROMPTS)
    for name in adapters:
        path = tasks_dir / f"{name}_test.jsonl"
        if path.is_file():
            prompts += [ex.prompt for ex in read_examples(path)[:20]]
    models = ["base", *adapters, "auto"]
    return [
        Job(
            index=i,
            model=rng.choice(models),
            prompt=rng.choice(prompts),
            max_tokens=rng.randint(max(1, tokens // 4), tokens),
            stream=i % 2 == 0,
            stop=["\n"] if rng.random() < 0.25 else None,
        )
        for i in range(n)
    ]


def send(client: openai.OpenAI, job: Job) -> None:
    start = time.perf_counter()
    try:
        out = client.completions.create(
            model=job.model,
            prompt=job.prompt,
            max_tokens=job.max_tokens,
            temperature=0,
            stop=job.stop,
            stream=job.stream,
            stream_options={"include_usage": True} if job.stream else None,
            extra_body={"return_token_ids": True},
        )
        if job.stream:
            for chunk in out:
                if chunk.usage is not None:
                    job.usage = (chunk.usage.prompt_tokens, chunk.usage.completion_tokens)
                for choice in chunk.choices:
                    if job.ttft_s is None and choice.token_ids:
                        job.ttft_s = time.perf_counter() - start
                    job.token_ids += choice.token_ids
                    job.text += choice.text
                    if choice.finish_reason:
                        job.finish_reason, job.served_by = choice.finish_reason, chunk.model
        else:
            choice = out.choices[0]
            job.token_ids, job.text, job.finish_reason = (
                list(choice.token_ids),
                choice.text,
                choice.finish_reason,
            )
            job.served_by, job.usage = out.model, (out.usage.prompt_tokens, out.usage.completion_tokens)
    except Exception as exc:  # noqa: BLE001 - every failure is counted and reported
        job.error = f"{type(exc).__name__}: {exc}"
    job.latency_s = time.perf_counter() - start


def run_load(base_url: str, api_key: str, jobs: list[Job], clients: int, on_done=None) -> float:
    """Send the jobs from ``clients`` threads (each its own client); returns the wall time."""
    local = threading.local()
    lock = threading.Lock()
    done = [0]

    def worker(job: Job) -> None:
        if not hasattr(local, "client"):
            local.client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=300)
        send(local.client, job)
        with lock:
            done[0] += 1
            if on_done is not None:
                on_done(done[0])

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(worker, jobs))
    return time.perf_counter() - start


def check(jobs: list[Job], adapters: dict[str, Path]) -> list[str]:
    """Serve the same requests in process (greedy) and list every difference."""
    engine = MultiAdapterEngine.from_pretrained("demo")
    for name, path in adapters.items():
        engine.add_adapter(name, path)
    requests = [
        Request(
            j.prompt,
            None if j.model == "base" else j.model,
            j.max_tokens,
            id=j.index,
            temperature=0,
            stop=j.stop,
        )
        for j in jobs
    ]
    want = {c.id: c for c in engine.generate(requests)}
    engine.close()
    problems = []
    for job in jobs:
        if job.error:
            problems.append(f"request {job.index}: {job.error}")
            continue
        ref = want[job.index]
        got = (job.token_ids, job.text, job.finish_reason, job.served_by, job.usage)
        expected = (ref.token_ids, ref.completion, ref.finish_reason, ref.adapter or "base")
        expected += ((ref.prompt_tokens, len(ref.token_ids)),)
        if got != expected:
            kind = "stream" if job.stream else "whole"
            problems.append(f"request {job.index} ({job.model}, {kind}): got {got}, want {expected}")
    return problems


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))] if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=200, help="requests after the warm-up (default 200)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients (default 16)")
    parser.add_argument("--tokens", type=int, default=32, help="largest max_tokens of a request (default 32)")
    parser.add_argument(
        "--warmup", type=int, default=32, help="requests sent before RSS is measured (default 32)"
    )
    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help="demo tasks with an adapter each")
    parser.add_argument("--workdir", default="example-adapters", help="where adapters are tuned and kept")
    parser.add_argument("--steps", type=int, default=100, help="ESFT steps per adapter (default 100)")
    parser.add_argument("--rss-tolerance", type=float, default=0.05, help="allowed RSS growth (default 5%%)")
    parser.add_argument("--seed", type=int, default=0, help="workload seed")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    transformers.logging.disable_progress_bar()

    tasks = [t for t in args.tasks.split(",") if t]
    adapters = tune_demo_adapters(Path(args.workdir), tasks, steps=args.steps)
    jobs = workload(
        list(adapters), Path(args.workdir) / "tasks", args.warmup + args.requests, args.tokens, args.seed
    )
    warmup, measured = jobs[: args.warmup], jobs[args.warmup :]
    api_key = "load-test"
    with local_server(adapters, api_key) as (base_url, process):
        server = psutil.Process(process.pid)
        run_load(base_url, api_key, warmup, args.clients)
        rss = [server.memory_info().rss]  # after the warm-up, then after each quarter of the run
        quarters = {round(len(measured) * q / 4) for q in (1, 2, 3)}

        def sample(done: int) -> None:
            if done in quarters:
                rss.append(server.memory_info().rss)

        seconds = run_load(base_url, api_key, measured, args.clients, on_done=sample)
        rss.append(server.memory_info().rss)
    problems = check(jobs, adapters)

    errors = sum(j.error is not None for j in jobs)
    tokens = sum(len(j.token_ids) for j in measured)
    growth = (max(rss[1:]) - rss[0]) / rss[0]
    ttft = [j.ttft_s for j in measured if j.ttft_s is not None]
    latency = [j.latency_s for j in measured]
    result = {
        "requests": len(measured),
        "warmup_requests": len(warmup),
        "clients": args.clients,
        "adapters": list(adapters),
        "max_tokens": args.tokens,
        "errors": errors,
        "mismatches": len(problems) - errors,
        "tokens": tokens,
        "seconds": seconds,
        "requests_per_s": len(measured) / seconds,
        "tokens_per_s": tokens / seconds,
        "p50_latency_s": statistics.median(latency),
        "p99_latency_s": percentile(latency, 0.99),
        "p50_ttft_s": percentile(ttft, 0.5),
        "p99_ttft_s": percentile(ttft, 0.99),
        "rss_bytes": rss,
        "rss_growth": growth,
    }
    print(f"{len(measured)} requests (+{len(warmup)} warm-up) from {args.clients} clients over base, "
          f"{', '.join(adapters)}, auto; {tokens} tokens in {seconds:.1f} s")  # fmt: skip
    print(f"  errors {errors}, answers differing from the in-process engine {result['mismatches']}")
    print(f"  {result['requests_per_s']:.1f} requests/s, {result['tokens_per_s']:.0f} tokens/s; latency p50 "
          f"{result['p50_latency_s']:.2f} s, p99 {result['p99_latency_s']:.2f} s; streamed first token p50 "
          f"{result['p50_ttft_s']:.2f} s, p99 {result['p99_ttft_s']:.2f} s")  # fmt: skip
    print(f"  server RSS after warm-up and each quarter: {', '.join(f'{r / 2**20:.1f}' for r in rss)} MiB "
          f"(growth {growth:+.1%}, tolerance {args.rss_tolerance:.0%})")  # fmt: skip
    for problem in problems[:10]:
        print(f"  {problem}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if problems or growth > args.rss_tolerance:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
