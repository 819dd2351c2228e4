"""``moe-runtime demo`` (the main job, end to end on the embedded model) and ``demo-model``."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..errors import UsageError
from ._common import add_verb


def register(sub) -> None:
    parser = add_verb(
        sub,
        "demo",
        help="the main job end to end on the embedded model: profile, select, tune, serve",
        description=(
            "Profile the embedded model's bundled tasks, show how concentrated and how different their "
            "routing is (table + heatmaps), select experts per task, tune two ESFT adapters briefly and "
            "serve a mixed batch, then the same batch with experts offloaded to disk under a budget."
        ),
        examples=["moe-runtime demo", "moe-runtime demo --workdir /tmp/moe-demo"],
        func=run_demo,
    )
    parser.add_argument(
        "--workdir",
        default="moe-runtime-demo",
        metavar="DIR",
        help="where outputs go (default ./moe-runtime-demo)",
    )
    parser.add_argument(
        "--max-tokens", type=int, default=8192, metavar="N", help="tokens profiled per task (default 8192)"
    )
    parser.add_argument(
        "--tune-steps", type=int, default=60, metavar="N", help="ESFT steps per adapter (default 60)"
    )
    parser = add_verb(
        sub,
        "demo-model",
        help="write the embedded default model as a standard checkpoint directory",
        description=(
            "Write the embedded model (config.json, model.safetensors, tokenizer files) plus its task files "
            "(DIR/tasks) to DIR; plain transformers loads it without this package."
        ),
        examples=["moe-runtime demo-model --out ./demo-model"],
        func=run_demo_model,
    )
    parser.add_argument(
        "--out", required=True, metavar="DIR", help="directory to create (must not exist or be empty)"
    )


def run_demo_model(args: argparse.Namespace) -> int:
    from ..demo.export import write_demo_model

    out = write_demo_model(Path(args.out))
    print(f"wrote the embedded model to {out}")
    return 0


def _step(title: str) -> None:
    print(f"\n== {title}")


def run_demo(args: argparse.Namespace) -> int:
    from ..data import read_examples
    from ..demo.corpus import DOMAINS
    from ..demo.tasks import TASKS, write_tasks
    from ..io import atomic_write_json
    from ..models import find_moe_layers, load_model, load_tokenizer, pad_token_id
    from ..profiler import ProfileConfig, expert_config, profile_model, select_experts, write_profile
    from ..profiler.store import esft_summary
    from ..tuning import TrainConfig, TuneJob, apply_adapter
    from ..tuning.data import encode_examples
    from ..tuning.esft import ExpertSelection, tune_esft
    from ..tuning.evaluate import exact_match

    for flag in ("max_tokens", "tune_steps"):
        if getattr(args, flag) <= 0:
            raise UsageError(f"--{flag.replace('_', '-')} must be positive")
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    _step("1. the embedded model and its tasks")
    model, tokenizer = load_model("demo"), load_tokenizer("demo")
    info = find_moe_layers(model)
    summary = info.summary()
    print(
        f"{summary['model_type']}: {len(info.layers)} MoE layers x {summary['num_experts']} routed experts, "
        f"top-{summary['top_k']}, shared experts: {summary['shared_experts']}, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters"
    )
    files = write_tasks(workdir / "tasks")
    domains = {name: files[name] for name in DOMAINS}
    print("domains:", ", ".join(domains), "| tuning tasks:", ", ".join(TASKS))

    _step("2. profile routing per task")
    tasks = {name: read_examples(path) for name, path in domains.items()}
    meta, profiles = profile_model(
        model, tokenizer, tasks, ProfileConfig(max_tokens=args.max_tokens, batch_size=16)
    )
    meta.model = "demo"
    print(write_profile(workdir / "profile", meta, profiles))
    print(
        f"heatmaps: {workdir / 'profile'}/<task>/heatmap.png, overlap: {workdir / 'profile' / 'overlap.png'}"
    )

    _step("3. select experts for two tuning tasks (ESFT token score, p=0.2)")
    tune_tasks = [t for t in ("kv", "sort") if t in TASKS] or list(TASKS[:2])
    train = {t: read_examples(files[f"{t}_train"]) for t in tune_tasks}
    task_meta, task_profiles = profile_model(
        model, tokenizer, train, ProfileConfig(max_tokens=args.max_tokens, progress=False)
    )
    selections = {}
    for name in tune_tasks:
        selected = select_experts(esft_summary(task_profiles[name], task_meta), "token")
        path = atomic_write_json(workdir / f"{name}_experts.json", expert_config(selected))
        selections[name] = ExpertSelection(experts={int(k): v for k, v in selected.items() if v})
        chosen = selections[name].num_experts
        print(
            f"{name}: {chosen} of {meta.num_experts * len(meta.layers)} routed experts ({chosen / (meta.num_experts * len(meta.layers)):.0%}) -> {path}"
        )

    _step(f"4. tune two ESFT adapters ({args.tune_steps} steps each)")
    pad = pad_token_id(tokenizer)
    for name in tune_tasks:
        test = read_examples(files[f"{name}_test"])[:100]
        before = exact_match(load_model("demo"), tokenizer, test)[0]
        tuned_model = load_model("demo", dtype="float32")
        config = TrainConfig(steps=args.tune_steps, lr=1e-3, batch_size=16, seed=0)
        features = encode_examples(tokenizer, train[name], 256)
        out = workdir / "adapters" / name
        job = TuneJob(tuned_model, find_moe_layers(tuned_model), features, config, out=out, pad_id=pad)
        job.work_dir = workdir / "adapters" / f".{name}.work"
        result = tune_esft(job, selections[name])
        after = exact_match(apply_adapter(load_model("demo", dtype="float32"), out), tokenizer, test)[0]
        print(
            f"{name}: trained {result['trainable_params']:,} parameters, adapter {result['adapter_bytes'] / 1e6:.2f} MB; "
            f"exact match on 100 test prompts {before:.0%} -> {after:.0%} -> {out}"
        )

    _step("5. serve a mixed batch: base model + both adapters, one process")
    from ..runtime import DecodeConfig, MultiAdapterEngine, Request

    engine = MultiAdapterEngine.from_pretrained("demo")
    for name in tune_tasks:
        engine.add_adapter(name, workdir / "adapters" / name)
    requests = []
    for name in tune_tasks:
        for ex in read_examples(files[f"{name}_test"])[:8]:
            requests += [
                Request(ex.prompt, adapter=name, max_new_tokens=16),
                Request(ex.prompt, adapter=None, max_new_tokens=16),
            ]
    start = time.perf_counter()
    done = engine.generate(requests, DecodeConfig(max_new_tokens=16))
    elapsed = time.perf_counter() - start
    tokens = sum(len(c.token_ids) for c in done)
    memory = engine.memory()
    print(
        f"{len(requests)} requests ({len(tune_tasks)} adapters + base) in one mixed batch: {tokens} tokens in "
        f"{elapsed:.2f}s ({tokens / elapsed:.0f} tokens/s); adapter slots hold {memory.live_bytes / 1e6:.2f} MB "
        f"on top of the {engine.base_bytes() / 1e6:.1f} MB base"
    )
    for request, completion in [pair for i, pair in enumerate(zip(requests, done)) if i % 16 < 2]:
        print(
            f"  [{request.adapter or 'base'}] {request.prompt[-40:]!r} -> {completion.completion.strip().splitlines()[0] if completion.completion.strip() else ''!r}"
        )

    _step("6. the same batch with the routed experts offloaded to disk, 25% of them kept in RAM")
    from ..runtime.offload import OffloadConfig

    offloaded = MultiAdapterEngine.from_pretrained(
        "demo", offload=OffloadConfig(budget="25%", prefetch=("router",), cache_dir=str(workdir / "offload"))
    )
    for name in tune_tasks:
        offloaded.add_adapter(name, workdir / "adapters" / name)
    start = time.perf_counter()
    done_offloaded = offloaded.generate(requests, DecodeConfig(max_new_tokens=16))
    elapsed_offloaded = time.perf_counter() - start
    same = sum(a.token_ids == b.token_ids for a, b in zip(done, done_offloaded))
    stats, executor = offloaded.offload.stats, offloaded.offload
    print(
        f"{tokens} tokens in {elapsed_offloaded:.2f}s ({tokens / elapsed_offloaded:.0f} tokens/s); "
        f"{same}/{len(requests)} completions identical to the resident run; hit rate {stats.hit_rate:.1%} "
        f"(prefetch accuracy {stats.prefetch_accuracy:.1%}), {stats.bytes_read / 1e6:.1f} MB read; "
        f"routed experts in RAM {executor.resident_expert_bytes() / 1e6:.1f} MB of "
        f"{executor.offloaded_bytes() / 1e6:.1f} MB"
    )
    offloaded.close()
    print(f"\ndemo finished in {time.perf_counter() - started:.1f}s; outputs in {workdir}")
    return 0
