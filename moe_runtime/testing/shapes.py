"""Random-weight checkpoints shaped like named real MoE models, written in the hub's own layout.

    shape name -> the real model's config.json fields (layer count overridable)
               -> the model built on the meta device (no memory) -> transformers' reverse conversion
                  gives the hub's tensor names and shapes (per-expert ``...experts.E.gate_proj.weight``)
               -> tensors assigned to ~5 GB shards in name order
               -> each shard written tensor by tensor, each tensor drawn in row blocks and freed:
                  peak memory is one block, whatever the model's size
               -> ``model.safetensors.index.json``, a small tokenizer (the demo's), then one rename

The configs are the public ``config.json`` of each model (copied field by field); only
``num_hidden_layers`` changes with ``--layers``. Weights are random (normal, std
``initializer_range``; routers std ``hidden ** -0.5`` so routing is input-dependent; norms ones),
deterministic by seed and tensor name. Tokenizer ids stop at the demo vocabulary (1,024); prompts of
token ids may use the whole real vocabulary.

    python -m moe_runtime.testing.shapes --shape deepseek-v2-lite --layers 4 --out /tmp/scale/dsv2-4
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import shutil
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UsageError

__all__ = [
    "SHAPES",
    "TINY_WIDTHS",
    "TensorSpec",
    "checkpoint_plan",
    "shape_config",
    "write_checkpoint",
    "main",
]

# The public config.json of each model (hub ids in the comments), every field as published.
# fmt: off
SHAPES: dict[str, dict] = {
    # allenai/OLMoE-1B-7B-0924
    "olmoe-1b-7b": {
        "architectures": ["OlmoeForCausalLM"], "model_type": "olmoe", "attention_bias": False,
        "attention_dropout": 0.0, "clip_qkv": None, "pad_token_id": 1, "bos_token_id": None,
        "eos_token_id": 50279, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
        "intermediate_size": 1024, "max_position_embeddings": 4096, "norm_topk_prob": False,
        "num_attention_heads": 16, "num_experts": 64, "num_experts_per_tok": 8, "num_hidden_layers": 16,
        "num_key_value_heads": 16, "output_router_logits": False, "rms_norm_eps": 1e-05,
        "rope_scaling": None, "rope_theta": 10000.0, "router_aux_loss_coef": 0.01,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 50304,
    },
    # deepseek-ai/DeepSeek-V2-Lite (MLA attention without a query LoRA; first layer dense)
    "deepseek-v2-lite": {
        "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "attention_bias": False,
        "attention_dropout": 0.0, "aux_loss_alpha": 0.001, "bos_token_id": 100000, "eos_token_id": 100001,
        "first_k_dense_replace": 1, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
        "intermediate_size": 10944, "kv_lora_rank": 512, "max_position_embeddings": 163840,
        "moe_intermediate_size": 1408, "moe_layer_freq": 1, "n_group": 1, "n_routed_experts": 64,
        "n_shared_experts": 2, "norm_topk_prob": False, "num_attention_heads": 16, "num_experts_per_tok": 6,
        "num_hidden_layers": 27, "num_key_value_heads": 16, "pretraining_tp": 1, "q_lora_rank": None,
        "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
        "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707,
                         "mscale_all_dim": 0.707, "original_max_position_embeddings": 4096, "type": "yarn"},
        "rope_theta": 10000, "routed_scaling_factor": 1.0, "scoring_func": "softmax", "seq_aux": True,
        "tie_word_embeddings": False, "topk_group": 1, "topk_method": "greedy", "torch_dtype": "bfloat16",
        "use_cache": True, "v_head_dim": 128, "vocab_size": 102400,
    },
    # Qwen/Qwen3-30B-A3B
    "qwen3-30b-a3b": {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "attention_bias": False,
        "attention_dropout": 0.0, "bos_token_id": 151643, "decoder_sparse_step": 1, "eos_token_id": 151645,
        "head_dim": 128, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
        "intermediate_size": 6144, "max_position_embeddings": 40960, "max_window_layers": 48,
        "mlp_only_layers": [], "moe_intermediate_size": 768, "norm_topk_prob": True,
        "num_attention_heads": 32, "num_experts": 128, "num_experts_per_tok": 8, "num_hidden_layers": 48,
        "num_key_value_heads": 4, "output_router_logits": False, "rms_norm_eps": 1e-06, "rope_scaling": None,
        "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001, "sliding_window": None,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
        "use_sliding_window": False, "vocab_size": 151936,
    },
    # mistralai/Mixtral-8x7B-v0.1
    "mixtral-8x7b": {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "attention_dropout": 0.0,
        "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 4096,
        "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 32768,
        "num_attention_heads": 32, "num_experts_per_tok": 2, "num_hidden_layers": 32,
        "num_key_value_heads": 8, "num_local_experts": 8, "output_router_logits": False,
        "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.02,
        "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
        "vocab_size": 32000,
    },
}
# fmt: on

# Test widths: every shape shrunk to a few hundred KB through the same writer and layout (the real
# widths are GBs even at 2 layers); features kept (MLA, shared experts, dense first layer, qk norms).
# fmt: off
TINY_WIDTHS: dict[str, dict] = {
    "olmoe-1b-7b": dict(hidden_size=64, intermediate_size=32, num_attention_heads=4, num_key_value_heads=4,
                        num_experts=16, vocab_size=1024),
    "deepseek-v2-lite": dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32, kv_lora_rank=16,
                             qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=16,
                             num_attention_heads=4, num_key_value_heads=4, vocab_size=1024),
    "qwen3-30b-a3b": dict(hidden_size=64, head_dim=16, num_attention_heads=4, num_key_value_heads=2,
                          intermediate_size=96, moe_intermediate_size=32, num_experts=16, vocab_size=1024),
    "mixtral-8x7b": dict(hidden_size=64, intermediate_size=32, num_attention_heads=4, num_key_value_heads=2,
                         vocab_size=1024),
}
# fmt: on

DEFAULT_SHARD_BYTES = 5 * 10**9
_BLOCK_ELEMENTS = 1 << 24  # values drawn at once (64 MiB of float32)
_DISK_MARGIN = 256 << 20  # free space left over after writing
_ST_NAMES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


def shape_config(shape: str, *, layers: int | None = None, **overrides) -> dict:
    """The ``config.json`` fields of a named shape, ``num_hidden_layers`` set to ``layers``.

    Args:
        shape: a key of :data:`SHAPES`.
        layers: decoder layers (default the real model's); per-layer lists follow.
        **overrides: other fields to change (tests shrink widths this way, through the same writer).

    Raises:
        UsageError: unknown shape or a layer count below 1.
    """
    if shape not in SHAPES:
        raise UsageError(f"shape '{shape}': choose from {', '.join(SHAPES)}")
    config = copy.deepcopy(SHAPES[shape])
    if layers is not None:
        if layers < 1:
            raise UsageError(f"--layers {layers}: give at least 1")
        config["num_hidden_layers"] = layers
        if "max_window_layers" in config:
            config["max_window_layers"] = layers
    config.update(overrides)
    return config


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the checkpoint: hub name, shape and how its values are drawn."""

    name: str
    shape: tuple[int, ...]
    init: str  # "normal", "router", "ones" or "zeros"
    std: float = 0.0

    @property
    def numel(self) -> int:
        n = 1
        for size in self.shape:
            n *= size
        return n


def _init_of(name: str, shape: tuple[int, ...], config: dict, routers: set[str]) -> tuple[str, float]:
    if len(shape) == 1:
        return ("ones", 0.0) if "norm" in name else ("zeros", 0.0)
    if name in routers:
        return "router", shape[-1] ** -0.5
    return "normal", float(config.get("initializer_range", 0.02))


def checkpoint_plan(config: dict) -> list[TensorSpec]:
    """Every tensor of the checkpoint in the hub's layout, in name order (no weights made).

    The model is built on the meta device and transformers' own reverse conversion (the one
    ``save_pretrained`` applies) names its tensors, so the names are what ``from_pretrained`` reads.
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.core_model_loading import dot_natural_key, revert_weight_conversion

    from ..models import find_moe_layers

    fields = {k: v for k, v in config.items() if k not in ("architectures", "model_type", "torch_dtype")}
    pretrained = AutoConfig.for_model(config["model_type"], **fields)
    with torch.device("meta"):
        net = AutoModelForCausalLM.from_config(pretrained)
    router_params = set()
    for layer in find_moe_layers(net).layers:
        if layer.router is not None:
            prefix = next(n for n, m in net.named_modules() if m is layer.router)
            router_params.update(f"{prefix}.{n}" for n, p in layer.router.named_parameters() if p.dim() == 2)
    state = net.state_dict()
    routers = {id(state[name]) for name in router_params if name in state}
    hub = revert_weight_conversion(net, dict(state))
    router_names = {name for name, tensor in hub.items() if id(tensor) in routers}
    specs = []
    for name in sorted(hub, key=dot_natural_key):
        shape = tuple(int(s) for s in hub[name].shape)
        init, std = _init_of(name, shape, config, router_names)
        specs.append(TensorSpec(name, shape, init, std))
    return specs


def _shards(specs: list[TensorSpec], itemsize: int, shard_bytes: int) -> list[list[TensorSpec]]:
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        nbytes = spec.numel * itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    return shards


def _header(specs: list[TensorSpec], dtype: torch.dtype) -> tuple[bytes, int]:
    """The safetensors header (padded to 8 bytes) and the data size of one shard."""
    itemsize = torch.empty(0, dtype=dtype).element_size()
    entries, offset = {}, 0
    for spec in specs:
        nbytes = spec.numel * itemsize
        entries[spec.name] = {
            "dtype": _ST_NAMES[dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    entries["__metadata__"] = {"format": "pt"}
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, offset


def _seed_of(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}|{name}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


def _write_tensor(f, spec: TensorSpec, dtype: torch.dtype, seed: int) -> None:
    """Draw the tensor in blocks of rows and write each block (memory: one block)."""
    if spec.init in ("ones", "zeros"):
        value = (torch.ones if spec.init == "ones" else torch.zeros)(spec.shape, dtype=dtype)
        f.write(memoryview(value.reshape(-1).view(torch.uint8).numpy()))
        return
    generator = torch.Generator().manual_seed(_seed_of(seed, spec.name))
    remaining = spec.numel
    while remaining:
        count = min(remaining, _BLOCK_ELEMENTS)
        block = (torch.randn(count, generator=generator) * spec.std).to(dtype)
        f.write(memoryview(block.view(torch.uint8).numpy()))
        remaining -= count


def _tokenizer_files(out: Path) -> None:
    from ..demo.export import checkpoint_dir

    source = checkpoint_dir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(source / name, out / name)


def checkpoint_bytes(config: dict, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of tensor data the checkpoint of ``config`` holds."""
    itemsize = torch.empty(0, dtype=dtype).element_size()
    return sum(spec.numel for spec in checkpoint_plan(config)) * itemsize


def write_checkpoint(
    config: dict,
    out: str | Path,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: bool = False,
    sparse: bool = False,
) -> Path:
    """Write a random checkpoint of ``config`` (see :func:`shape_config`) to the directory ``out``.

    Streams shard by shard, tensor by tensor (memory stays at one block of values). Checks free
    disk first; writes into a temporary sibling directory renamed to ``out`` at the end.
    ``sparse`` writes the headers and leaves the data as holes (all zeros, no disk used): a
    full-size checkpoint for what reads headers only (sizing plans), not for running.

    Raises:
        UsageError: ``out`` exists, or its file system has not enough free space.
    """
    out = Path(out)
    if out.exists():
        raise UsageError(f"output '{out}' already exists (give a new directory)")
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"output '{out}': cannot create its directory ({exc.strerror or exc})") from None
    specs = checkpoint_plan(config)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    shards = _shards(specs, itemsize, shard_bytes)
    total = sum(spec.numel for spec in specs) * itemsize
    free = shutil.disk_usage(parent).free
    if not sparse and total + _DISK_MARGIN > free:
        raise UsageError(
            f"not enough disk for '{out}': the checkpoint needs {total / 1e9:.2f} GB "
            f"(+{_DISK_MARGIN / 1e9:.2f} GB margin), {free / 1e9:.2f} GB free on its file system"
        )
    tmp = parent / f".{out.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        weight_map = {}
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        for index, (shard, file_name) in enumerate(zip(shards, names)):
            header, size = _header(shard, dtype)
            with open(tmp / file_name, "wb") as f:
                f.write(header)
                for spec in shard:
                    if not sparse:
                        _write_tensor(f, spec, dtype, seed)
                    weight_map[spec.name] = file_name
                if sparse:
                    f.truncate(len(header) + size)
            if progress:
                print(f"shard {index + 1}/{len(shards)} written", file=sys.stderr, flush=True)
        index_json = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2) + "\n")
        written = dict(config)
        written["torch_dtype"] = str(dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(written, indent=2) + "\n")
        _tokenizer_files(tmp)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _size(value: str) -> int:
    from ..runtime.offload.config import parse_budget

    budget = parse_budget(value)
    if budget.bytes is None:
        raise argparse.ArgumentTypeError(f"'{value}': give a byte size such as 5GB")
    return budget.bytes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m moe_runtime.testing.shapes",
        description=(
            "Write a random-weight checkpoint shaped like a named real MoE model: the model's own "
            "config.json (only num_hidden_layers changed by --layers), bf16 tensors in the hub's layout "
            "(per-expert tensors, sharded safetensors + model.safetensors.index.json), and a small "
            "tokenizer (the demo's; prompts of token ids may use the whole vocabulary). Memory stays low "
            "(one block of values at a time); free disk is checked first; the directory appears only "
            "when complete. Bytes in bf16 for all layers: olmoe-1b-7b 13.8 GB, deepseek-v2-lite 31.4 GB, "
            "qwen3-30b-a3b 61.1 GB, mixtral-8x7b 93.4 GB."
        ),
        epilog=(
            "examples:\n"
            "  python -m moe_runtime.testing.shapes --shape deepseek-v2-lite --layers 4 --out /tmp/scale/dsv2-4\n"
            "  python -m moe_runtime.testing.shapes --shape olmoe-1b-7b --out ckpt/olmoe --shard-size 2GB\n"
            "  python -m moe_runtime.testing.shapes --shape mixtral-8x7b --layers 2 --plan"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--shape", required=True, choices=sorted(SHAPES), help="the real model to copy")
    parser.add_argument("--layers", type=int, metavar="N", help="decoder layers (default: the model's)")
    parser.add_argument("--out", metavar="DIR", help="new checkpoint directory")
    parser.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    parser.add_argument(
        "--shard-size",
        type=_size,
        default=DEFAULT_SHARD_BYTES,
        metavar="BYTES",
        help="shard size (default 5GB)",
    )
    parser.add_argument("--plan", action="store_true", help="print the bytes it would write and exit")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = shape_config(args.shape, layers=args.layers)
        if args.plan:
            print(json.dumps({"shape": args.shape, "layers": config["num_hidden_layers"],
                              "checkpoint_bytes": checkpoint_bytes(config)}))  # fmt: skip
            return 0
        if not args.out:
            raise UsageError("give --out DIR (or --plan)")
        out = write_checkpoint(config, args.out, seed=args.seed, shard_bytes=args.shard_size, progress=True)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
