"""``moe-runtime generate`` (built by the rerouting runtime issue)."""

from __future__ import annotations

from ._common import add_verb, not_yet_available


def register(sub) -> None:
    parser = add_verb(
        sub,
        "generate",
        help="serve requests over the base model and many adapters in mixed batches",
        description="Generate text with per-request adapters. Not yet available in this version.",
        examples=[
            "moe-runtime generate --model demo --adapter a=ad/ --requests req.jsonl --output out.jsonl"
        ],
        func=not_yet_available("generate"),
    )
    parser.add_argument("--model")
    parser.add_argument("--adapter", action="append", default=[])
    parser.add_argument("--prompt")
    parser.add_argument("--use")
    parser.add_argument("--requests")
    parser.add_argument("--output")
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--offload", choices=("none", "cpu", "disk"))
    parser.add_argument("--expert-budget")
