"""``moe-runtime generate``: serve requests over the base model and many ESFT adapters at once."""

from __future__ import annotations

import argparse
import sys
import time

from ..errors import UsageError
from ._common import COMPUTE_DTYPES, add_verb, budget_flag


def register(sub) -> None:
    parser = add_verb(
        sub,
        "generate",
        help="serve requests over the base model and many adapters in mixed batches",
        description=(
            "Generate text with per-request adapters (ESFT or routed LoRA), all requests batched together "
            "over one base model (each token runs its own adapter's tuned or LoRA experts). --prompt prints "
            "one completion; "
            "--requests reads JSONL lines {'id', 'prompt', 'adapter': NAME or null, 'max_new_tokens'} and "
            "--output writes {'id', 'adapter', 'completion', 'token_ids'} per request, in input order. "
            "Greedy unless --sample. Adapters are checked against the base model first. With --offload disk "
            "the routed experts stay in the checkpoint files and only --expert-budget of them are cached in RAM; "
            "with --offload cpu they are all in host memory and --expert-budget of them on the GPU (same tokens "
            "as without offloading either way); cache statistics go to stderr. --stream prints the completion "
            "of --prompt as it is decoded (text deltas, flushed; it goes with --prompt only, --requests writes "
            "whole lines). A request's adapter (or --use) may be 'auto': the loaded adapter whose task routing "
            "profile (stored by tune, or given with --adapter-profile) is closest to the prompt's own routing "
            "serves it, and the output line names the adapter chosen."
        ),
        examples=[
            "moe-runtime generate --model demo --adapter arith=ad/arith --prompt '12 + 35 =' --use arith",
            "moe-runtime generate --model demo --adapter a=ad/a --adapter b=ad/b --requests req.jsonl --output out.jsonl",
            "moe-runtime generate --model ./olmoe --requests req.jsonl --output out.jsonl --sample --top-p 0.9 --seed 1",
            "moe-runtime generate --model ./olmoe --offload disk --expert-budget 25% --prefetch router --prompt 'Hi'",
            "moe-runtime generate --model demo --adapter arith=ad/arith --prompt '12 + 35 =' --use arith --stream",
            "moe-runtime generate --model demo --adapter a=ad/a --adapter b=ad/b --prompt '12 + 35 =' --use auto",
            "moe-runtime generate --model ./dsv2-lite --offload disk --expert-budget 4GB --plan",
            "moe-runtime generate --model ./dsv2-lite --offload disk --compute-dtype bfloat16 --prompt 'Hi'",
        ],
        threads=True,
        func=run,
    )
    add_model_flags(parser)
    parser.add_argument("--prompt", metavar="TEXT", help="one prompt; its completion is printed")
    parser.add_argument(
        "--use", metavar="NAME", help="adapter for --prompt: a name, or 'auto' (default: the base model)"
    )
    parser.add_argument(
        "--stream", action="store_true", help="print --prompt's completion as it is decoded (with --prompt)"
    )
    parser.add_argument("--requests", metavar="FILE", help="JSONL requests")
    parser.add_argument("--output", metavar="FILE", help="JSONL completions (with --requests)")
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=32,
        metavar="N",
        help="for requests that do not set max_new_tokens (default 32)",
    )
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument(
        "--batch-size", type=int, default=64, metavar="B", help="requests decoded together (default 64)"
    )
    add_offload_flags(parser)
    parser.add_argument(
        "--plan",
        action="store_true",
        help="print the RAM, disk and bytes read per token the budget implies (JSON, from config.json and the "
        "safetensors headers only: no weights loaded) and exit",
    )


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """--model, --adapter NAME=DIR, --adapter-profile, --allow-base-mismatch (shared with ``serve``)."""
    parser.add_argument("--model", required=True, help="local checkpoint directory or 'demo'")
    parser.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="load an adapter directory (ESFT or routed LoRA) under NAME (repeatable)",
    )
    parser.add_argument(
        "--adapter-profile",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="task routing profile of adapter NAME for 'auto' (a profile's task directory PROFILE/TASK or a "
        "routing_profile.json; default: the one tune stored in the adapter directory) (repeatable)",
    )
    parser.add_argument(
        "--allow-base-mismatch",
        action="store_true",
        help="load adapters tuned on other base weights (refused by default)",
    )


