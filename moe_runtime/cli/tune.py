"""``moe-runtime tune`` and ``moe-runtime eval``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import UsageError
from ._common import add_verb, init_distributed, is_rank_zero

METHODS = ("esft", "routed-lora", "lora", "full")


def register(sub) -> None:
    parser = add_verb(
        sub,
        "tune",
        help="adapt the model to a task (esft, routed-lora, lora, full)",
        description=(
            "Train on JSONL task data ({'text'}, {'prompt','response'} with loss on the response, or "
            "{'messages'}). 'esft' trains exactly the experts of --experts (an expert_cfg.json from "
            "'select'); router, other experts and non-expert modules stay frozen unless the config's "
            "flags say otherwise. 'routed-lora' freezes the whole model and trains small LoRA experts "
            "inside the MoE routing (--variant perft-r: own router over --lora-experts LoRAs, top "
            "--lora-top-k; perft-e: a LoRA per routed expert, frozen router; esft-lora: perft-e on the "
            "experts of --experts only; perft-s / perft-d: one / several always-on LoRAs), on the layers "
            "of --layers ('all', '12-23', or 'all:4,12-23:8' for more LoRA experts in higher layers). "
            "Runs data-parallel under torchrun (rank 0 writes); --batch-size is the global batch."
        ),
        examples=[
            "moe-runtime tune --model demo --data arith_train.jsonl --method esft --experts arith_cfg.json --out ad/",
            "moe-runtime tune --model demo --data arith_train.jsonl --method routed-lora --out rl/   # perft-r, 4 LoRA experts, top-2",
            "moe-runtime tune --model demo --data d.jsonl --method routed-lora --variant perft-r --layers all:2,3-5:8 --lora-rank 4 --out rl/",
            "moe-runtime tune --model demo --data d.jsonl --method routed-lora --variant esft-lora --experts cfg.json --out rl/",
            "torchrun --nproc-per-node 2 -m moe_runtime tune --model demo --data d.jsonl --method esft --experts cfg.json --out ad/",
            "moe-runtime tune ... --save-steps 50 && moe-runtime tune ... --resume   # continue from the last checkpoint",
        ],
        func=run_tune,
    )
    parser.add_argument("--model", required=True, help="local checkpoint directory or 'demo'")
    parser.add_argument("--data", required=True, metavar="PATH", help="training JSONL")
    parser.add_argument("--method", required=True, choices=METHODS)
    parser.add_argument("--out", required=True, metavar="DIR", help="adapter directory to write")
    parser.add_argument("--experts", metavar="FILE", help="expert_cfg.json (esft; routed-lora esft-lora)")
    parser.add_argument("--steps", type=int, default=100, metavar="N", help="optimizer steps (default 100)")
    parser.add_argument(
        "--lr", type=float, default=1e-4, metavar="LR", help="peak learning rate (default 1e-4)"
    )
    parser.add_argument(
        "--batch-size", type=int, default=16, metavar="B", help="global batch size (default 16)"
    )
    parser.add_argument(
        "--grad-accum", type=int, default=1, metavar="N", help="micro-batches per step (default 1)"
    )
    parser.add_argument("--seed", type=int, default=0, metavar="S")
    parser.add_argument("--max-length", type=int, default=512, metavar="L", help="cut examples to L tokens")
    parser.add_argument("--warmup-steps", type=int, default=0, metavar="N")
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--aux-loss-coef", type=float, default=None, help="router load-balancing loss weight")
    parser.add_argument(
        "--save-steps", type=int, default=0, metavar="N", help="checkpoint every N steps into OUT.checkpoints"
    )
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16", "float64"),
        help="training dtype (default float32)",
    )
    parser.add_argument(
        "--lora-rank", type=int, default=8, metavar="R", help="LoRA rank (lora, routed-lora; default 8)"
    )
    parser.add_argument(
        "--lora-alpha", type=int, default=16, metavar="A", help="LoRA alpha (lora, routed-lora; default 16)"
    )
    routed = parser.add_argument_group("routed-lora")
    routed.add_argument(
        "--variant",
        default=None,
        choices=("perft-r", "perft-e", "perft-s", "perft-d", "esft-lora"),
        help="routed-LoRA variant (default perft-r)",
    )
    routed.add_argument(
        "--lora-experts",
        type=int,
        default=None,
        metavar="N",
        help="LoRA experts per layer (perft-r/d; default 4)",
    )
    routed.add_argument(
        "--lora-top-k",
        type=int,
        default=None,
        metavar="K",
        help="LoRA experts per token (perft-r; default 2)",
    )
    routed.add_argument(
        "--layers",
        default=None,
        metavar="SPEC",
        help="layers and per-layer LoRA expert counts: all | I | I-J, comma-separated, each optionally :N "
        "(default all)",
    )
    routed.add_argument(
        "--lora-aux-loss-coef",
        type=float,
        default=None,
        metavar="C",
        help="weight of the LoRA router's load-balancing loss (perft-r; default 0.01)",
    )

    parser = add_verb(
        sub,
        "eval",
        help="mean token loss (and exact match) of a model or adapter",
        description=(
            "Mean token loss over supervised tokens (responses for prompt/response data); for prompt/response "
            "data also the exact-match accuracy of greedy answers. --json writes {'loss': ...}."
        ),
        examples=[
            "moe-runtime eval --model demo --data test.jsonl",
            "moe-runtime eval --model demo --adapter ad/ --data test.jsonl --json eval.json",
        ],
        func=run_eval,
    )
    parser.add_argument("--model", required=True)
    parser.add_argument("--adapter", metavar="DIR", help="adapter directory to apply")
    parser.add_argument("--data", required=True, metavar="PATH")
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON")
    parser.add_argument("--max-length", type=int, default=512, metavar="L")
    parser.add_argument("--batch-size", type=int, default=16, metavar="B")
    parser.add_argument("--no-exact-match", action="store_true", help="loss only (skip greedy generation)")


def run_tune(args: argparse.Namespace) -> int:
    from ..data import read_examples
    from ..models import find_moe_layers, load_model, load_tokenizer, pad_token_id
    from ..tuning.data import encode_examples
    from ..tuning.trainer import TrainConfig

    config = TrainConfig(
        steps=args.steps,
        lr=args.lr,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        seed=args.seed,
        max_length=args.max_length,
        warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay,
        save_steps=args.save_steps,
        aux_loss_coef=args.aux_loss_coef,
    )
    config.validate()
    if args.method == "lora":
        from ..tuning.lora import LoraSettings

        LoraSettings(args.lora_rank, args.lora_alpha).validate()
    if args.method == "esft" and not args.experts:
        raise UsageError("--method esft needs --experts FILE (an expert_cfg.json from 'moe-runtime select')")
    routed = None
    routed_flags = ("variant", "lora_experts", "lora_top_k", "layers", "lora_aux_loss_coef")
    if args.method != "routed-lora":
        given = [f for f in routed_flags if getattr(args, f) is not None]
        if given:
            raise UsageError(
                f"--{given[0].replace('_', '-')} goes with --method routed-lora, not {args.method}"
            )
    else:
        from ..tuning.esft import read_expert_config
        from ..tuning.routed_lora import RoutedLoraSettings

        args.variant = args.variant or "perft-r"
        routed = RoutedLoraSettings(
            variant=args.variant,
            rank=args.lora_rank,
            alpha=float(args.lora_alpha),
            num_experts=args.lora_experts,
            top_k=args.lora_top_k,
            layers="all" if args.layers is None else args.layers,
            aux_loss_coef=0.01 if args.lora_aux_loss_coef is None else args.lora_aux_loss_coef,
        )
        if args.experts and args.variant == "esft-lora":
            routed.experts = read_expert_config(args.experts)  # validate() wants it for esft-lora
        if args.variant == "esft-lora" and not args.experts:
            raise UsageError("--variant esft-lora needs --experts FILE (an expert_cfg.json from 'select')")
        if args.variant != "esft-lora" and args.experts:
            raise UsageError(
                f"--experts goes with --variant esft-lora (or --method esft), not {args.variant}"
            )
        routed.validate()
    if args.experts and args.method not in ("esft", "routed-lora"):
        raise UsageError(f"--experts goes with --method esft or routed-lora, not {args.method}")
    from ..io import check_output_dir
    from ..tuning.meta import META_FILE

    check_output_dir(args.out, replace_marker=META_FILE)  # refused before training, not after
    examples = read_examples(args.data)
    selection = None
    if args.experts:
        from ..tuning.esft import read_expert_config

        selection = read_expert_config(args.experts)
    model = load_model(args.model, dtype=args.dtype)
    info = find_moe_layers(model)
    if routed is not None:
        from ..tuning.routed_lora import plan_layers

        routed.experts = selection
        plans = plan_layers(routed, info)  # refuses bad --layers / --experts before any training
        selection = None
    if selection is not None:
        selection.validate(info, args.experts)
        if selection.num_experts == 0 and not (selection.shared_experts or selection.non_expert_modules):
            raise UsageError(f"{args.experts}: selects no experts, nothing to train")
    tokenizer = load_tokenizer(args.model)
    features = encode_examples(tokenizer, examples, config.max_length, where=args.data)
    out = Path(args.out)
    init_distributed()
    common = dict(
        out=out,
        pad_id=pad_token_id(tokenizer),
        work_dir=out.with_name(out.name + ".checkpoints"),
        resume=args.resume,
        write=is_rank_zero(),
    )
    if args.method == "esft":
        from ..tuning.esft import tune_esft

        summary = tune_esft(model, info, selection, features, config, **common)
        what = f"{selection.num_experts} experts"
    elif args.method == "routed-lora":
        from ..tuning.routed_lora import tune_routed_lora

        summary = tune_routed_lora(model, info, features, config, settings=routed, **common)
        pairs = sum(plan.num_lora for plan in plans)
        what = f"{args.variant} r={args.lora_rank} ({pairs} LoRA pairs in {len(plans)} layers)"
    elif args.method == "full":
        from ..tuning.full import tune_full

        summary = tune_full(model, info, features, config, **common)
        what = "all weights"
    else:
        from ..tuning.lora import LoraSettings, tune_lora

        summary = tune_lora(
            model, info, features, config, settings=LoraSettings(args.lora_rank, args.lora_alpha), **common
        )
        what = f"LoRA r={args.lora_rank}"
    if is_rank_zero():
        print(
            f"trained {what} ({summary['trainable_params']:,} parameters) for "
            f"{summary['steps']} steps, loss {summary['first_logged_loss']:.4f} -> {summary['last_logged_loss']:.4f}; "
            f"adapter {summary['adapter_bytes'] / 1e6:.2f} MB -> {out}"
        )
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from ..data import read_examples
    from ..io import atomic_write_json, check_output_file
    from ..models import load_model, load_tokenizer
    from ..tuning import apply_adapter
    from ..tuning.evaluate import exact_match, mean_token_loss

    for flag in ("max_length", "batch_size"):
        if getattr(args, flag) <= 0:
            raise UsageError(f"--{flag.replace('_', '-')} must be positive")
    if args.json:
        check_output_file(args.json)  # refused before the model runs
    examples = read_examples(args.data)
    model = load_model(args.model, dtype="float32")
    tokenizer = load_tokenizer(args.model)
    if args.adapter:
        model = apply_adapter(model, args.adapter)
    loss, tokens = mean_token_loss(
        model, tokenizer, examples, max_length=args.max_length, batch_size=args.batch_size, where=args.data
    )
    result: dict = {"loss": loss, "tokens": tokens}
    if not args.no_exact_match:
        accuracy, scored = exact_match(model, tokenizer, examples, batch_size=args.batch_size)
        if scored:
            result.update(exact_match=accuracy, scored=scored)
    print(json.dumps(result))
    if args.json:
        atomic_write_json(args.json, result)
    return 0
