"""``moe-runtime bench``: measured benchmarks, printed as a table and written as JSON."""

from __future__ import annotations

import argparse

from ..errors import UsageError
from ._common import add_verb

BENCHES = ("profile", "tune", "reroute", "offload", "esft-quality")


def register(sub) -> None:
    parser = add_verb(
        sub,
        "bench",
        help="run a benchmark (profile, tune, reroute, offload, esft-quality)",
        description=(
            "Run one benchmark on the embedded model (or --model) and print a table; --json writes the "
            "numbers. Every figure is compared with a baseline measured in the same run."
        ),
        examples=["moe-runtime bench profile --json bench_profile.json"],
        func=run,
    )
    parser.add_argument("name", choices=BENCHES, help="which benchmark")
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON")
    parser.add_argument("--model", default="demo", help="model for benches that take one (default: demo)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (median reported)")


def _table(rows: dict) -> str:
    width = max(len(k) for k in rows)
    out = []
    for key, value in rows.items():
        if isinstance(value, list):
            continue
        text = f"{value:,.3f}" if isinstance(value, float) else str(value)
        out.append(f"{key:<{width}}  {text}")
    return "\n".join(out)


def run(args: argparse.Namespace) -> int:
    from ..io import atomic_write_json

    if args.repeats <= 0:
        raise UsageError(f"--repeats must be positive, got {args.repeats}")
    if args.name == "profile":
        result = _bench_profile(args)
    else:
        raise UsageError(f"bench {args.name} is not yet available in this version")
    print(_table(result))
    if args.json:
        atomic_write_json(args.json, result)
    return 0


def _bench_profile(args: argparse.Namespace) -> dict:
    from ..bench.profile_bench import bench_profile
    from ..demo.tasks import profile_examples
    from ..models import load_model, load_tokenizer

    model = load_model(args.model)
    tokenizer = load_tokenizer(args.model)
    examples = [ex for exs in profile_examples().values() for ex in exs]
    result = bench_profile(model, tokenizer, examples, repeats=args.repeats)
    return {"bench": "profile", "model": args.model, **result}
