"""``moe-runtime bench``: measured benchmarks, printed as a table and written as JSON."""

from __future__ import annotations

import argparse

from ..demo.tasks import TASK_RECIPE
from ..errors import UsageError
from ._common import COMPUTE_DTYPES, add_verb, budget_flag

BENCHES = (
    "profile",
    "tune",
    "reroute",
    "offload",
    "esft-quality",
    "peft-mixed",
    "serve",
    "auto-adapter",
    "export",
    "scale",
    "cpu-peer",
    "kernels",
)
# moe_runtime.testing.shapes.SHAPES (named here: building the parser imports no torch)
SCALE_SHAPES = ("olmoe-1b-7b", "deepseek-v2-lite", "qwen3-30b-a3b", "mixtral-8x7b")


def register(sub) -> None:
    parser = add_verb(
        sub,
        "bench",
        help="run a benchmark (profile, tune, reroute, offload, esft-quality, peft-mixed, serve, auto-adapter, export, scale, cpu-peer, kernels)",
        description=(
            "Run one benchmark on the embedded model (or --model) and print a table; --json writes the "
            "numbers. Every figure is compared with a baseline measured in the same run."
        ),
        examples=[
            "moe-runtime bench profile --json bench_profile.json",
            "moe-runtime bench offload --json bench_offload.json",
            "moe-runtime bench offload --offload-size smoke --no-accelerate",
            "moe-runtime bench reroute --device cuda --dtype bfloat16 --json reroute_gpu.json",
            "moe-runtime bench offload --tier cpu --device cuda --json offload_gpu.json",
            "moe-runtime bench peft-mixed --repeats 3 --json bench_peft.json",
            "moe-runtime bench serve --json bench_serve.json   # continuous vs static batching, Poisson arrivals",
            "moe-runtime bench serve --requests 8 --loads 1,4 --serve-tokens 4,8 --adapter-steps 1   # seconds",
            "moe-runtime bench auto-adapter --json bench_auto.json   # adapter 'auto' accuracy, 6 adapters",
            "moe-runtime bench export --json bench_export.json   # peak RSS of export vs checkpoint size",
            "moe-runtime bench scale --shape deepseek-v2-lite --layers 4 --budget 25% --workdir /tmp/scale --json s.json",
            "moe-runtime bench scale --shape olmoe-1b-7b --layers 2 --write-only /tmp/scale/olmoe-2",
            "moe-runtime bench scale --checkpoint ./dsv2-lite --shape deepseek-v2-lite --budget 6GB --no-accelerate",
            "moe-runtime bench scale --checkpoint ./dsv2-lite --budget 10% --layers-series 1/4,1/2,all "
            "--workdir /tmp/scale --json growth.json --plot growth.png",
            "moe-runtime bench cpu-peer --converter llama.cpp/convert_hf_to_gguf.py --json cpu_peer.json",
            "moe-runtime bench cpu-peer --hidden 64 --layers 2 --repeats 1 --new-tokens 8   # a tiny model, seconds",
            "moe-runtime bench kernels --json kernels.json   # compiled few-row products vs the GEMM, by rows",
            "MOE_RUNTIME_CPU_ISA=avx2 moe-runtime bench kernels --thread-counts 1   # the AVX2 kernels",
        ],
        threads=True,
        func=run,
    )
    parser.add_argument("name", choices=BENCHES, help="which benchmark")
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON")
    parser.add_argument("--model", default="demo", help="model for benches that take one (default: demo)")
    parser.add_argument(
        "--repeats", type=int, default=5, help="timed repeats, the median reported (default 5)"
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"training steps (tune: 20, esft-quality: {TASK_RECIPE['steps']})",
    )
    parser.add_argument(
        "--tasks",
        default="compare,maximum,field",
        help="esft-quality: demo tasks to tune on (default compare,maximum,field: the tasks with headroom)",
    )
    parser.add_argument(
        "--seeds", default="0,1,2", metavar="S,S,...", help="esft-quality: training seeds (default 0,1,2)"
    )
    parser.add_argument(
        "--seed", type=int, default=None, help="esft-quality: one training seed (instead of --seeds)"
    )
    parser.add_argument(
        "--methods",
        default=None,
        metavar="M,M,...",
        help="esft-quality: methods to run (default all: full, lora, esft_gate, esft_token, routed_lora, "
        "esft_lora, mola, dynmole; full is the reference of the ratios)",
    )
    parser.add_argument(
        "--lr",
        action="append",
        default=[],
        metavar="METHOD=X",
        help="esft-quality: a method's learning rate (repeatable; defaults in docs/benchmarks.md)",
    )
    parser.add_argument(
        "--offload-size",
        choices=("full", "smoke"),
        default="full",
        help="offload, export: 'full' = a random checkpoint of ~480 MB (offload) / ~610 MB (export), "
        "'smoke' = a tiny one (seconds)",
    )
    parser.add_argument(
        "--expert-budget",
        default="25%",
        metavar="X",
        help="offload, cpu-peer: share of experts (default 25%%)",
    )
    parser.add_argument(
        "--no-accelerate", action="store_true", help="offload: skip the transformers + accelerate baseline"
    )
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="reroute, offload: where the model computes (default cpu); offload on cuda needs --tier cpu",
    )
    parser.add_argument(
        "--tier",
        choices=("disk", "cpu"),
        default="disk",
        help="offload: the slow tier, 'disk' (checkpoint files, fast tier RAM) or 'cpu' (host memory, fast "
        "tier --device) (default disk)",
    )
    parser.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16", "float16"),
        default="auto",
        help="reroute: the model's dtype (default auto: the checkpoint's)",
    )
    parser.add_argument("--adapters", type=int, default=4, help="peft-mixed: peft LoRA adapters (default 4)")
    parser.add_argument(
        "--requests",
        type=int,
        default=24,
        metavar="N",
        help="serve: requests in the Poisson trace (default 24)",
    )
    parser.add_argument(
        "--loads",
        default="1,3,8",
        metavar="X,X,...",
        help="serve: arrival rates as multiples of the single-request service rate (default 1,3,8: low, "
        "moderate, high; the middle one is the moderate load of the targets)",
    )
    parser.add_argument(
        "--serve-tokens",
        default="16,32",
        metavar="MIN,MAX",
        help="serve: new tokens per request drawn from MIN..MAX, EOS ignored (default 16,32)",
    )
    parser.add_argument(
        "--adapter-steps",
        type=int,
        default=3,
        metavar="N",
        help="serve, auto-adapter: ESFT steps of each of the six domain adapters (default 3)",
    )
    parser.add_argument(
        "--auto-prompts",
        type=int,
        default=25,
        metavar="N",
        help="auto-adapter: held-out prompts per task (default 25, 8 tasks)",
    )
    parser.add_argument(
        "--work-dir",
        metavar="DIR",
        help="serve, auto-adapter: keep the tuned adapters and task files here and reuse them (default: a "
        "temporary directory)",
    )
    parser.add_argument(
        "--new-tokens",
        type=int,
        default=None,
        help="peft-mixed, scale, cpu-peer: tokens generated per request (default 16, scale 4, cpu-peer 32)",
    )
    scale = parser.add_argument_group(
        "scale",
        "bench scale: a random bf16 checkpoint with a real model's config and hub layout (written into "
        "--workdir after a free-disk check, deleted afterwards unless --keep; or --checkpoint), served with "
        "--offload disk at --budget from a cold page cache, one request at a time; reports bytes read in "
        "prefill and decode, decode tokens/s against the bound (compute time + decode bytes / cold read "
        "bandwidth), peak RSS, and transformers + accelerate disk offload at the same RAM",
    )
    scale.add_argument(
        "--shape", choices=SCALE_SHAPES, default="deepseek-v2-lite", help="the real model to copy"
    )
    scale.add_argument(
        "--layers", type=int, metavar="N", help="decoder layers (default: the model's; cpu-peer 8)"
    )
    scale.add_argument(
        "--budget", default="25%", metavar="X", help="expert budget: share or bytes (default 25%%)"
    )
    scale.add_argument(
        "--workdir",
        metavar="DIR",
        help="where the checkpoint and caches go (default: $TMPDIR/moe_runtime_scale)",
    )
    scale.add_argument("--checkpoint", metavar="DIR", help="use this checkpoint instead of writing one")
    scale.add_argument("--keep", action="store_true", help="keep the written checkpoint")
    scale.add_argument("--write-only", metavar="DIR", help="only write the checkpoint to DIR and exit")
    scale.add_argument(
        "--pack-experts",
        action="store_true",
        help="also build the opt-in packed copy (time, disk) and serve from it too",
    )
    scale.add_argument(
        "--no-resident", action="store_true", help="skip the resident run (tokens check, compute time)"
    )
    scale.add_argument("--prompts", type=int, default=2, help="requests, each decoded alone (default 2)")
    scale.add_argument("--prompt-len", type=int, default=10, help="prompt tokens (default 10)")
    peer = parser.add_argument_group(
        "cpu-peer",
        "bench cpu-peer: llama.cpp (llama-cpp-python, the [peer] extra) against moe-runtime resident and "
        "--offload disk at --expert-budget, on one random float32 Mixtral (hidden 1024, 8 layers, 16 experts "
        "top-2, 426M parameters) with the demo tokenizer, converted to GGUF f32 by llama.cpp's own converter; "
        "4 prompts of 20-30 tokens, greedy, batch 1, each run a child process, the runs interleaved; reports "
        "decode and prefill tok/s, load time, peak RSS and the ratios to llama.cpp, and checks the tokens",
    )
    peer.add_argument(
        "--converter",
        metavar="PATH",
        help="llama.cpp's convert_hf_to_gguf.py (default: $LLAMA_CPP_CONVERTER, or a llama.cpp folder in "
        "$LLAMA_CPP_DIR, . or ~)",
    )
    peer.add_argument(
        "--thread-counts",
        default="1,2",
        metavar="N,N,...",
        help="compute threads of each run (cpu-peer, kernels; default 1,2)",
    )
    peer.add_argument("--hidden", type=int, default=1024, metavar="N", help="hidden size (default 1024)")
    peer.add_argument("--no-offload", action="store_true", help="skip the --offload disk runs")
    scale.add_argument(
        "--compute-dtype",
        choices=COMPUTE_DTYPES,
        default="auto",
        help="dtype the experts and other weights are computed in (default auto: float32 on the CPU)",
    )
    scale.add_argument(
        "--compute-layers",
        default="2,4",
        metavar="N,N",
        help="layer counts of the reduced copies (same widths) timed resident for the bound's compute "
        "time when the model does not fit in RAM (default 2,4; a line through them, read at the full count)",
    )
    scale.add_argument(
        "--layers-series",
        metavar="SPEC",
        help="cost growth: the same bench at these fractions or counts of the shape's layers, e.g. "
        "1/4,1/2,all (reduced copies written into --workdir one at a time; each point's JSON kept in "
        "WORKDIR/series/ and reused by a later series with the same settings); prints a table and writes "
        "a PNG (--plot)",
    )
    scale.add_argument(
        "--plot",
        metavar="FILE",
        help="--layers-series: the PNG (default: --json with .png, else WORKDIR/scale_growth.png)",
    )