def add_offload_flags(parser: argparse.ArgumentParser) -> None:
    """--offload, --expert-budget, --cache-policy, --pin-profile, --prefetch (shared with ``serve``)."""
    parser.add_argument(
        "--offload",
        choices=("none", "cpu", "disk"),
        default="none",
        help="expert offloading: 'disk' reads routed experts on demand straight from the checkpoint's "
        "safetensors files (fused or one tensor per expert; --pack-experts reads a packed copy instead), "
        "keeping --expert-budget of them in RAM; 'cpu' keeps every expert in host memory and --expert-budget "
        "of them on the GPU (without a GPU the slots are RAM too: no memory saved) (default none)",
    )
    parser.add_argument(
        "--expert-budget",
        metavar="X",
        help="fast-tier share ('25%%', default) or bytes ('2GB') of routed experts, or a share of the fast "
        "tier's free memory ('80%%free': GPU memory with --offload cpu on a GPU)",
    )
    parser.add_argument(
        "--pack-experts",
        action="store_true",
        help="with --offload disk: read the experts from a packed copy (one aligned record per expert, made "
        "once under ~/.cache/moe_runtime or $MOE_RUNTIME_CACHE; costs the experts' bytes again on disk) "
        "instead of the checkpoint's files",
    )
    parser.add_argument(
        "--compute-dtype",
        choices=COMPUTE_DTYPES,
        default="auto",
        help="dtype every weight is computed in; experts stored narrower (bf16 on disk) are widened as they "
        "are read. auto (default): float32 on a CPU for 16-bit checkpoints (bf16 matmuls are >10x slower "
        "without bf16 instructions; the RAM held per weight doubles), the checkpoint's dtype otherwise",
    )
    parser.add_argument(
        "--cache-policy",
        choices=("lru", "lfu", "profile"),
        default="lru",
        help="expert eviction policy (default lru)",
    )
    parser.add_argument(
        "--pin-profile",
        metavar="DIR",
        help="routing profile whose most used experts the 'profile' policy pins",
    )
    parser.add_argument(
        "--prefetch",
        action="append",
        choices=("router", "trajectory"),
        default=[],
        help="prefetch predicted experts: next layer's router, or matching recent trajectories (repeatable)",
    )


def _adapters(specs: list[str], flag: str = "--adapter") -> dict[str, str]:
    adapters: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise UsageError(f"{flag} '{spec}': expected NAME=DIR")
        if name in adapters:
            raise UsageError(f"{flag} '{name}' given twice")
        if name == "auto" and flag == "--adapter":
            raise UsageError("--adapter 'auto': the name 'auto' is reserved (it lets the engine choose)")
        adapters[name] = path
    return adapters


def _check_args(args: argparse.Namespace) -> None:
    if args.plan:
        if args.pack_experts and args.offload != "disk":
            raise UsageError("--pack-experts goes with --offload disk")
        if args.prompt is not None or args.requests is not None or args.adapter:
            raise UsageError("--plan reads no prompts or adapters (it only sizes the model and budget)")
        return
    if (args.prompt is None) == (args.requests is None):
        raise UsageError("give exactly one of --prompt TEXT or --requests FILE")
    if args.requests is not None and not args.output:
        raise UsageError("--requests needs --output FILE")
    if args.output:
        from ..io import check_output_file

        check_output_file(args.output)  # refused before the model loads, not after generation
    if args.prompt is not None and args.output:
        raise UsageError("--output goes with --requests (--prompt prints its completion)")
    if args.use is not None and args.prompt is None:
        raise UsageError("--use goes with --prompt (requests name their adapter)")
    if args.stream and args.prompt is None:
        raise UsageError("--stream goes with --prompt (--requests writes whole JSONL lines)")
    check_engine_flags(args)


def check_engine_flags(args: argparse.Namespace) -> None:
    """The checks of :func:`add_model_flags` and :func:`add_offload_flags` flags (before anything loads)."""
    if args.allow_base_mismatch and not args.adapter:
        raise UsageError("--allow-base-mismatch goes with --adapter")
    if args.pack_experts and args.offload != "disk":
        raise UsageError("--pack-experts goes with --offload disk")
    if args.offload == "none" and (
        args.expert_budget is not None or args.prefetch or args.pin_profile or args.cache_policy != "lru"
    ):
        raise UsageError(
            "--expert-budget, --cache-policy, --pin-profile and --prefetch go with --offload disk or cpu"
        )
    if args.pin_profile and args.cache_policy != "profile":
        raise UsageError("--pin-profile goes with --cache-policy profile")
    if args.cache_policy == "profile" and not args.pin_profile:
        raise UsageError("--cache-policy profile needs --pin-profile DIR")


