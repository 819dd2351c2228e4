"""``moe-runtime demo`` (the main job, end to end on the embedded model) and ``demo-model``."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..demo.tasks import TASK_RECIPE
from ..errors import UsageError
from ._common import add_verb


def register(sub) -> None:
    parser = add_verb(
        sub,
        "demo",
        help="the main job end to end on the embedded model: profile, select, tune, serve",
        description=(
            "Profile the embedded model's bundled tasks, show how concentrated and how different their "
            "routing is (table + heatmaps), select experts for two held-out tasks the base model cannot do, "
            "tune an ESFT adapter for each (before/after table per adapter), serve a mixed batch, then the "
            "same batch with experts offloaded to disk under a budget, and write a summary PNG. "
            "About two and a half minutes on 2 quiet CPU cores."
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
        "--tune-steps",
        type=int,
        default=TASK_RECIPE["steps"],
        metavar="N",
        help=f"ESFT steps per adapter (default {TASK_RECIPE['steps']})",
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


def _clip(text: str, width: int) -> str:
    """The last ``width`` characters of a one-line view of ``text``, with an ellipsis where cut."""
    flat = text.replace("\n", " | ")
    return flat if len(flat) <= width else "…" + flat[-(width - 1) :]


def _first_line(text: str) -> str:
    stripped = text.strip()
    return stripped.splitlines()[0] if stripped else ""


def run_demo(args: argparse.Namespace) -> int:
    from ..data import read_examples
    from ..demo.tasks import DEMO_TASKS
    from ..tuning.evaluate import mean_token_loss

    for flag in ("max_tokens", "tune_steps"):
        if getattr(args, flag) <= 0:
            raise UsageError(f"--{flag.replace('_', '-')} must be positive")
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    model, tokenizer, files = _introduce(workdir)
    _profile_domains(model, tokenizer, files, workdir, args.max_tokens)
    selections = _select(model, tokenizer, files, workdir, DEMO_TASKS, args.max_tokens)
    general = read_examples(files["general"])
    base_general = mean_token_loss(model, tokenizer, general)[0]  # once: every adapter compares with it
    rows = [
        _tune_one(
            name, selections[name], model, tokenizer, files, workdir, args.tune_steps, general, base_general
        )
        for name in DEMO_TASKS
    ]
    requests, done = _serve_mixed(files, workdir, DEMO_TASKS)
    _serve_offloaded(workdir, DEMO_TASKS, requests, done)

    from ..demo.summary_plot import plot_demo_summary

    png = plot_demo_summary(rows, workdir / "summary.png")
    print(f"\nsummary plot (task score before/after, forgetting): {png}")
    print(f"demo finished in {time.perf_counter() - started:.0f}s; outputs in {workdir}")
    return 0


def _introduce(workdir: Path):
    from ..demo.corpus import DOMAINS
    from ..demo.tasks import DEMO_TASKS, TASK_DOMAINS, write_tasks
    from ..models import find_moe_layers, load_model, load_tokenizer

    _step("1. the embedded model and its tasks")
    model, tokenizer = load_model("demo", dtype="float32"), load_tokenizer("demo")
    info = find_moe_layers(model)
    summary = info.summary()
    print(
        f"{summary['model_type']}: {len(info.layers)} MoE layers x {summary['num_experts']} routed experts, "
        f"top-{summary['top_k']}, shared experts: {summary['shared_experts']}, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters"
    )
    files = write_tasks(workdir / "tasks")
    print("pretraining domains:", ", ".join(DOMAINS))
    print(
        "tuning tasks tried here (held out, never seen in pretraining): "
        + ", ".join(f"{t} ({TASK_DOMAINS[t]} domain)" for t in DEMO_TASKS)
    )
    return model, tokenizer, files


def _profile_domains(model, tokenizer, files: dict, workdir: Path, max_tokens: int) -> None:
    from ..data import read_examples
    from ..demo.corpus import DOMAINS
    from ..profiler import ProfileConfig, profile_model, write_profile

    _step("2. profile routing per domain")
    tasks = {name: read_examples(files[name]) for name in DOMAINS}
    meta, profiles = profile_model(
        model, tokenizer, tasks, ProfileConfig(max_tokens=max_tokens, batch_size=16)
    )
    meta.model = "demo"
    print(write_profile(workdir / "profile", meta, profiles))
    print(
        f"heatmaps (one colour scale): {workdir / 'profile'}/<domain>/heatmap.png; "
        f"overlap: {workdir / 'profile' / 'overlap.png'}"
    )


def _select(model, tokenizer, files: dict, workdir: Path, names, max_tokens: int) -> dict:
    from ..data import read_examples
    from ..io import atomic_write_json
    from ..profiler import ProfileConfig, expert_config, profile_model, select_experts
    from ..profiler.store import esft_summary
    from ..tuning.esft import ExpertSelection

    _step("3. select experts for each tuning task (ESFT token score, p=0.2)")
    train = {t: read_examples(files[f"{t}_train"]) for t in names}
    meta, profiles = profile_model(
        model, tokenizer, train, ProfileConfig(max_tokens=max_tokens, progress=False)
    )
    total = meta.num_experts * len(meta.layers)
    selections = {}
    for name in names:
        selected = select_experts(esft_summary(profiles[name], meta), "token")
        path = atomic_write_json(workdir / f"{name}_experts.json", expert_config(selected))
        selections[name] = ExpertSelection(experts={int(k): v for k, v in selected.items() if v})
        chosen = selections[name].num_experts
        print(f"{name}: {chosen} of {total} routed experts ({chosen / total:.1%}) -> {path}")
    return selections


def _tune_one(
    name: str,
    selection,
    base,
    tokenizer,
    files: dict,
    workdir: Path,
    steps: int,
    general: list,
    base_general: float,
) -> dict:
    """Tune one ESFT adapter, then print its compact before/after table; returns the table's row.

    ``base`` is the untouched base model and ``base_general`` its loss on ``general`` (the forgetting set).
    """
    from ..data import read_examples
    from ..models import find_moe_layers, load_model, pad_token_id
    from ..tuning import TrainConfig, TuneJob, apply_adapter
    from ..tuning.data import encode_examples
    from ..tuning.esft import tune_esft
    from ..tuning.evaluate import exact_match, mean_token_loss

    _step(f"4. tune an ESFT adapter for '{name}' ({steps} steps)")
    test = read_examples(files[f"{name}_test"])[:100]
    base_score = exact_match(base, tokenizer, test)[0]
    model = load_model("demo", dtype="float32")
    out = workdir / "adapters" / name
    log = workdir / "logs" / f"{name}.jsonl"
    config = TrainConfig(steps=steps, lr=TASK_RECIPE["lr"], batch_size=TASK_RECIPE["batch_size"], seed=0)
    start = time.perf_counter()
    job = TuneJob(
        model,
        find_moe_layers(model),
        encode_examples(tokenizer, read_examples(files[f"{name}_train"]), 256),
        config,
        out=out,
        pad_id=pad_token_id(tokenizer),
        work_dir=workdir / "adapters" / f".{name}.work",
        log_file=log,
    )
    result = tune_esft(job, selection)
    seconds = time.perf_counter() - start
    tuned = apply_adapter(load_model("demo", dtype="float32"), out)
    tuned_score = exact_match(tuned, tokenizer, test)[0]
    tuned_general = mean_token_loss(tuned, tokenizer, general)[0]
    total_params = sum(p.numel() for p in base.parameters())
    change = tuned_general - base_general
    print(f"{'':24}{'base':>10}{'ESFT':>10}")
    print(
        f"{f'{name} exact match':24}{base_score:>10.0%}{tuned_score:>10.0%}   ({len(test)} held-out prompts)"
    )
    print(f"{'general loss':24}{base_general:>10.3f}{tuned_general:>10.3f}   ({change:+.3f}: forgetting)")
    print(
        f"{'trained':24}{result['trainable_params']:>20,} parameters "
        f"({result['trainable_params'] / total_params:.1%} of the model, router frozen)"
    )
    print(f"{'adapter':24}{result['adapter_bytes'] / 1e6:>17.2f} MB -> {out}")
    print(f"{'training time':24}{seconds:>18.0f} s   (Trainer log: {log})")
    return {
        "task": name,
        "base_score": base_score,
        "tuned_score": tuned_score,
        "general_loss_change": change,
    }


def _serve_mixed(files: dict, workdir: Path, names) -> tuple[list, list]:
    from ..data import read_examples
    from ..runtime import DecodeConfig, MultiAdapterEngine, Request

    _step("5. serve a mixed batch: base model + both adapters, one process")
    engine = MultiAdapterEngine.from_pretrained("demo")
    for name in names:
        engine.add_adapter(name, workdir / "adapters" / name)
    requests = []
    for name in names:
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
        f"{len(requests)} requests ({len(names)} adapters + base) in one mixed batch: {tokens} tokens in "
        f"{elapsed:.2f}s ({tokens / elapsed:.0f} tokens/s); adapter slots hold {memory.live_bytes / 1e6:.2f} MB "
        f"on top of the {engine.base_bytes() / 1e6:.1f} MB base"
    )
    print("where the adapter and the base model answer differently:")
    for name in names:
        shown = 0
        for i in range(0, len(requests), 2):
            tuned, base = done[i], done[i + 1]
            if requests[i].adapter != name or shown == 3:
                continue
            if _first_line(tuned.completion) != _first_line(base.completion):
                shown += 1
                print(
                    f"  {_clip(requests[i].prompt, 44)!s:46} base: {_first_line(base.completion)!r:14} "
                    f"{name}: {_first_line(tuned.completion)!r}"
                )
    engine.close()
    return requests, done


def _serve_offloaded(workdir: Path, names, requests: list, done: list) -> None:
    from ..runtime import DecodeConfig, MultiAdapterEngine
    from ..runtime.offload import OffloadConfig

    _step("6. the same batch with the routed experts offloaded to disk, 25% of them kept in RAM")
    offloaded = MultiAdapterEngine.from_pretrained(
        "demo", offload=OffloadConfig(budget="25%", prefetch=("router",), cache_dir=str(workdir / "offload"))
    )
    for name in names:
        offloaded.add_adapter(name, workdir / "adapters" / name)
    start = time.perf_counter()
    done_offloaded = offloaded.generate(requests, DecodeConfig(max_new_tokens=16))
    elapsed = time.perf_counter() - start
    tokens = sum(len(c.token_ids) for c in done_offloaded)
    same = sum(a.token_ids == b.token_ids for a, b in zip(done, done_offloaded))
    stats, executor = offloaded.offload.stats, offloaded.offload
    print(
        f"{tokens} tokens in {elapsed:.2f}s ({tokens / elapsed:.0f} tokens/s); "
        f"{same}/{len(requests)} completions identical to the resident run; hit rate {stats.hit_rate:.1%} "
        f"(prefetch accuracy {stats.prefetch_accuracy:.1%}), {stats.bytes_read / 1e6:.1f} MB read; "
        f"routed experts in RAM {executor.resident_expert_bytes() / 1e6:.1f} MB of "
        f"{executor.offloaded_bytes() / 1e6:.1f} MB"
    )
    offloaded.close()
