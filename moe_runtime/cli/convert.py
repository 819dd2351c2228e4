"""``moe-runtime convert``: adapter format conversion (peft, official ESFT, ours)."""

from __future__ import annotations

import argparse

from ._common import add_verb


def register(sub) -> None:
    parser = add_verb(
        sub,
        "convert",
        help="convert an adapter between peft, the official ESFT layout and moe-runtime's",
        description=(
            "Our LoRA adapters are peft LoRA directories plus our metadata file; our ESFT adapters are "
            "official-layout directories plus our metadata file. --to peft / esft-official writes the "
            "other tool's files, byte for byte, without our metadata. --to moe-runtime reads a peft LoRA "
            "or official ESFT adapter, checks it against --model and adds our metadata (the base "
            "model's fingerprint), so generate/eval/export refuse it on any other base. A round trip "
            "gives byte-identical weight and config files. An esft-lora-merge adapter converts one way "
            "to esft-official (needs --model): its selected experts with the low-rank updates merged."
        ),
        examples=[
            "moe-runtime convert --adapter ./my-lora --to peft --out ./my-lora-peft",
            "moe-runtime convert --adapter ./peft-adapter --to moe-runtime --model ./base --out ./ours",
            "moe-runtime convert --adapter ./arith-esft --to esft-official --out ./arith-official",
            "moe-runtime convert --adapter ./official-esft --to moe-runtime --model ./base --out ./arith",
            "moe-runtime convert --adapter ./arith-esft-lora --to esft-official --model ./base --out ./arith-official",
        ],
        func=run,
    )
    parser.add_argument("--adapter", required=True, metavar="DIR", help="adapter directory to convert")
    parser.add_argument(
        "--to", required=True, choices=("peft", "esft-official", "moe-runtime"), help="target format"
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="directory to create (absent or empty)")
    parser.add_argument(
        "--model",
        default=None,
        help="base checkpoint directory or 'demo' (needed for --to moe-runtime, and for esft-lora-merge adapters)",
    )


def run(args: argparse.Namespace) -> int:
    from ..interop.convert import convert_adapter

    kind = convert_adapter(args.adapter, args.to, args.out, model=args.model)
    print(f"{kind} adapter '{args.adapter}' -> {args.to} '{args.out}'")
    return 0
