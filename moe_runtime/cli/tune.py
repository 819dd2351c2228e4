"""``moe-runtime tune`` and ``moe-runtime eval`` (built by the ESFT tuner issue)."""

from __future__ import annotations

from ._common import add_verb, not_yet_available


def register(sub) -> None:
    parser = add_verb(
        sub,
        "tune",
        help="adapt the model to a task (esft, routed-lora, lora, full)",
        description="Train an adapter on task data. Not yet available in this version.",
        examples=[
            "moe-runtime tune --model demo --data arith.jsonl --method esft --experts arith_cfg.json --out ad/"
        ],
        func=not_yet_available("tune"),
    )
    parser.add_argument("--model")
    parser.add_argument("--data")
    parser.add_argument("--method", choices=("esft", "routed-lora", "lora", "full"))
    parser.add_argument("--out")
    parser.add_argument("--experts")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--seed", type=int)
    parser = add_verb(
        sub,
        "eval",
        help="mean token loss (and task metrics) of a model or adapter",
        description="Evaluate a model or adapter on task data. Not yet available in this version.",
        examples=["moe-runtime eval --model demo --adapter ad/ --data test.jsonl --json eval.json"],
        func=not_yet_available("eval"),
    )
    parser.add_argument("--model")
    parser.add_argument("--adapter")
    parser.add_argument("--data")
    parser.add_argument("--json")
