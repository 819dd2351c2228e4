"""``moe-runtime select``: ESFT expert selection from a profile."""

from __future__ import annotations

import argparse
import json

from ..errors import UsageError
from ._common import add_verb


def register(sub) -> None:
    parser = add_verb(
        sub,
        "select",
        help="choose the experts a task routes to (ESFT expert_cfg.json)",
        description=(
            "Per layer, take experts by descending score until the cumulative score reaches P (the crossing "
            "expert included). Scores: 'token' (selection share, default P=0.2) or 'gate' (mean routing "
            "weight received, default P=0.1). Writes an ESFT expert_cfg.json."
        ),
        examples=[
            "moe-runtime select --profile prof/ --task arith --score token --out arith_cfg.json",
            "moe-runtime select --profile prof/ --task arith --score gate --top-p 0.1 --out arith_gate.json",
        ],
        func=run,
    )
    parser.add_argument("--profile", required=True, metavar="DIR", help="profile directory (from 'profile')")
    parser.add_argument("--task", required=True, metavar="NAME", help="task in the profile")
    parser.add_argument("--score", required=True, choices=("gate", "token"), help="score function")
    parser.add_argument(
        "--top-p", type=float, default=None, metavar="P", help="cumulative threshold in (0, 1]"
    )
    parser.add_argument("--out", required=True, metavar="FILE", help="expert_cfg.json to write")
    parser.add_argument(
        "--train-shared-experts", action="store_true", help="set shared_experts: true in the config"
    )
    parser.add_argument(
        "--train-non-expert-modules", action="store_true", help="set non_expert_modules: true"
    )


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..io import atomic_write_json
    from ..profiler import expert_config, load_profile, select_experts

    if args.top_p is not None and not 0.0 < args.top_p <= 1.0:
        raise UsageError(f"--top-p {args.top_p}: must be in (0, 1]")
    meta, tasks = load_profile(args.profile)
    if args.task not in tasks:
        raise UsageError(
            f"--task '{args.task}': not in profile '{args.profile}' (tasks: {', '.join(tasks) or 'none'})"
        )
    summary_file = Path(args.profile) / args.task / "summary.json"
    try:
        summary = json.loads(summary_file.read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"{summary_file}: unreadable ({exc})") from None
    selected = select_experts(summary, args.score, args.top_p)
    cfg = expert_config(
        selected, shared_experts=args.train_shared_experts, non_expert_modules=args.train_non_expert_modules
    )
    atomic_write_json(args.out, cfg)
    chosen = sum(len(v) for v in selected.values())
    total = len(meta.layers) * meta.num_experts
    print(
        f"selected {chosen} of {total} routed experts ({chosen / total:.1%}) over {len(selected)} layers -> {args.out}"
    )
    return 0