def _table(rows: dict, indent: str = "") -> str:
    width = max(len(k) for k in rows)
    out = []
    for key, value in rows.items():
        if isinstance(value, list):
            continue
        if isinstance(value, dict):
            out.append(f"{indent}{key}:")
            out.append(_table(value, indent + "  "))
            continue
        text = f"{value:,.4g}" if isinstance(value, float) else str(value)
        out.append(f"{indent}{key:<{width}}  {text}")
    return "\n".join(out)


def _demo_tasks(directory):
    from ..demo.tasks import write_tasks

    return write_tasks(directory)


def _bench_tune(args: argparse.Namespace) -> dict:
    import json
    import tempfile
    from pathlib import Path

    from ..bench.tune_bench import bench_tune
    from ..data import read_examples
    from ..io import atomic_write_json
    from ..models import load_model, load_tokenizer
    from ..profiler import ProfileConfig, expert_config, profile_model, select_experts
    from ..profiler.store import esft_summary

    with tempfile.TemporaryDirectory() as tmp:
        files = _demo_tasks(Path(tmp) / "tasks")
        train = files["arith_train"]
        model, tokenizer = load_model(args.model), load_tokenizer(args.model)
        meta, profiles = profile_model(
            model, tokenizer, {"arith": read_examples(train)}, ProfileConfig(max_tokens=16384, progress=False)
        )
        cfg = atomic_write_json(
            Path(tmp) / "cfg.json",
            expert_config(select_experts(esft_summary(profiles["arith"], meta), "token")),
        )
        del model
        result = bench_tune(args.model, train, cfg, steps=args.steps or 20)
        result["experts"] = json.loads(cfg.read_text())
    return {"bench": "tune", "model": args.model, "task": "arith", **result}


