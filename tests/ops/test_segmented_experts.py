"""``segmented_experts`` on each device against the stock eager experts loop on the CPU in float64.

The segments (the base experts plus two chunks of perturbed copies) are concatenated into one weight
tensor for the reference, which runs transformers' own per-expert loop with the slot ids as expert
ids. On the CPU without gradients the fused ``segmented_mm`` op runs; with gradients, and on CUDA,
``torch._grouped_mm`` per segment (CUDA bf16 on Hopper: the CUTLASS grouped GEMM).

Tolerances (inputs rounded to the dtype first, so only the arithmetic differs):
float32: atol 1e-4, rtol 1e-4; bfloat16: atol 3e-2, rtol 3e-2 (bf16 rounds the up-projection and
the activation before the down-projection, about 2^-8 relative each).
"""

from __future__ import annotations

import copy

import pytest
import torch

from moe_runtime.models import find_moe_layers
from moe_runtime.ops import Segment, extension_available, reroute_permute, segmented_experts
from moe_runtime.testing.random_models import build_random_model

pytestmark = pytest.mark.skipif(not extension_available(), reason="moe_runtime._C is not built")

TOL = {torch.float32: {"atol": 1e-4, "rtol": 1e-4}, torch.bfloat16: {"atol": 3e-2, "rtol": 3e-2}}
CHUNKS = (3, 2)  # adapter chunk sizes after the base experts


def _case(family: str, dtype: torch.dtype, seed: int = 0, tokens: int = 37):
    """The layer's experts module, segments, hidden states, routing weights and a slot table."""
    model = build_random_model(family, seed=seed)
    experts = find_moe_layers(model).layers[0].experts
    layer = find_moe_layers(model).layers[0]
    names = [n for n, _ in experts.named_parameters()]
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # unit-variance activations, so the tolerances are relative to O(1) outputs
        for name, param in experts.named_parameters():
            fan_in = layer.hidden_size if "up" in name else param[0].numel() // layer.hidden_size
            param.copy_(torch.randn(param.shape, generator=gen) * (0.1 if "bias" in name else fan_in**-0.5))

    def chunk(size: int) -> dict[str, torch.Tensor]:
        picks = torch.randint(0, layer.num_experts, (size,), generator=gen)
        return {
            n: (p.detach()[picks] * (1 + 0.5 * torch.randn(p[picks].shape, generator=gen))).to(dtype)
            for n, p in experts.named_parameters()
        }

    parts = [{n: p.detach().to(dtype) for n, p in experts.named_parameters()}, *map(chunk, CHUNKS)]
    num_slots = layer.num_experts + sum(CHUNKS)
    top_k = layer.top_k
    hidden = torch.randn(tokens, layer.hidden_size, generator=gen).to(dtype)
    weights = torch.softmax(torch.randn(tokens, top_k, generator=gen), -1).to(dtype)
    top_k_index = torch.randint(0, layer.num_experts + 1, (tokens, top_k), generator=gen)  # E: dropped
    owners = torch.randint(0, 3, (tokens,), generator=gen)
    table = torch.randint(0, num_slots, (3, layer.num_experts), generator=gen, dtype=torch.int32)
    table[0] = torch.arange(layer.num_experts)  # owner 0: the base model
    table[2, 1] = -1  # an owner without expert 1: its entries are dropped
    return experts, names, parts, (hidden, weights, top_k_index, owners, table, num_slots)


def _segments(experts, parts: list[dict], device: str) -> list[Segment]:
    up = "gate_up_proj" if hasattr(experts, "gate_up_proj") else "up_proj"
    out, start = [], 0
    for part in parts:
        p = {n: t.to(device) for n, t in part.items()}
        out.append(Segment(start, p[up], p["down_proj"], p.get(f"{up}_bias"), p.get("down_proj_bias")))
        start += p[up].shape[0]
    return out


def _reference(experts, names, parts, routed, hidden, weights, num_slots) -> torch.Tensor:
    """transformers' eager loop over the concatenated slots, float64 on the CPU."""
    ref = copy.deepcopy(experts).to(torch.float64)
    for name in names:
        setattr(ref, name, torch.nn.Parameter(torch.cat([p[name] for p in parts]).to(torch.float64)))
    ref.num_experts = num_slots
    slots = routed.slot_ids.cpu().view(hidden.shape[0], -1)
    dropped = slots >= num_slots
    eager = type(ref).forward.__wrapped__
    with torch.no_grad():
        return eager(
            ref,
            hidden.to(torch.float64),
            slots.masked_fill(dropped, 0),
            weights.to(torch.float64).masked_fill(dropped, 0.0),
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("family", ["qwen2_moe", "gpt_oss"])  # gate_up [E, 2I, H]; transposed with biases
@pytest.mark.parametrize("grad", [False, True], ids=["serving", "training"])
def test_matches_eager_reference(device, family, dtype, grad):
    experts, names, parts, (hidden, weights, top_k_index, owners, table, num_slots) = _case(family, dtype)
    module = copy.deepcopy(experts).to(device=device, dtype=dtype)
    segments = _segments(experts, parts, device)
    if grad:
        for seg in segments[1:]:
            seg.up.requires_grad_(True)
    routed = reroute_permute(top_k_index.to(device), owners.to(device), table.to(device), num_slots)
    dropped = int((routed.slot_ids >= num_slots).sum())
    assert 0 < dropped < routed.slot_ids.numel()  # both routed and dropped entries occur
    with torch.set_grad_enabled(grad):
        got = segmented_experts(module, hidden.to(device), weights.to(device), routed, segments)
    assert got.device.type == device and got.dtype == dtype and got.requires_grad == grad
    want = _reference(experts, names, parts, routed, hidden, weights, num_slots)
    torch.testing.assert_close(got.detach().cpu().to(torch.float64), want, **TOL[dtype])
    if grad:
        got.float().square().sum().backward()
        slots = routed.slot_ids.cpu()
        used = [s for s in segments[1:] if bool(((slots >= s.start) & (slots < s.start + s.size)).any())]
        assert used  # a chunk receives entries, and each such chunk gets a gradient on its device
        assert all(s.up.grad is not None and s.up.grad.device.type == device for s in used)
        assert all(bool(s.up.grad.abs().sum() > 0) for s in used)


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral"])
@pytest.mark.parametrize("tokens", [1, 5, 8])  # top-2: at most 16 entries, the decode path
def test_few_entries_path_equals_sorted_path(family, tokens, monkeypatch):
    """A decode step's entries run in token order (no permutation): the eager reference within the
    float32 tolerance, and bit-identical to the sorted segmented path on the same entries."""
    from moe_runtime.ops import experts_mm

    experts, names, parts, (hidden, weights, top_k_index, owners, table, num_slots) = _case(
        family, torch.float32, tokens=tokens
    )
    segments = _segments(experts, parts, "cpu")
    routed = reroute_permute(top_k_index, owners, table, num_slots)
    assert routed.slot_ids.numel() <= experts_mm.STREAM_ROWS_MAX
    with torch.no_grad():
        few = segmented_experts(experts, hidden, weights, routed, segments)
        monkeypatch.setattr(experts_mm, "STREAM_ROWS_MAX", 0)  # every entry through the sort
        sorted_path = segmented_experts(experts, hidden, weights, routed, segments)
    want = _reference(experts, names, parts, routed, hidden, weights, num_slots)
    torch.testing.assert_close(few.to(torch.float64), want, **TOL[torch.float32])
    assert torch.equal(few, sorted_path)
