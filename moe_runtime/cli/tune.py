"""``moe-runtime tune`` and ``moe-runtime eval``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import UsageError
from ._common import add_verb, disk_offload_config, init_distributed, is_rank_zero, offload_summary


def register(sub) -> None:
    parser = add_verb(
        sub,
        "tune",
        help="adapt the model to a task (esft, routed-lora and its variants, lora, full, ...)",
        description=(
            "Train on JSONL task data ({'text'}, {'prompt','response'} with loss on the response, or "
            "{'messages'}). 'esft' trains exactly the experts of --experts (an expert_cfg.json from "
            "'select'); router, other experts and non-expert modules stay frozen unless the config's "
            "flags say otherwise. 'routed-lora' freezes the whole model and trains small LoRA experts "
            "inside the MoE routing (--variant perft-r: own router over --lora-experts LoRAs, top "
            "--lora-top-k; perft-e: a LoRA per routed expert, frozen router; esft-lora: perft-e on the "
            "experts of --experts only; perft-s / perft-d: one / several always-on LoRAs), on the layers "
            "of --layers ('all', '12-23', or 'all:4,12-23:8' for more LoRA experts in higher layers). "
            "'esft-lora-merge' trains low-rank updates W + (alpha/r) B A of the --experts' own weights "
            "(router and everything else frozen): a small adapter that merges (export) and serves like ESFT. "
            "Runs data-parallel under torchrun (rank 0 writes); --batch-size is the global batch. The adapter "
            "directory also gets routing_profile.json: the base model's expert frequencies on up to "
            "--profile-tokens tokens of the training data, which 'auto' requests of generate/serve match "
            "prompts against. With --offload disk (esft) the routed experts stay in the checkpoint's files: "
            "the selected experts are read once into RAM and trained there, every other expert is read "
            "through --expert-budget slots per layer in the forward pass and read again in the backward "
            "pass (same loss, gradients and adapter as resident); --plan prints the RAM, disk and bytes "
            "read per step that implies, without training."
        ),
        examples=[
            "moe-runtime tune --model demo --data arith_train.jsonl --method esft --experts arith_cfg.json --out ad/",
            "moe-runtime tune --model demo --data arith_train.jsonl --method routed-lora --out rl/   # perft-r, 4 LoRA experts, top-2",
            "moe-runtime tune --model demo --data d.jsonl --method routed-lora --variant perft-r --layers all:2,3-5:8 --lora-rank 4 --out rl/",
            "moe-runtime tune --model demo --data d.jsonl --method routed-lora --variant esft-lora --experts cfg.json --out rl/",
            "moe-runtime tune --model demo --data d.jsonl --method esft-lora-merge --experts cfg.json --lora-rank 4 --out el/",
            "moe-runtime tune --model demo --data d.jsonl --method routed-lora --variant mola --experts-per-layer 2,2,4,4,8,8 --out rl/",
            "moe-runtime tune --model demo --data d.jsonl --method routed-lora --variant dynmole --lora-top-p 0.75 --out rl/",
            "torchrun --nproc-per-node 2 -m moe_runtime tune --model demo --data d.jsonl --method esft --experts cfg.json --out ad/",
            "moe-runtime tune ... --save-steps 50 && moe-runtime tune ... --resume   # continue from the last checkpoint",
            "moe-runtime tune --model ./dsv2-lite --data d.jsonl --method esft --experts cfg.json --offload disk --expert-budget 10% --out ad/",
            "moe-runtime tune --model ./dsv2-lite --method esft --experts cfg.json --offload disk --expert-budget 10% --batch-size 4 --max-length 256 --plan",
        ],
        threads=True,
        func=run_tune,
    )
    parser.add_argument("--model", required=True, help="local checkpoint directory or 'demo'")
    parser.add_argument("--data", metavar="PATH", help="training JSONL (required unless --plan)")
    parser.add_argument("--out", metavar="DIR", help="adapter directory to write (required unless --plan)")
    parser.add_argument("--steps", type=int, default=100, metavar="N", help="optimizer steps (default 100)")
    parser.add_argument(
        "--profile-tokens",
        type=int,
        default=4096,
        metavar="N",
        help="training tokens whose base-model routing is stored as the adapter's routing profile, for "
        "'auto' serving (0: none) (default 4096)",
    )
    parser.add_argument(
        "--lr", type=float, default=1e-4, metavar="LR", help="peak learning rate (default 1e-4)"
    )
    parser.add_argument(
        "--batch-size", type=int, default=16, metavar="B", help="global batch size (default 16)"
    )
    parser.add_argument(
        "--grad-accum", type=int, default=1, metavar="N", help="micro-batches per step (default 1)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, metavar="S", help="seed of data order and initialisation (default 0)"
    )
    parser.add_argument(
        "--max-length", type=int, default=512, metavar="L", help="cut examples to L tokens (default 512)"
    )
    parser.add_argument(
        "--warmup-steps",
        type=int,
        default=0,
        metavar="N",
        help="linear learning-rate warmup steps (default 0)",
    )
    parser.add_argument(
        "--weight-decay", type=float, default=0.0, metavar="W", help="AdamW weight decay (default 0)"
    )
    parser.add_argument("--aux-loss-coef", type=float, default=None, help="router load-balancing loss weight")
    parser.add_argument(
        "--save-steps", type=int, default=0, metavar="N", help="checkpoint every N steps into OUT.checkpoints"
    )
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    parser.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="keep only each decoder layer's input for backward and recompute the layer there: "
        "activation memory of one layer instead of all, for one more forward (with --offload, "
        "frozen experts are then read three times per micro-batch)",
    )
    parser.add_argument(
        "--dtype",
        "--compute-dtype",
        dest="dtype",
        default="float32",
        choices=("float32", "bfloat16", "float64"),
        help="training (compute) dtype; a checkpoint stored narrower is widened as it is read (default "
        "float32: this CPU has no bf16 instructions)",
    )
    parser.add_argument(
        "--offload",
        choices=("none", "disk"),
        default="none",
        help="'disk' (esft): routed experts stay in the checkpoint's safetensors files; the selected "
        "ones are trained in RAM, the frozen ones read through --expert-budget slots per layer in the "
        "forward and again in the backward pass (default none)",
    )
    parser.add_argument(
        "--expert-budget",
        metavar="X",
        help="with --offload disk: share ('25%%', default) or bytes ('2GB') of routed experts held in RAM "
        "as slots (the trained experts come on top); at least top-k experts per layer",
    )
    parser.add_argument(
        "--slot-dtype",
        choices=("compute", "storage"),
        default="compute",
        help="with --offload disk: the dtype of the expert slots; 'storage' keeps the checkpoint's (bf16: half "
        "the slot RAM at float32 compute) and widens each pass's experts as they are used, with identical "
        "results (default compute)",
    )
    parser.add_argument(
        "--plan",
        action="store_true",
        help="print the RAM (weights, slots, trainable experts, gradients, optimizer state, an activation "
        "estimate), disk and expert bytes read per step as JSON, from config.json, the safetensors "
        "headers and --experts only (no weights loaded, nothing written), and exit",
    )
    parser.deferred.append(_add_method_flags)  # needs the tuning methods: added when tune runs

    parser = add_verb(
        sub,
        "eval",
        help="mean token loss (and exact match) of a model or adapter",
        description=(
            "Mean token loss over supervised tokens (responses for prompt/response data); for prompt/response "
            "data also the exact-match accuracy of greedy answers, printed as one line. --json writes {'loss', 'tokens', 'exact_match', 'scored'}."
        ),
        examples=[
            "moe-runtime eval --model demo --data test.jsonl",
            "moe-runtime eval --model demo --adapter ad/ --data test.jsonl --json eval.json",
        ],
        threads=True,
        func=run_eval,
    )
    parser.add_argument("--model", required=True, help="local checkpoint directory or 'demo'")
    parser.add_argument("--adapter", metavar="DIR", help="adapter directory to apply")
    parser.add_argument(
        "--allow-base-mismatch",
        action="store_true",
        help="apply an adapter tuned on other base weights (refused by default)",
    )
    parser.add_argument("--data", required=True, metavar="PATH", help="evaluation JSONL")
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON")
    parser.add_argument(
        "--max-length", type=int, default=512, metavar="L", help="cut examples to L tokens (default 512)"
    )
    parser.add_argument(
        "--batch-size", type=int, default=16, metavar="B", help="examples per forward (default 16)"
    )
    parser.add_argument("--no-exact-match", action="store_true", help="loss only (skip greedy generation)")


def _method_flags() -> dict[str, dict]:
    """Every method's config flags, by flag: field name, argparse settings and the methods taking it."""
    from ..tuning.registry import config_options, tunable

    flags: dict[str, dict] = {}
    for method in tunable().values():
        for config in method.all_configs():
            for name, meta in config_options(config):
                entry = flags.setdefault(meta["flag"], {"field": name, "meta": meta, "methods": []})
                if method.name not in entry["methods"]:
                    entry["methods"].append(method.name)
    return flags


