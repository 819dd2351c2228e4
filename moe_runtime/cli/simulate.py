"""``moe-runtime simulate``: replay a routing trace through the expert cache policies."""

from __future__ import annotations

import argparse

from ..errors import ConfigError, UsageError
from ._common import add_verb, budget_flag


def register(sub) -> None:
    parser = add_verb(
        sub,
        "simulate",
        help="expert-cache hit rates of each offload policy on a recorded routing trace",
        description=(
            "Replay the per-token routing recorded by 'profile --trace' through the expert cache at a budget "
            "(a share of every layer's routed experts), without running the model, and print the hit rate of "
            "each policy: lru, lfu, profile (pins the profile's most used experts), each optionally with "
            "'+trajectory' prefetching. One step is --tokens-per-step tokens (1 = batch-1 decoding)."
        ),
        examples=[
            "moe-runtime simulate --trace prof/ --budget 25%",
            "moe-runtime simulate --trace prof/ --budget 50% --policy lru --policy lfu+trajectory --json sim.json",
        ],
        func=run,
    )
    parser.add_argument("--trace", required=True, metavar="DIR", help="profile directory made with --trace")
    parser.add_argument(
        "--budget", required=True, metavar="X", help="share of each layer's experts, e.g. 25%%"
    )
    parser.add_argument(
        "--policy",
        action="append",
        default=None,
        metavar="P",
        help="policy to replay (repeatable; default all)",
    )
    parser.add_argument(
        "--task", action="append", default=None, metavar="NAME", help="tasks to replay (default all)"
    )
    parser.add_argument(
        "--tokens-per-step", type=int, default=1, metavar="N", help="tokens per step (default 1)"
    )
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON")


def run(args: argparse.Namespace) -> int:
    from ..io import atomic_write_json, check_output_file
    from ..runtime.offload.config import BudgetError
    from ..runtime.offload.simulate import DEFAULT_POLICIES, simulate

    if args.json:
        check_output_file(args.json)

    if args.tokens_per_step <= 0:
        raise UsageError(f"--tokens-per-step must be positive, got {args.tokens_per_step}")
    budget = budget_flag("--budget", args.budget)
    if budget.share is None:
        raise UsageError(
            f"--budget {args.budget}: give a share of the experts (e.g. 25%); a trace has no weight sizes"
        )
    try:
        result = simulate(
            args.trace,
            budget,
            policies=args.policy or DEFAULT_POLICIES,
            tasks=args.task,
            tokens_per_step=args.tokens_per_step,
        )
    except BudgetError as exc:
        raise UsageError(f"--budget {exc.detail}") from None
    except ConfigError as exc:  # a --policy or --task value
        raise exc.with_flag(f"--{exc.field}") from None
    print(
        f"budget {result['budget']}: {result['slots_per_layer']} of {result['num_experts']} experts per layer, "
        f"{result['tokens']} tokens, {result['tokens_per_step']} per step"
    )
    width = max(len("policy"), *(len(name) for name in result["policies"]))
    print(f"{'policy':<{width}}  hit rate  misses  prefetch acc.")
    for name, row in result["policies"].items():
        accuracy = f"{row['prefetch_accuracy']:13.3f}" if "+" in name else f"{'n/a':>13}"
        print(f"{name:<{width}}  {row['hit_rate']:8.3f}  {row['misses']:6d}  {accuracy}")
    if args.json:
        atomic_write_json(args.json, result)
    return 0