def _bench_quality(args: argparse.Namespace) -> dict:
    import tempfile
    from pathlib import Path

    from ..bench.quality_bench import METHODS, QualitySettings, bench_esft_quality
    from ..demo.tasks import CONTINUATION_TASKS, TASK_DOMAINS, TASKS

    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in names if t not in TASKS]
    if unknown or len(names) < 1:
        raise UsageError(
            f"--tasks: unknown task '{unknown[0] if unknown else ''}' (choose from {', '.join(TASKS)})"
        )
    try:
        seeds = (args.seed,) if args.seed is not None else tuple(int(s) for s in args.seeds.split(","))
    except ValueError:
        raise UsageError(f"--seeds '{args.seeds}': give integers separated by commas, e.g. 0,1,2") from None
    settings = QualitySettings(seeds=seeds)
    if args.steps:
        settings.steps = args.steps
    if args.methods is not None:
        settings.methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
        bad = [m for m in settings.methods if m not in METHODS]
        if bad or not settings.methods:
            raise UsageError(
                f"--methods: unknown method '{bad[0] if bad else ''}' (choose from {', '.join(METHODS)})"
            )
    for item in args.lr:
        method, sep, value = item.partition("=")
        if not sep or method not in METHODS:
            raise UsageError(f"--lr '{item}': expected METHOD=X with METHOD one of {', '.join(METHODS)}")
        try:
            settings.lr[method] = float(value)
        except ValueError:
            raise UsageError(f"--lr '{item}': '{value}' is not a number") from None
        if not settings.lr[method] > 0:
            raise UsageError(f"--lr '{item}': the learning rate must be positive")
    with tempfile.TemporaryDirectory() as tmp:
        files = _demo_tasks(Path(tmp) / "tasks")
        tasks = {t: (files[f"{t}_train"], files[f"{t}_test"]) for t in names}
        other_tasks = {
            t: {o: files[f"{o}_test"] for o in CONTINUATION_TASKS if TASK_DOMAINS[o] != TASK_DOMAINS[t]}
            for t in names
        }
        result = bench_esft_quality(args.model, tasks, files["general"], settings, other_tasks=other_tasks)
    return {"bench": "esft-quality", "model": args.model, "tasks": names, **result}


