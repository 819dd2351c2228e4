"""Serving benchmarks on the demo model with six quick ESFT adapters (one per pretraining domain).

``bench serve``: a Poisson trace of requests (demo task prompts, random adapters, 16-32 new tokens,
EOS ignored) at loads low / moderate / high relative to the measured single-request service time,
replayed twice on the same engine:

* **continuous**: the engine's background thread; each request is submitted at its arrival time and
  joins the running batch at the next step;
* **static** (the engine before continuous batching): a batch starts when the previous one finished
  and takes every request that arrived meanwhile; it runs until its last request is done.

Time to first token (TTFT) counts from the arrival in the trace. Throughput is generated tokens over
the time from the first arrival to the last completion; tokens/s per request is the mean over
requests of their tokens over their time from arrival to completion.

``bench auto-adapter``: requests with adapter ``"auto"`` over the held-out test prompts of the eight
demo tasks; a choice is correct when it is the adapter of the task's domain (``TASK_DOMAINS``).

The adapters: per domain, the base model's routing profile of its training data (the train prompts of
its tasks; prose: held-out prose documents) selects experts (ESFT token score), a few ESFT steps
train them, and the profile is stored beside the adapter (``routing_profile.json``), as ``tune`` does.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data import read_examples
from ..demo.corpus import DOMAINS
from ..demo.tasks import TASK_DOMAINS, TASKS, write_tasks
from ..models import find_moe_layers, load_model, load_tokenizer, pad_token_id
from ..profiler import ProfileConfig, profile_model, select_experts
from ..profiler.store import esft_summary
from ..runtime import DecodeConfig, MultiAdapterEngine, Request
from ..runtime.profiles import PROFILE_FILE, RoutingProfile, write_routing_profile

__all__ = ["ServeSettings", "bench_auto_adapter", "bench_serve", "domain_adapters"]


@dataclass
class ServeSettings:
    """Sizes of the serving benchmarks.

    Attributes:
        requests: requests in the Poisson trace.
        loads: arrival rates as multiples of the single-request service rate (low, moderate, high).
        min_new_tokens, max_new_tokens: each request's token count is drawn from this range.
        adapter_steps: ESFT steps per adapter.
        profile_tokens: tokens of each domain's training data profiled.
        auto_prompts: held-out prompts per task for the automatic adapter choice.
        seed: trace, prompts and adapters.
    """

    requests: int = 48
    loads: tuple[float, ...] = (0.5, 2.0, 6.0)
    min_new_tokens: int = 16
    max_new_tokens: int = 32
    adapter_steps: int = 3
    profile_tokens: int = 4096
    auto_prompts: int = 25
    seed: int = 0


def _domain_data(files: dict[str, Path]) -> dict[str, list]:
    """Training examples of each domain: its tasks' train prompts, or its held-out documents."""
    data = {}
    for domain in DOMAINS:
        per_task = [read_examples(files[f"{t}_train"]) for t in TASKS if TASK_DOMAINS[t] == domain]
        # interleaved, so a token budget takes every task's examples alike
        examples = [ex for group in zip(*per_task) for ex in group]
        data[domain] = examples or read_examples(files[domain])
    return data


def domain_adapters(work: Path, settings: ServeSettings, model: str = "demo") -> dict[str, Path]:
    """One quick ESFT adapter per demo domain under ``work/adapters`` (reused when already there)."""
    from ..tuning import TrainConfig, TuneJob
    from ..tuning.data import encode_examples
    from ..tuning.esft import ExpertSelection, tune_esft

    out = {d: work / "adapters" / d for d in DOMAINS}
    if all((p / PROFILE_FILE).is_file() for p in out.values()):
        return out
    files = write_tasks(work / "tasks", seed=settings.seed, n_train=400, n_test=100, n_text=100)
    data = _domain_data(files)
    tokenizer = load_tokenizer(model)
    base = load_model(model, dtype="float32")
    config = ProfileConfig(max_tokens=settings.profile_tokens, progress=False)
    meta, profiles = profile_model(base, tokenizer, data, config)
    del base
    for domain, path in out.items():
        profile = profiles[domain]
        selected = select_experts(esft_summary(profile, meta), "token")
        selection = ExpertSelection(experts={int(k): v for k, v in selected.items() if v})
        net = load_model(model, dtype="float32")
        train = TrainConfig(steps=settings.adapter_steps, lr=1e-3, batch_size=8, seed=settings.seed)
        job = TuneJob(
            net,
            find_moe_layers(net),
            encode_examples(tokenizer, data[domain], 256),
            train,
            out=path,
            pad_id=pad_token_id(tokenizer),
            work_dir=work / "adapters" / f".{domain}.work",
            progress=False,
        )
        tune_esft(job, selection)
        routing = RoutingProfile.from_counts(meta.layers, profile.counts, profile.tokens, task=domain)
        write_routing_profile(path, routing)
    return out