def _add_method_flags(parser: argparse.ArgumentParser) -> None:
    """``--method`` and the flags of every registered method's config (each says which methods take it)."""
    from ..tuning.registry import tunable

    parser.add_argument("--method", required=True, choices=tuple(tunable()), help="what to train")
    group = parser.add_argument_group("method flags (from each method's config)")
    for flag, entry in _method_flags().items():
        meta = entry["meta"]
        choices = meta["choices"]() if callable(meta["choices"]) else meta["choices"]
        default = "" if meta["default"] is None else f"; default {meta['default']}"
        group.add_argument(
            f"--{flag}",
            dest=f"method_{flag.replace('-', '_')}",
            default=None,
            type=meta["type"],
            choices=choices,
            metavar=meta["metavar"],
            help=f"{meta['help']} [{', '.join(entry['methods'])}{default}]",
        )


def _method_config(method, args: argparse.Namespace):
    """The method's config from the flags given; flags of other methods are refused."""
    values = {}
    for flag, entry in _method_flags().items():
        value = getattr(args, f"method_{flag.replace('-', '_')}")
        if value is None:
            continue
        if method.name not in entry["methods"]:
            raise UsageError(
                f"--{flag} goes with --method {' or '.join(entry['methods'])}, not {method.name}"
            )
        parse = entry["meta"]["parse"]
        values[entry["field"]] = parse(value) if parse is not None else value
    return method.build_config(values)