def run(args: argparse.Namespace) -> int:
    from ..io import atomic_write_json, check_output_file

    if args.repeats <= 0:
        raise UsageError(f"--repeats must be positive, got {args.repeats}")
    _check_device(args)
    if args.json:
        check_output_file(args.json)  # refused before the benchmark runs, not after
    if args.name == "profile":
        result = _bench_profile(args)
    elif args.name == "reroute":
        from ..bench.reroute_bench import bench_reroute

        dtype = None if args.dtype == "auto" else args.dtype
        result = bench_reroute(args.model, repeats=args.repeats, device=args.device, dtype=dtype)
        result = {"bench": "reroute", "model": args.model, **result}
    elif args.name == "tune":
        result = _bench_tune(args)
    elif args.name == "esft-quality":
        result = _bench_quality(args)
    elif args.name == "offload":
        result = _bench_offload(args)
    elif args.name in ("serve", "auto-adapter"):
        result = _bench_serving(args)
    elif args.name == "export":
        from ..bench.export_bench import bench_export

        result = {"bench": "export", **bench_export(smoke=args.offload_size == "smoke")}
    elif args.name == "scale":
        result = _bench_scale(args)
        if result is None:
            return 0
        if "points" in result:  # --layers-series
            from ..bench.scale_series import format_series_table

            print(format_series_table(result))
            print(f"plot: {result['plot']}")
            if args.json:
                atomic_write_json(args.json, result)
                print(f"json: {args.json}")
            return 0
    elif args.name == "cpu-peer":
        result = _bench_cpu_peer(args)
    elif args.name == "kernels":
        from ..bench.kernels_bench import bench_kernels

        result = bench_kernels(repeats=args.repeats, thread_counts=_thread_counts(args))
    elif args.name == "peft-mixed":
        from ..bench.peft_bench import bench_peft_mixed

        args.new_tokens = 16 if args.new_tokens is None else args.new_tokens
        if args.adapters <= 0 or args.new_tokens <= 0:
            raise UsageError("--adapters and --new-tokens must be positive")
        result = {
            "bench": "peft-mixed",
            **bench_peft_mixed(
                args.model, adapters=args.adapters, new_tokens=args.new_tokens, repeats=args.repeats
            ),
        }
    else:
        raise UsageError(f"bench {args.name} is not yet available in this version")
    if args.name == "esft-quality":
        from ..bench.quality_bench import format_table

        print(format_table(result))
    elif args.name in ("serve", "auto-adapter"):
        from ..bench.serve_bench import format_auto_table, format_serve_table

        print(format_serve_table(result) if args.name == "serve" else format_auto_table(result))
    elif args.name == "cpu-peer":
        from ..bench.cpu_peer import format_table

        print(format_table(result))
    elif args.name == "kernels":
        from ..bench.kernels_bench import format_table

        print(format_table(result))
    else:
        print(_table(result))
    if args.json:
        atomic_write_json(args.json, result)
    return 0