def _engine(model: str, adapters: dict[str, Path]) -> MultiAdapterEngine:
    engine = MultiAdapterEngine.from_pretrained(model)
    for name, path in adapters.items():
        engine.add_adapter(name, path)
    return engine


def bench_auto_adapter(work: Path, settings: ServeSettings, model: str = "demo") -> dict:
    """Accuracy of ``"auto"`` over the demo tasks' held-out prompts with the six domain adapters."""
    adapters = domain_adapters(work, settings, model)
    files = write_tasks(work / "tasks", seed=settings.seed, n_train=400, n_test=100, n_text=100)
    engine = _engine(model, adapters)
    per_task, confusion = {}, {}
    start = time.perf_counter()
    for task in TASKS:
        prompts = [ex.prompt for ex in read_examples(files[f"{task}_test"])[: settings.auto_prompts]]
        handles = engine.submit([Request(p, "auto", 1, id=i) for i, p in enumerate(prompts)])
        chosen = [h.result().adapter for h in handles]
        per_task[task] = sum(c == TASK_DOMAINS[task] for c in chosen) / len(chosen)
        confusion[task] = {name: chosen.count(name) for name in sorted(set(chosen))}
    seconds = time.perf_counter() - start
    engine.close()
    total = settings.auto_prompts * len(TASKS)
    return {
        "bench": "auto-adapter",
        "model": model,
        "adapters": list(adapters),
        "prompts": total,
        "accuracy": float(np.mean(list(per_task.values()))),
        "per_task": per_task,
        "chosen": confusion,
        "seconds": seconds,
        "target_accuracy": 0.9,
    }


def _trace(files: dict[str, Path], adapters: list[str], settings: ServeSettings, rate: float):
    """(arrival s, request) pairs of a Poisson process of ``rate`` requests/s (same prompts for every rate)."""
    rng = random.Random(settings.seed)
    prompts = [ex.prompt for t in TASKS for ex in read_examples(files[f"{t}_test"])[:20]]
    gaps = np.random.default_rng(settings.seed).exponential(1.0, settings.requests) / rate
    arrivals = np.cumsum(gaps) - gaps[0]
    requests = []
    for i, at in enumerate(arrivals):
        limit = rng.randint(settings.min_new_tokens, settings.max_new_tokens)
        adapter = rng.choice([*adapters, None])
        requests.append((float(at), Request(rng.choice(prompts), adapter, limit, id=i)))
    return requests


def _summary(trace, handles, start: float) -> dict:
    arrivals = np.array([start + at for at, _ in trace])
    first = np.array([h.first_token_at for h in handles])
    done = np.array([h.finished_at for h in handles])
    tokens = np.array([len(h.result().token_ids) for h in handles])
    ttft = first - arrivals
    return {
        "p50_ttft_s": float(np.percentile(ttft, 50)),
        "p99_ttft_s": float(np.percentile(ttft, 99)),
        "tokens_per_s": float(tokens.sum() / (done.max() - arrivals.min())),
        "tokens_per_s_per_request": float(np.mean(tokens / (done - arrivals))),
    }


def _sleep_until(deadline: float) -> None:
    delay = deadline - time.perf_counter()
    if delay > 0:
        time.sleep(delay)


def _continuous(engine: MultiAdapterEngine, trace, config: DecodeConfig) -> dict:
    engine.start()
    try:
        start, handles = time.perf_counter(), []
        for at, request in trace:
            _sleep_until(start + at)
            handles.append(engine.submit(request, config))
        for handle in handles:
            handle.result()
    finally:
        engine.stop()
    return _summary(trace, handles, start)


def _static(engine: MultiAdapterEngine, trace, config: DecodeConfig) -> dict:
    start, handles, i = time.perf_counter(), [], 0
    while i < len(trace):
        _sleep_until(start + trace[i][0])
        now = time.perf_counter() - start
        batch = []
        while i < len(trace) and trace[i][0] <= now:
            batch.append(trace[i][1])
            i += 1
        wave = engine.submit(batch, config)
        while not all(h.done for h in wave):
            engine.step()
        handles.extend(wave)
    return _summary(trace, handles, start)


