"""ESFT adapters for serving tests: random perturbations of chosen experts, written as real adapter dirs."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from helpers.checkpoints import save_checkpoint
from helpers.routed_lora import write_random_lora
from moe_runtime.models import MoEModelInfo, find_moe_layers, load_model, model_fingerprint, split_expert
from moe_runtime.tuning.esft import ExpertSelection, read_adapter, replaced_fingerprint, write_adapter
from moe_runtime.tuning.routed_lora import RoutedLoraSettings


def make_adapter(
    model: nn.Module,
    out: Path,
    experts: dict[int, list[int]],
    *,
    seed: int,
    scale: float = 0.5,
    info: MoEModelInfo | None = None,
) -> Path:
    """Write an ESFT adapter whose experts are the base ones plus noise of ``scale`` x their std."""
    info = info or find_moe_layers(model)
    selection = ExpertSelection(experts={layer: sorted(ids) for layer, ids in experts.items()})
    generator = torch.Generator().manual_seed(seed)
    tuned = {}
    for layer, ids in selection.experts.items():
        for expert in ids:
            classic = split_expert(info.by_index(layer), expert)
            tuned[(layer, expert)] = {
                name: t + scale * t.std() * torch.randn(t.shape, generator=generator, dtype=t.dtype)
                for name, t in classic.items()
            }
    return write_adapter(
        out,
        info=info,
        selection=selection,
        tuned=tuned,
        replaced=replaced_fingerprint(model, info, selection),
        base_fingerprint=model_fingerprint(model),
    )


def merged_copy(build, adapter_dir: Path | None) -> nn.Module:
    """A fresh base model (``build()``) with the adapter merged in by the ESFT merge path."""
    model = build()
    if adapter_dir is not None:
        info = find_moe_layers(model)
        adapter = read_adapter(adapter_dir)
        adapter.check(model, info)
        adapter.merge_into(model, info)
    return model.eval()


def greedy_reference(model: nn.Module, request, device=None, **kwargs) -> tuple[list[int], torch.Tensor]:
    """Plain transformers greedy generation of one request (prompt ids) -> (new token ids, logits
    ``[new tokens, V]``): the reference a served row is compared with."""
    out = model.generate(
        torch.tensor([request.prompt], device=device),
        max_new_tokens=request.max_new_tokens,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
        **kwargs,
    )
    return out.sequences[0, len(request.prompt) :].tolist(), torch.cat(out.logits)


def make_esft_lora_adapter(
    model: nn.Module,
    out: Path,
    experts: dict[int, list[int]],
    *,
    seed: int,
    rank: int = 2,
    alpha: float = 4.0,
    info: MoEModelInfo | None = None,
) -> Path:
    """Write an esft-lora-merge adapter with random factors whose update ``(alpha / r) B A`` is about
    the size of each expert weight (in the model's dtype)."""
    from moe_runtime.tuning.esft_lora_merge import write_adapter as write_esft_lora
    from moe_runtime.tuning.esft_lora_merge.trainable import weight_names

    info = info or find_moe_layers(model)
    selection = ExpertSelection(experts={layer: sorted(ids) for layer, ids in experts.items()})
    generator = torch.Generator().manual_seed(seed)
    factors = {}
    for layer, ids in selection.experts.items():
        moe = info.by_index(layer)
        for expert in ids:
            classic = split_expert(moe, expert)
            pairs = {}
            for name in [*weight_names(moe), "down_proj.weight"]:
                weight = classic[name].float()
                a = torch.randn((rank, weight.shape[1]), generator=generator)
                b = (
                    torch.randn((weight.shape[0], rank), generator=generator)
                    * weight.std()
                    / (alpha / rank)
                    / rank**0.5
                )
                pairs[name] = (a.to(classic[name].dtype), b.to(classic[name].dtype))
            factors[(layer, expert)] = pairs
    return write_esft_lora(
        out,
        info=info,
        selection=selection,
        factors=factors,
        rank=rank,
        alpha=alpha,
        replaced=replaced_fingerprint(model, info, selection),
        base_fingerprint=model_fingerprint(model),
    )


def esft_and_routed_lora(root: Path, family: str, **overrides) -> tuple[Path, dict[str, Path], Path]:
    """A float64 checkpoint of ``family`` under ``root``, an ESFT adapter (two experts in the first and
    last MoE layers) and a random perft-r routed-LoRA adapter: ``(path, {"esft", "rl"}, root)``."""

    path = save_checkpoint(root / "model", family, **overrides)
    base = load_model(path)
    info = find_moe_layers(base)
    layers = info.layer_indices
    esft = make_adapter(
        base, root / "esft", {layers[0]: [1, 3], layers[-1]: [0, 2]}, seed=1, scale=1.0, info=info
    )
    settings = RoutedLoraSettings(variant="perft-r", num_experts=4, top_k=2, rank=4)
    lora = write_random_lora(base, root / "rl", settings, seed=2, b_std=0.5)
    return path, {"esft": esft, "rl": lora}, root