def _serve_settings(args: argparse.Namespace):
    from ..bench.serve_bench import ServeSettings

    try:
        loads = tuple(float(x) for x in args.loads.split(","))
    except ValueError:
        raise UsageError(f"--loads '{args.loads}': give numbers separated by commas, e.g. 0.5,2,6") from None
    try:
        low, high = (int(x) for x in args.serve_tokens.split(","))
    except ValueError:
        raise UsageError(f"--serve-tokens '{args.serve_tokens}': give MIN,MAX, e.g. 16,32") from None
    if not loads or any(not x > 0 for x in loads):
        raise UsageError(f"--loads '{args.loads}': loads must be positive")
    if not 0 < low <= high:
        raise UsageError(f"--serve-tokens '{args.serve_tokens}': need 0 < MIN <= MAX")
    for flag, value in (("--requests", args.requests), ("--adapter-steps", args.adapter_steps),
                        ("--auto-prompts", args.auto_prompts)):  # fmt: skip
        if value <= 0:
            raise UsageError(f"{flag} must be positive, got {value}")
    return ServeSettings(
        requests=args.requests,
        loads=loads,
        min_new_tokens=low,
        max_new_tokens=high,
        adapter_steps=args.adapter_steps,
        auto_prompts=args.auto_prompts,
    )


def _bench_serving(args: argparse.Namespace) -> dict:
    import tempfile
    from pathlib import Path

    from ..bench.serve_bench import bench_auto_adapter, bench_serve

    if args.model != "demo":
        raise UsageError(f"--model {args.model}: bench {args.name} runs on the demo model and its tasks")
    settings = _serve_settings(args)
    run_bench = bench_serve if args.name == "serve" else bench_auto_adapter
    if args.work_dir:
        return run_bench(Path(args.work_dir), settings)
    with tempfile.TemporaryDirectory() as tmp:
        return run_bench(Path(tmp), settings)


def _check_device(args: argparse.Namespace) -> None:
    """``--device``, ``--tier`` and ``--dtype`` go with the benches that take them, and cuda must exist."""
    if args.device != "cpu" and args.name not in ("reroute", "offload"):
        raise UsageError(
            f"--device {args.device}: bench {args.name} runs on the cpu (reroute and offload take --device)"
        )
    if args.tier != "disk" and args.name != "offload":
        raise UsageError(f"--tier {args.tier} goes with bench offload")
    if args.dtype != "auto" and args.name != "reroute":
        raise UsageError(f"--dtype {args.dtype} goes with bench reroute")
    if args.name == "offload" and args.device == "cuda" and args.tier != "cpu":
        raise UsageError(
            "--device cuda: bench offload computes on the GPU with --tier cpu only (disk: fast tier RAM)"
        )
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UsageError(f"--device cuda: CUDA is not available (torch {torch.__version__})")