def _flag_of(method, field: str) -> str:
    """The flag of a config field (a method's own, else the training flag of that name)."""
    from ..tuning.registry import config_options

    for config in method.all_configs():
        for name, meta in config_options(config):
            if name == field:
                return f"--{meta['flag']}"
    return f"--{field.replace('_', '-')}"


def run_tune(args: argparse.Namespace) -> int:
    from ..errors import ConfigError
    from ..tuning.registry import get

    method = get(args.method)
    try:
        return _run_tune(method, args)
    except ConfigError as exc:
        raise exc.with_flag(_flag_of(method, exc.field)) from None


def _run_tune(method, args: argparse.Namespace) -> int:
    from ..data import read_examples
    from ..io import check_output_dir
    from ..models import find_moe_layers, load_model, load_tokenizer, pad_token_id
    from ..tuning.data import encode_examples
    from ..tuning.meta import META_FILE
    from ..tuning.registry import TuneJob, tunable
    from ..tuning.trainer import TrainConfig

    offload = disk_offload_config(args)
    if offload is not None and not method.offloads:
        able = [name for name, m in tunable().items() if m.offloads]
        raise UsageError(
            f"--offload {offload.tier} works with --method {' or '.join(able)}, not {method.name}"
        )
    train = TrainConfig(
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
        gradient_checkpointing=args.gradient_checkpointing,
    )
    train.validate()
    config = _method_config(method, args)
    if args.plan:
        return _plan(method, config, train, offload, args)
    for flag in ("data", "out"):
        if not getattr(args, flag):
            raise UsageError(f"--{flag} is required (unless --plan)")
    if args.profile_tokens < 0:
        raise UsageError(f"--profile-tokens must be >= 0, got {args.profile_tokens}")
    check_output_dir(args.out, replace_marker=META_FILE)  # refused before training, not after
    examples = read_examples(args.data)
    engine = tier = None
    if offload is None:
        model = load_model(args.model, dtype=args.dtype)
        info = find_moe_layers(model)
        tokenizer = load_tokenizer(args.model)
    else:
        from ..runtime import MultiAdapterEngine

        # the engine's executor serves the routing profile below; ESFT then attaches its own
        engine = MultiAdapterEngine.from_pretrained(args.model, dtype=args.dtype, offload=offload)
        model, info, tokenizer, tier = engine.model, engine.info, engine.tokenizer, engine.offload
    try:
        if method.check_model is not None:
            method.check_model(config, info)  # refused before any training
        features = encode_examples(tokenizer, examples, train.max_length, where=args.data)
        routing, base_fingerprint = None, None
        if args.profile_tokens:  # its fingerprint of the untrained base is the adapter's too
            routing, base_fingerprint = _routing_profile(model, tokenizer, examples, args, tier)
        init_distributed()
        job = TuneJob(
            model=model,
            info=info,
            features=features,
            train=train,
            out=Path(args.out),
            pad_id=pad_token_id(tokenizer),
            resume=args.resume,
            write=is_rank_zero(),
            offload=tier,
            base_fingerprint=base_fingerprint,
        )
        summary = method.tune(job, config)
    finally:
        if engine is not None:
            engine.close()
    if tier is not None and is_rank_zero():
        print(offload_summary(tier), file=sys.stderr)
    if is_rank_zero() and routing is not None:
        from ..runtime.profiles import write_routing_profile

        write_routing_profile(args.out, routing)
    if is_rank_zero():
        print(
            f"trained {summary['what']} ({summary['trainable_params']:,} parameters) for "
            f"{summary['steps']} steps, loss {summary['first_logged_loss']:.4f} -> {summary['last_logged_loss']:.4f}; "
            f"adapter {summary['adapter_bytes'] / 1e6:.2f} MB -> {args.out}"
        )
    return 0


