"""A sizing answer before the run: the RAM, disk and reads an expert budget implies.

    config.json -> the model on the meta device (no weights) -> MoE layers, expert and other bytes
                   in the compute dtype
    safetensors headers -> checkpoint bytes and the experts' storage dtype (bytes read per expert)
    budget -> slots per layer (the runtime's own rule, refusals included)
           -> RAM  = non-expert weights + slots x one expert of every layer (compute dtype)
              disk = the checkpoint (+ the packed copy when asked for)
              read = per decoded token, per MoE layer: top-k experts if none is resident (worst),
                     top-k x (1 - slots / experts) when routing is uniform and the cache holds
                     ``slots`` of them (a typical hit rate for unskewed routing; skewed routing hits more)

Activations, the KV cache and the Python/torch runtime (about 0.5-1 GB) come on top of ``ram_bytes``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ...models import compute_dtype, find_moe_layers, stored_dtype
from ...models.checkpoint_files import check_shards
from ...models.loading import resolve_model_path
from .config import OffloadConfig, fast_tier_slots

__all__ = ["plan_memory"]

_ST_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}


def plan_memory(
    model: str | Path, offload: OffloadConfig | None, dtype: str | torch.dtype | None = "auto"
) -> dict:
    """What serving ``model`` with ``offload`` (None: resident) needs, from its config and headers only.

    Returns:
        A JSON-ready dict: ``compute_dtype``, ``storage_dtype``, ``checkpoint_bytes``,
        ``non_expert_bytes``, ``routed_expert_bytes`` (compute dtype), ``slots_per_layer``,
        ``ram_bytes``, ``disk_bytes`` (checkpoint + packed copy), ``extra_disk_bytes``,
        ``expert_read_bytes`` (one expert of one layer, as stored),
        ``bytes_read_per_token_worst``, ``bytes_read_per_token_uniform``.

    Raises:
        UsageError: not a checkpoint, a shard missing or truncated, or a budget below top-k.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    path = resolve_model_path(model)
    headers = check_shards(path)
    stored = stored_dtype(path)
    device = offload.device() if offload is not None else torch.device("cpu")
    dtype = compute_dtype(dtype, device, stored) or stored or torch.float32
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    with torch.device("meta"):
        net = AutoModelForCausalLM.from_config(config, dtype=dtype)
    info = find_moe_layers(net)
    expert_params = {
        id(getattr(layer.experts, p)) for layer in info.layers for p in layer.layout.param_names()
    }
    non_expert = sum(p.numel() * p.element_size() for p in net.parameters() if id(p) not in expert_params)
    checkpoint = sum(h.file.stat().st_size for h in headers)
    storage_size = _expert_storage_size(headers) or torch.empty(0, dtype=stored or dtype).element_size()
    compute_size = torch.empty(0, dtype=dtype).element_size()
    expert_read = [layer.expert_bytes * storage_size // compute_size for layer in info.layers]
    routed = info.routed_expert_bytes
    top_k = [layer.top_k for layer in info.layers]
    if offload is None:
        slots = max(layer.num_experts for layer in info.layers)
        ram = non_expert + routed
        worst = uniform = 0
    else:
        slots = fast_tier_slots(info, offload.budget, device)
        ram = non_expert + slots * sum(layer.expert_bytes for layer in info.layers)
        if offload.tier == "cpu":  # every expert in host memory, the slots on the compute device
            ram = non_expert + routed
        worst = sum(k * b for k, b in zip(top_k, expert_read))
        uniform = sum(
            k * b * max(0.0, 1 - slots / layer.num_experts)
            for k, b, layer in zip(top_k, expert_read, info.layers)
        )
    packed = sum(layer.num_experts * b for layer, b in zip(info.layers, expert_read))
    extra = packed if offload is not None and offload.pack else 0
    return {
        "model": str(model),
        "compute_dtype": str(dtype).removeprefix("torch."),
        "storage_dtype": str(stored).removeprefix("torch.") if stored is not None else None,
        "offload": None if offload is None else offload.tier,
        "budget": None if offload is None else str(offload.budget),
        "moe_layers": len(info.layers),
        "checkpoint_bytes": checkpoint,
        "non_expert_bytes": non_expert,
        "routed_expert_bytes": routed,
        "slots_per_layer": slots,
        "ram_bytes": ram,
        "disk_bytes": checkpoint + extra,
        "extra_disk_bytes": extra,
        "expert_read_bytes": expert_read[0] if expert_read else 0,
        "bytes_read_per_token_worst": worst,
        "bytes_read_per_token_uniform": int(uniform),
    }


def _expert_storage_size(headers) -> int | None:
    """Bytes per value of the largest tensors (the experts' storage dtype)."""
    biggest = max(
        (
            (e["data_offsets"][1] - e["data_offsets"][0], e["dtype"])
            for h in headers
            for e in h.tensors.values()
        ),
        default=None,
    )
    return _ST_SIZES.get(biggest[1]) if biggest else None
