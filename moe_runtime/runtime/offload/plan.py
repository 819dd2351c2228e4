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

from collections.abc import Callable
from pathlib import Path

import torch

from ...models import MoEModelInfo, compute_dtype, find_moe_layers, stored_dtype
from ...models.checkpoint_files import check_shards
from ...models.loading import resolve_model_path
from .config import OffloadConfig, fast_tier_slots

__all__ = ["plan_memory", "plan_tuning"]

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
    return _plan(model, offload, dtype)[0]


def _plan(model, offload, dtype):
    """:func:`plan_memory`'s answer, the meta model's MoE layers and its config."""
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
        if offload.slot_dtype == "storage":  # slots as stored; one pass's experts widened at a time
            per_slot = sum(layer.expert_bytes * storage_size // compute_size for layer in info.layers)
            widest = max(layer.expert_bytes for layer in info.layers)
            ram = non_expert + slots * per_slot + slots * widest
        if offload.tier == "cpu":  # every expert in host memory, the slots on the compute device
            ram = non_expert + routed
        worst = sum(k * b for k, b in zip(top_k, expert_read))
        uniform = sum(
            k * b * max(0.0, 1 - slots / layer.num_experts)
            for k, b, layer in zip(top_k, expert_read, info.layers)
        )
    packed = sum(layer.num_experts * b for layer, b in zip(info.layers, expert_read))
    extra = packed if offload is not None and offload.pack else 0
    plan = {
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
    return plan, info, config


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


def plan_tuning(
    model: str | Path,
    offload: OffloadConfig | None,
    dtype: str | torch.dtype | None,
    *,
    trainable_bytes: Callable[[MoEModelInfo], int],
    micro_batch: int,
    max_length: int,
    grad_accum: int = 1,
    checkpointing: bool = False,
) -> dict:
    """What tuning ``model`` needs (experts offloaded with ``offload``, or resident), without running.

    :func:`plan_memory`'s weights and reads, plus the training terms:

        trainable  = the method's trained parameters (ESFT: the selected experts, held in RAM)
        gradients  = trainable; optimizer (AdamW) = 2 x trainable
        activations (estimate) = per decoder layer tokens x hidden x 24 values (norms, attention
                     projections, residuals, the saved inputs of the offloaded experts) + the
                     attention probabilities (batch x heads x length^2, twice), + the logits
                     (tokens x vocab, three times: logits, log-softmax, their gradient)
        reads per step: per MoE layer and micro-batch, d = E x (1 - (1 - K/E)^tokens) experts are
                     touched (uniform routing); the forward reads them and the backward reads them
                     again except the ``slots`` still resident: estimate (d + max(0, d - slots)),
                     worst 2 x min(E, tokens x K), each ``expert_read_bytes`` as stored.
        with ``checkpointing`` (gradient checkpointing): activations are every layer's input plus one
                     layer's full set; the recomputed forward reads the experts once more.

    Returns:
        :func:`plan_memory`'s dict (its ``ram_bytes`` renamed ``weights_ram_bytes``) with
        ``trainable_bytes``, ``gradient_bytes``, ``optimizer_bytes``, ``activation_bytes_estimate``,
        ``tokens_per_micro_batch``, ``ram_bytes`` (all of them), ``bytes_read_per_step_estimate``,
        ``bytes_read_per_step_worst``.
    """
    plan, info, config = _plan(model, offload, dtype)
    size = torch.empty(0, dtype=getattr(torch, plan["compute_dtype"])).element_size()
    trainable = int(trainable_bytes(info))
    tokens = micro_batch * max_length
    hidden = int(config.hidden_size)
    heads = int(getattr(config, "num_attention_heads", 1) or 1)
    layers = int(config.num_hidden_layers)
    vocab = int(config.vocab_size)
    per_layer = (tokens * hidden * 24 + 2 * micro_batch * heads * max_length**2) * size
    if checkpointing:
        activations = layers * tokens * hidden * size + per_layer
    else:
        activations = layers * per_layer
    activations += 3 * tokens * vocab * size
    reads = 3 if checkpointing else 2
    weights = plan.pop("ram_bytes")
    read = plan["expert_read_bytes"]
    slots = plan["slots_per_layer"]
    estimate = worst = 0.0
    if offload is not None:
        for layer in info.layers:
            per_expert = read * layer.expert_bytes / max(info.layers[0].expert_bytes, 1)
            touched = layer.num_experts * (1 - (1 - layer.top_k / layer.num_experts) ** tokens)
            estimate += (touched + (reads - 1) * max(0.0, touched - slots)) * per_expert
            worst += reads * min(layer.num_experts, tokens * layer.top_k) * per_expert
    plan.update(
        {
            "weights_ram_bytes": weights,
            "trainable_bytes": trainable,
            "gradient_bytes": trainable,
            "optimizer_bytes": 2 * trainable,
            "tokens_per_micro_batch": tokens,
            "gradient_checkpointing": checkpointing,
            "activation_bytes_estimate": int(activations),
            "ram_bytes": int(weights + 4 * trainable + activations),
            "bytes_read_per_step_estimate": int(estimate * grad_accum),
            "bytes_read_per_step_worst": int(worst * grad_accum),
        }
    )
    return plan