def _offload_config(args: argparse.Namespace):
    """The offload settings of the command line, or None (checked before the model is loaded)."""
    from ..runtime.offload import OffloadConfig

    if args.offload == "none":
        return None
    scores = None
    if args.pin_profile:
        from ..profiler import load_profile

        meta, profiles = load_profile(args.pin_profile)
        counts = sum(p.counts for p in profiles.values())
        scores = {layer: {e: float(c) for e, c in enumerate(row)} for layer, row in zip(meta.layers, counts)}
    config = OffloadConfig(
        tier=args.offload,
        budget=budget_flag("--expert-budget", "25%" if args.expert_budget is None else args.expert_budget),
        policy=args.cache_policy,
        prefetch=tuple(args.prefetch),
        profile_scores=scores,
        pack=args.pack_experts,
        compute_threads=getattr(args, "threads", None) or "auto",  # the edge's --threads, as resident
    )
    config.validate()
    return config


def adapter_profiles(args: argparse.Namespace, adapters: dict[str, str]) -> dict[str, str]:
    """``--adapter-profile NAME=DIR`` by adapter name (each naming an ``--adapter``)."""
    profiles = _adapters(args.adapter_profile, "--adapter-profile")
    unknown = sorted(set(profiles) - set(adapters))
    if unknown:
        raise UsageError(f"--adapter-profile '{unknown[0]}': no such --adapter")
    return profiles


def load_engine(args: argparse.Namespace, adapters: dict[str, str], profiles: dict[str, str], offload):
    """The engine of ``--model`` (offloaded as ``offload`` says) with ``adapters`` loaded and checked."""
    from ..runtime import MultiAdapterEngine

    engine = MultiAdapterEngine.from_pretrained(args.model, dtype=args.compute_dtype, offload=offload)
    for name, path in adapters.items():
        engine.add_adapter(
            name, path, allow_base_mismatch=args.allow_base_mismatch, profile=profiles.get(name)
        )
    return engine


def run(args: argparse.Namespace) -> int:
    from ..io import write_json_lines
    from ..runtime import DecodeConfig, Request, read_requests

    _check_args(args)
    if args.plan:
        import json

        from ..runtime.offload.plan import plan_memory

        print(json.dumps(plan_memory(args.model, _offload_config(args), args.compute_dtype), indent=2))
        return 0
    adapters = _adapters(args.adapter)
    config = DecodeConfig(
        max_new_tokens=args.max_new_tokens,
        do_sample=args.sample,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        max_batch_size=args.batch_size,
    )
    config.validate()
    if args.prompt is not None:
        if args.use is not None and args.use != "auto" and args.use not in adapters:
            loaded = ", ".join(adapters) or "none"
            raise UsageError(f"--use '{args.use}': no such --adapter (loaded: {loaded})")
        requests = [Request(prompt=args.prompt, adapter=args.use, id=0)]
    else:
        requests = read_requests(args.requests, adapters=adapters)
    profiles = adapter_profiles(args, adapters)
    offload = _offload_config(args)
    engine = load_engine(args, adapters, profiles, offload)
    start = time.perf_counter()
    if args.stream:
        handle = engine.submit(requests[0], config)
        for event in handle.events():
            print(event.text, end="", flush=True)
        print(flush=True)
        completions = [handle.result()]
    else:
        completions = engine.generate(requests, config)
    seconds = time.perf_counter() - start
    tokens = sum(len(c.token_ids) for c in completions)
    if args.prompt is not None:
        if not args.stream:
            print(completions[0].completion, flush=True)
        if args.use == "auto":
            print(f"adapter: {completions[0].adapter} (auto)", file=sys.stderr)
    else:
        write_json_lines(args.output, [c.to_json() for c in completions])
        print(
            f"served {len(completions)} requests over {len(adapters)} adapters ({tokens} tokens) -> {args.output}",
            file=sys.stderr,
        )
    print(
        f"generated {tokens} tokens in {seconds:.2f} s ({tokens / max(seconds, 1e-9):.1f} tokens/s)",
        file=sys.stderr,
    )
    if offload is not None:
        stats = engine.offload.stats
        print(
            f"offload: {engine.offload.num_slots} expert slots per layer, hit rate {stats.hit_rate:.3f}, "
            f"{stats.bytes_read / 1e6:.1f} MB read, {stats.stall_s:.2f} s stalled",
            file=sys.stderr,
        )
        if offload.tier == "cpu" and offload.device().type == "cpu":
            print("note: --offload cpu without a GPU: the expert slots are host memory too (no memory saved)",
                  file=sys.stderr)  # fmt: skip
    return 0