def _plan(method, config, train, offload, args: argparse.Namespace) -> int:
    """``tune --plan``: the sizing answer as JSON on stdout; nothing loaded, nothing written."""
    import json

    from ..runtime.offload.plan import plan_tuning

    if method.trainable_bytes is None:
        able = [name for name, m in _tunable().items() if m.trainable_bytes is not None]
        raise UsageError(f"--plan sizes --method {' or '.join(able)}, not {method.name}")
    plan = plan_tuning(
        args.model,
        offload,
        args.dtype,
        trainable_bytes=lambda info: method.trainable_bytes(config, info),
        micro_batch=max(1, train.batch_size // train.grad_accum),
        max_length=train.max_length,
        grad_accum=train.grad_accum,
        checkpointing=train.gradient_checkpointing,
    )
    print(json.dumps({"method": method.name, **plan}, indent=2))
    return 0


def _tunable():
    from ..tuning.registry import tunable

    return tunable()


def _routing_profile(model, tokenizer, examples, args: argparse.Namespace, tier=None):
    """The base model's routing on the training data (before training changes any weight) and the
    base's fingerprint; with an offload ``tier`` its executor runs the experts and the fingerprint
    reads them from it."""
    from ..profiler import ProfileConfig, profile_model
    from ..runtime.profiles import RoutingProfile

    config = ProfileConfig(max_tokens=args.profile_tokens, max_length=args.max_length, progress=False)
    parts = tier.expert_parts if tier is not None else None
    meta, profiles = profile_model(model, tokenizer, {"task": examples}, config, parts=parts)
    task = profiles["task"]
    profile = RoutingProfile.from_counts(meta.layers, task.counts, task.tokens, task=Path(args.data).stem)
    return profile, meta.fingerprint


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
    if args.allow_base_mismatch and not args.adapter:
        raise UsageError("--allow-base-mismatch goes with --adapter")
    if args.adapter:
        model = apply_adapter(model, args.adapter, allow_base_mismatch=args.allow_base_mismatch)
    loss, tokens = mean_token_loss(
        model, tokenizer, examples, max_length=args.max_length, batch_size=args.batch_size, where=args.data
    )
    result: dict = {"loss": loss, "tokens": tokens}
    if not args.no_exact_match:
        accuracy, scored = exact_match(model, tokenizer, examples, batch_size=args.batch_size)
        if scored:
            result.update(exact_match=accuracy, scored=scored)
    line = f"loss {loss:.4f} over {tokens:,} tokens"
    if "exact_match" in result:
        line += f"; exact match {result['exact_match']:.1%} of {result['scored']:,} prompts"
    print(line + (f" -> {args.json}" if args.json else ""))
    if args.json:
        atomic_write_json(args.json, result)
    return 0
