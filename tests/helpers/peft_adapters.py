"""peft LoRA adapters with random non-zero weights, written by peft itself (attention + fused experts)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from moe_runtime.models import find_moe_layers, model_fingerprint
from moe_runtime.tuning.meta import write_meta


def expert_targets(model: nn.Module) -> list[str]:
    """``target_parameters`` for every fused expert weight (relative to a decoder layer)."""
    info = find_moe_layers(model)
    targets = set()
    for layer in info.layers:
        suffix = layer.experts_name.split(f"layers.{layer.index}.", 1)[-1]
        targets.update(f"{suffix}.{name}" for name in (layer.layout.up_name, "down_proj"))
    return sorted(targets)


def write_peft_adapter(
    build, out: Path, *, seed: int, rank: int = 4, ours: bool = False, rank_pattern: dict | None = None
) -> Path:
    """Wrap a fresh model (``build()``) with peft LoRA on q/o projections and every fused expert
    weight, give every LoRA matrix random values (``B`` included, so the adapter changes the model)
    and save it with peft's ``save_pretrained``. ``ours`` adds our metadata (method lora)."""
    from peft import LoraConfig, get_peft_model

    model = build()
    fingerprint = model_fingerprint(model)
    model_type = find_moe_layers(model).model_type
    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=["q_proj", "o_proj"],
        target_parameters=expert_targets(model),
        rank_pattern=rank_pattern or {},
        alpha_pattern={"o_proj": 3 * rank},
    )
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator).to(param.dtype) * 0.2)
    peft_model.save_pretrained(out)
    if ours:
        lora = {"rank": rank, "alpha": 2 * rank, "dropout": 0.0}
        write_meta(out, method="lora", model_type=model_type, base_fingerprint=fingerprint, lora=lora)
    return out
