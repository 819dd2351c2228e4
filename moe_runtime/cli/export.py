"""``moe-runtime export``: an adapter merged into its base, as a standard checkpoint."""

from __future__ import annotations

import argparse

from ._common import add_verb


def register(sub) -> None:
    parser = add_verb(
        sub,
        "export",
        help="merge an adapter into the base and write a standard checkpoint",
        description=(
            "Merge an ESFT, esft-lora-merge or LoRA adapter (ours or a peft LoRA directory) into the base model and write a "
            "checkpoint that transformers' AutoModelForCausalLM.from_pretrained loads without moe-runtime: "
            "config, generation config, tokenizer, sharded safetensors and model.safetensors.index.json. "
            "Tensors keep the base checkpoint's names and layout (per-expert or fused experts) and, with "
            "--dtype auto, their stored dtype. Only the tensors the adapter changes are read into memory; the "
            "rest is copied tensor by tensor, shards written as they fill. Routed-LoRA adapters "
            "cannot be merged (their LoRA terms are routed beside the experts) and are refused."
        ),
        examples=[
            "moe-runtime export --model ./base --adapter ./arith-esft --out ./base-arith",
            "moe-runtime export --model demo --adapter ./lora --out ./demo-lora --dtype bfloat16",
            "moe-runtime export --model ./base --adapter ./peft-adapter --out ./merged --max-shard-size 2GB",
        ],
        func=run,
    )
    parser.add_argument("--model", required=True, help="local checkpoint directory or 'demo'")
    parser.add_argument(
        "--adapter",
        required=True,
        metavar="DIR",
        help="adapter directory (esft, esft-lora-merge, lora, peft LoRA)",
    )
    parser.add_argument(
        "--out", required=True, metavar="DIR", help="checkpoint directory to create (absent or empty)"
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "bfloat16", "float16"),
        help="weights' dtype (default auto: as stored in the base checkpoint)",
    )
    parser.add_argument(
        "--max-shard-size",
        default="5GB",
        metavar="SIZE",
        help="largest shard, e.g. 5GB, 500MiB (default 5GB)",
    )
    parser.add_argument(
        "--allow-base-mismatch",
        action="store_true",
        help="merge an adapter tuned from different base weights",
    )


def run(args: argparse.Namespace) -> int:
    from ..errors import UsageError
    from ..interop.export import export_merged, parse_size, unmap_freed_tensors

    try:
        max_bytes = parse_size(args.max_shard_size)
    except UsageError as exc:
        raise UsageError(f"--max-shard-size: {exc}") from None
    unmap_freed_tensors()
    summary = export_merged(
        args.model,
        args.adapter,
        args.out,
        dtype=args.dtype,
        max_shard_bytes=max_bytes,
        allow_base_mismatch=args.allow_base_mismatch,
    )
    print(
        f"merged {summary['method']} adapter ({summary['changed_tensors']} tensors replaced) -> {summary['out']} "
        f"({summary['shards']} shards, {summary['total_bytes'] / 1e6:.1f} MB)"
    )
    return 0