def _bench_scale(args: argparse.Namespace) -> dict | None:
    import sys
    import tempfile
    from pathlib import Path

    from ..bench.scale_bench import ScaleBenchSettings, bench_scale
    from ..io import check_output_file
    from ..testing.shapes import shape_config, write_checkpoint

    budget_flag("--budget", args.budget)
    if args.write_only:
        out = write_checkpoint(shape_config(args.shape, layers=args.layers), args.write_only, progress=True)
        print(out)
        return None
    try:
        compute_layers = tuple(int(x) for x in args.compute_layers.split(","))
    except ValueError:
        raise UsageError(f"--compute-layers '{args.compute_layers}': give layer counts, e.g. 2,4") from None
    if not compute_layers or min(compute_layers) < 1:
        raise UsageError(f"--compute-layers '{args.compute_layers}': layer counts must be positive")
    settings = ScaleBenchSettings(
        shape=args.shape,
        layers=args.layers,
        budget=args.budget,
        prompts=args.prompts,
        prompt_len=args.prompt_len,
        new_tokens=4 if args.new_tokens is None else args.new_tokens,
        pack=args.pack_experts,
        accelerate=not args.no_accelerate,
        resident=not args.no_resident,
        compute_dtype=args.compute_dtype,
        compute_layers=compute_layers,
    )
    if min(settings.prompts, settings.prompt_len, settings.new_tokens) <= 0:
        raise UsageError("--prompts, --prompt-len and --new-tokens must be positive")
    if args.checkpoint and not Path(args.checkpoint).is_dir():
        raise UsageError(f"--checkpoint {args.checkpoint}: no such directory")
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.gettempdir()) / "moe_runtime_scale"
    if args.layers_series:
        from ..bench.scale_series import bench_scale_series

        if args.layers is not None:
            raise UsageError("--layers-series sets the layer counts itself: drop --layers")
        plot = args.plot or (
            Path(args.json).with_suffix(".png") if args.json else workdir / "scale_growth.png"
        )
        check_output_file(plot)
        return bench_scale_series(
            settings,
            spec=args.layers_series,
            workdir=workdir,
            checkpoint=args.checkpoint,
            keep=args.keep,
            plot=plot,
            log=lambda line: print(line, file=sys.stderr, flush=True),
        )
    if args.plot:
        raise UsageError("--plot goes with --layers-series")
    result = bench_scale(settings, workdir=workdir, checkpoint=args.checkpoint, keep=args.keep)
    return {"bench": "scale", **result}


def _thread_counts(args: argparse.Namespace) -> tuple[int, ...]:
    try:
        threads = tuple(int(x) for x in args.thread_counts.split(","))
    except ValueError:
        raise UsageError(f"--thread-counts '{args.thread_counts}': give whole numbers, e.g. 1,2") from None
    if not threads or any(t <= 0 for t in threads):
        raise UsageError(f"--thread-counts '{args.thread_counts}': thread counts must be positive")
    return threads


def _bench_cpu_peer(args: argparse.Namespace) -> dict:
    from ..bench.cpu_peer import CpuPeerSettings, bench_cpu_peer, check_peer_installed
    from ..bench.cpu_peer_convert import find_converter

    threads = _thread_counts(args)
    if budget_flag("--expert-budget", args.expert_budget).share is None:
        raise UsageError(f"--expert-budget {args.expert_budget}: bench cpu-peer takes a share (e.g. 25%)")
    settings = CpuPeerSettings(
        hidden_size=args.hidden,
        num_hidden_layers=8 if args.layers is None else args.layers,
        new_tokens=32 if args.new_tokens is None else args.new_tokens,
        repeats=args.repeats,
        threads=threads,
        offload_budget=None if args.no_offload else args.expert_budget,
    )
    settings.validate()
    check_peer_installed()
    return bench_cpu_peer(settings, find_converter(args.converter))


def _bench_profile(args: argparse.Namespace) -> dict:
    from ..bench.profile_bench import bench_profile
    from ..data import Example
    from ..demo.corpus import DOMAINS
    from ..demo.tasks import domain_texts
    from ..models import load_model, load_tokenizer

    model = load_model(args.model)
    tokenizer = load_tokenizer(args.model)
    examples = [Example(text=text) for domain in DOMAINS for text in domain_texts(domain, 100)]
    result = bench_profile(model, tokenizer, examples, repeats=args.repeats)
    return {"bench": "profile", "model": args.model, **result}


def _bench_offload(args: argparse.Namespace) -> dict:
    from ..bench.offload_bench import OffloadBenchSettings, bench_offload

    if budget_flag("--expert-budget", args.expert_budget).share is None:
        raise UsageError(f"--expert-budget {args.expert_budget}: bench offload takes a share (e.g. 25%)")
    settings = OffloadBenchSettings.smoke() if args.offload_size == "smoke" else OffloadBenchSettings()
    settings.budget = args.expert_budget
    settings.accelerate = not args.no_accelerate
    settings.tier, settings.device = args.tier, args.device
    settings.threads = getattr(args, "threads", None)  # resident and offloaded children compute alike
    result = {"bench": "offload", **bench_offload(settings)}
    if args.offload_size == "smoke":
        result["note"] = "smoke size: shows the benchmark runs; its timings and memory figures mean nothing"
    return result