def bench_serve(work: Path, settings: ServeSettings, model: str = "demo") -> dict:
    """Continuous vs static batching over the same Poisson traces at several loads."""
    adapters = domain_adapters(work, settings, model)
    files = write_tasks(work / "tasks", seed=settings.seed, n_train=400, n_test=100, n_text=100)
    engine = _engine(model, adapters)
    config = DecodeConfig(stop_on_eos=False)
    mean_tokens = (settings.min_new_tokens + settings.max_new_tokens) // 2
    probe = _trace(files, list(adapters), settings, 1.0)[0][1]
    probe = Request(probe.prompt, probe.adapter, mean_tokens)
    engine.generate([probe], config)  # warm-up
    times = []
    for _ in range(3):
        begin = time.perf_counter()
        engine.generate([probe], config)
        times.append(time.perf_counter() - begin)
    service = float(np.median(times))
    rates = []
    for load in settings.loads:
        rate = load / service
        trace = _trace(files, list(adapters), settings, rate)
        continuous = _continuous(engine, trace, config)
        static = _static(engine, trace, config)
        rates.append(
            {
                "load": load,
                "rate_rps": rate,
                **continuous,
                "static": static,
                "p99_ttft_speedup": static["p99_ttft_s"] / max(continuous["p99_ttft_s"], 1e-9),
                "throughput_ratio": continuous["tokens_per_s"] / max(static["tokens_per_s"], 1e-9),
            }
        )
    engine.close()
    moderate = rates[len(rates) // 2]
    return {
        "bench": "serve",
        "model": model,
        "adapters": list(adapters),
        "requests": settings.requests,
        "new_tokens": [settings.min_new_tokens, settings.max_new_tokens],
        "service_time_s": service,
        "threads": _threads(),
        "rates": rates,
        "moderate": {
            "load": moderate["load"],
            "p99_ttft_speedup": moderate["p99_ttft_speedup"],
            "throughput_ratio": moderate["throughput_ratio"],
            "targets": {"p99_ttft_speedup": 3.0, "throughput_ratio": 1.0},
        },
    }


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def format_serve_table(result: dict) -> str:
    """The per-rate table of :func:`bench_serve`."""
    head = (
        f"{'load':>5} {'req/s':>6} | {'p50 TTFT':>9} {'p99 TTFT':>9} {'tok/s':>7} {'tok/s/req':>9} | "
        f"{'static p50':>10} {'p99':>7} {'tok/s':>7} {'tok/s/req':>9} | {'p99 x':>6} {'thr x':>6}"
    )
    lines = [
        f"bench serve: {result['requests']} requests, {result['new_tokens'][0]}-{result['new_tokens'][1]} new "
        f"tokens, {len(result['adapters'])} adapters + base; single-request service time "
        f"{result['service_time_s']:.3f} s",
        head,
        "-" * len(head),
    ]
    for r in result["rates"]:
        s = r["static"]
        lines.append(
            f"{r['load']:>5.1f} {r['rate_rps']:>6.2f} | {r['p50_ttft_s']:>9.3f} {r['p99_ttft_s']:>9.3f} "
            f"{r['tokens_per_s']:>7.1f} {r['tokens_per_s_per_request']:>9.2f} | {s['p50_ttft_s']:>10.3f} "
            f"{s['p99_ttft_s']:>7.3f} {s['tokens_per_s']:>7.1f} {s['tokens_per_s_per_request']:>9.2f} | "
            f"{r['p99_ttft_speedup']:>6.2f} {r['throughput_ratio']:>6.2f}"
        )
    m = result["moderate"]
    lines.append(
        f"moderate load {m['load']}: p99 TTFT {m['p99_ttft_speedup']:.2f}x lower than static (target >= 3), "
        f"throughput {m['throughput_ratio']:.2f}x static (target >= 1)"
    )
    return "\n".join(lines)


def format_auto_table(result: dict) -> str:
    """The per-task table of :func:`bench_auto_adapter`."""
    lines = [
        f"bench auto-adapter: {result['prompts']} held-out prompts, adapters {', '.join(result['adapters'])}"
    ]
    for task, accuracy in result["per_task"].items():
        chosen = ", ".join(f"{k}: {v}" for k, v in result["chosen"][task].items())
        lines.append(f"  {task:<8} (domain {TASK_DOMAINS[task]:<6}) {accuracy:>6.0%}   chosen {chosen}")
    lines.append(f"accuracy {result['accuracy']:.1%} (target >= 90%)")
    return "\n".join(lines)
