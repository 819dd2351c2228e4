"""``moe-runtime profile`` (and ``--merge``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import UsageError
from ._common import (
    COMPUTE_DTYPES,
    add_verb,
    disk_offload_config,
    init_distributed,
    is_rank_zero,
    offload_summary,
)


def register(sub) -> None:
    parser = add_verb(
        sub,
        "profile",
        help="record which experts each task's tokens are routed to",
        description=(
            "Run the model over each task's examples and record routing per layer and expert. Writes "
            "DIR/<task>/summary.json (ESFT layout), raw counts, metadata, a heatmap per task, the "
            "cross-task overlap matrix and a terminal report. Under torchrun the examples are split "
            "across processes and the counts reduced (rank 0 writes). With --offload disk the routed experts "
            "are read from the checkpoint's files as the tokens need them and only --expert-budget of them "
            "are held in RAM: the same profile as resident (routing does not depend on where the weights live)."
        ),
        examples=[
            "moe-runtime profile --model demo --task arith=arith.jsonl --task code=code.jsonl --out prof/",
            "moe-runtime profile --model ./olmoe --task law=law.jsonl --max-tokens 65536 --trace --out prof/",
            "torchrun --nproc-per-node 2 -m moe_runtime.cli profile --model demo --task a=a.jsonl --out prof/",
            "moe-runtime profile --merge prof-part1/ prof-part2/ --out prof/",
            "moe-runtime profile --model ./dsv2-lite --offload disk --expert-budget 15% --task law=law.jsonl --out prof/",
            "moe-runtime profile --model ./dsv2-lite --plan",
            "moe-runtime profile --model ./dsv2-lite --offload disk --expert-budget 4GB --plan",
        ],
        threads=True,
        func=run,
    )
    parser.add_argument("--model", help="local checkpoint directory or 'demo'")
    parser.add_argument(
        "--task",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="task name and JSONL file (repeatable)",
    )
    parser.add_argument("--out", metavar="DIR", help="profile directory to write (required unless --plan)")
    parser.add_argument(
        "--max-tokens", type=int, default=None, metavar="N", help="at most N tokens per task (default: all)"
    )
    parser.add_argument(
        "--batch-size", type=int, default=8, metavar="B", help="sequences per forward (default 8)"
    )
    parser.add_argument(
        "--max-length", type=int, default=1024, metavar="L", help="cut sequences to L tokens (default 1024)"
    )
    parser.add_argument("--trace", action="store_true", help="also keep per-token expert ids (trace.npz)")
    parser.add_argument(
        "--merge", nargs="+", metavar="DIR", help="merge existing profiles of the same model instead"
    )
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument(
        "--compute-dtype",
        choices=COMPUTE_DTYPES,
        default="auto",
        help="dtype the model runs in; auto (default): float32 on a CPU for 16-bit checkpoints (bf16 matmuls "
        "are >10x slower without bf16 instructions; twice the RAM), the checkpoint's dtype otherwise",
    )
    parser.add_argument(
        "--offload",
        choices=("none", "disk"),
        default="none",
        help="'disk': read routed experts on demand straight from the checkpoint's safetensors files, "
        "keeping --expert-budget of them in RAM (same profile as resident) (default none)",
    )
    parser.add_argument(
        "--expert-budget",
        metavar="X",
        help="with --offload disk: share ('25%%', default) or bytes ('2GB') of routed experts held in RAM; "
        "at least top-k experts per layer",
    )
    parser.add_argument(
        "--plan",
        action="store_true",
        help="print the RAM the model needs in the compute dtype (with --offload: the budget's RAM, disk and "
        "bytes read per token) as JSON, from config.json and the safetensors headers only (no weights "
        "loaded), and exit",
    )
    parser.add_argument(
        "--color-scale",
        choices=("shared", "per-task"),
        default="shared",
        help="heatmap colour scale: one for every task, so colours compare across tasks (default), "
        "or each task's own maximum",
    )


def run(args: argparse.Namespace) -> int:
    from ..io import check_output_dir
    from ..profiler import merge_profiles

    offload = disk_offload_config(args)
    if args.plan:
        if not args.model or args.merge or args.task:
            raise UsageError("--plan takes --model only (it sizes the model, it reads no tasks)")
        import json

        from ..runtime.offload.plan import plan_memory

        print(json.dumps(plan_memory(args.model, offload, args.compute_dtype), indent=2))
        return 0
    if not args.out:
        raise UsageError("--out DIR is required")
    if args.merge:
        if args.model or args.task or offload is not None:
            raise UsageError("--merge takes profile directories only (no --model/--task/--offload)")
        print(merge_profiles(args.merge, args.out))
        _print_written(Path(args.out))
        return 0
    if not args.model:
        raise UsageError("--model is required")
    if not args.task:
        raise UsageError("at least one --task NAME=PATH is required")
    check_output_dir(args.out, replace_marker="meta.json")  # refused before profiling, not after
    for flag in ("max_tokens", "batch_size", "max_length"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise UsageError(f"--{flag.replace('_', '-')} must be positive, got {value}")
    import torch

    from ..data import parse_task_spec, read_examples
    from ..models import compute_dtype, find_moe_layers, load_model, load_tokenizer, stored_dtype
    from ..profiler import ProfileConfig, profile_model, write_profile

    tasks = {}
    for spec in args.task:
        name, path = parse_task_spec(spec)
        if name in tasks:
            raise UsageError(f"--task '{name}' given twice")
        tasks[name] = read_examples(path)
    config = ProfileConfig(
        max_tokens=args.max_tokens, batch_size=args.batch_size, max_length=args.max_length, trace=args.trace
    )
    if offload is None:
        model = load_model(
            args.model, dtype=compute_dtype(args.compute_dtype, torch.device("cpu"), stored_dtype(args.model))
        )
        find_moe_layers(model)  # a dense model fails here, before any work
        tokenizer = load_tokenizer(args.model)
        rank, _ = init_distributed()
        meta, profiles = profile_model(model, tokenizer, tasks, config)
    else:
        from ..runtime import MultiAdapterEngine

        # The engine's executor runs every token with the base experts, read through the tier's
        # slot caches; the recorder observes the same routing a resident forward makes.
        engine = MultiAdapterEngine.from_pretrained(args.model, dtype=args.compute_dtype, offload=offload)
        try:
            rank, _ = init_distributed()
            with engine.offload.threads():
                meta, profiles = profile_model(
                    engine.model, engine.tokenizer, tasks, config, parts=engine.offload.expert_parts
                )
            print(offload_summary(engine.offload), file=sys.stderr)
        finally:
            engine.close()
    meta.model = str(args.model)
    if is_rank_zero():
        print(write_profile(args.out, meta, profiles, plots=not args.no_plots, color_scale=args.color_scale))
        _print_written(Path(args.out))
    return 0


def _print_written(out: Path) -> None:
    """Name the profile directory and every plot in it, so the user knows what to open."""
    print(f"\nwrote {out}")
    for png in sorted(out.rglob("*.png")):
        print(f"  plot: {png}")
