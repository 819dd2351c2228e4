"""ESFT with offloaded frozen experts: the autograd function that reads the frozen experts through the
tier in both passes is checked numerically (float64 gradcheck) and against the stock experts; one
training step equals resident ESFT (loss and every trainable gradient, float32) while only the budget's
slots hold frozen expert weights, nothing saved for backward aliases them, and backward reads again."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.checkpoints import save_checkpoint

from moe_runtime.models import find_moe_layers, load_model
from moe_runtime.runtime.offload import OffloadConfig, OffloadTier, load_offloaded_model, parse_budget
from moe_runtime.tuning.esft import ExpertSelection
from moe_runtime.tuning.esft.offloaded import FrozenExperts
from moe_runtime.tuning.esft.tuner import prepare_esft

# float32; the offloaded forward sums the trained and the frozen experts apart and runs the frozen
# ones through the compiled kernel, so rounding may differ from resident ESFT
TOL = dict(rtol=1e-6, atol=1e-6)
SELECTION = {
    "qwen2_moe": {0: [1, 3], 1: [0, 2, 5]},
    "gpt_oss": {0: [1, 3], 1: [0, 2, 5]},
    "deepseek_v2": {1: [0, 2], 2: [1, 5, 6]},  # layer 0 is dense; shared experts stay frozen
}


@pytest.fixture(scope="module")
def f32_checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("esft_offload")
    return {
        family: save_checkpoint(root / family, family, dtype=torch.float32, num_hidden_layers=3)
        for family in SELECTION
    }


def _tier(path, budget: str, dtype) -> tuple:
    model, info, store = load_offloaded_model(path, dtype=dtype)
    return model, info, OffloadTier(info, store, OffloadConfig(budget=budget))


def test_frozen_experts_gradcheck_and_forward(moe_checkpoint):
    """float64, budget = top-k slots (2 of 8): outputs equal the stock experts with the selected
    experts' routing weights zeroed; gradients for hidden and routing weights pass gradcheck."""
    _, info, tier = _tier(moe_checkpoint, "25%", torch.float64)
    try:
        assert tier.num_slots == info.layers[0].top_k == 2
        layer = info.layers[0]
        frozen = FrozenExperts(tier, layer, [1, 3])
        g = torch.Generator().manual_seed(0)
        tokens, top_k = 5, layer.top_k
        hidden = torch.randn(tokens, layer.hidden_size, dtype=torch.float64, generator=g, requires_grad=True)
        weights = torch.rand(tokens, top_k, dtype=torch.float64, generator=g, requires_grad=True)
        index = torch.stack([torch.randperm(layer.num_experts, generator=g)[:top_k] for _ in range(tokens)])
        assert (index == 1).any() and len(torch.unique(index)) > tier.num_slots  # several passes

        reference_model = load_model(moe_checkpoint, dtype="float64")
        reference_model.set_experts_implementation("eager")  # transformers' own per-expert loop
        reference = find_moe_layers(reference_model).by_index(layer.index).experts
        kept = weights.detach() * ~torch.isin(index, torch.tensor([1, 3]))
        with torch.no_grad():
            expected = reference(hidden.detach(), index, kept)
        torch.testing.assert_close(frozen.run(hidden, index, weights), expected, rtol=1e-12, atol=1e-12)

        assert torch.autograd.gradcheck(
            lambda h, w: frozen.run(h, index, w), (hidden, weights), fast_mode=True
        )
    finally:
        tier.close()


def _step(model, info, selection, ids, tier=None, checkpointing=False):
    """One ESFT forward/backward on ``ids``; loss, trainable grads, misses before/after backward, and
    every tensor autograd saved for backward during the forward."""
    model.config.output_router_logits = True  # the router's aux loss, as the trainer runs it
    arena, _ = prepare_esft(model, info, ExpertSelection(experts=selection), tier)
    if checkpointing:
        model.train()
        model.activation_checkpointing_enable({"use_reentrant": False})
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = model(input_ids=ids, labels=ids, use_cache=False)
    misses = tier.stats.misses if tier is not None else 0
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in arena.named_parameters()}
    after = tier.stats.misses if tier is not None else 0
    arena.detach()
    return out.loss.detach(), grads, misses, after, saved, arena


@pytest.mark.parametrize("family", sorted(SELECTION))
def test_one_step_equals_resident_esft(f32_checkpoints, family):
    path, selection = f32_checkpoints[family], SELECTION[family]
    ids = torch.randint(2, 200, (4, 24), generator=torch.Generator().manual_seed(0))
    resident = load_model(path, dtype="float32")
    loss, grads, *_ = _step(resident, find_moe_layers(resident), selection, ids)

    model, info, tier = _tier(path, "25%", torch.float32)
    try:
        budget = parse_budget("25%").share * tier.offloaded_bytes()
        got_loss, got_grads, forward_misses, misses, saved, arena = _step(model, info, selection, ids, tier)
        torch.testing.assert_close(got_loss, loss, **TOL)
        assert got_grads.keys() == grads.keys()
        for name, grad in grads.items():
            assert grad.abs().max() > 0, name  # the step reaches every trainable tensor
            torch.testing.assert_close(got_grads[name], grad, **TOL, msg=name)

        # frozen expert weights live only in the budget's slots, never in the model's parameters
        assert all(layer.experts.down_proj.is_meta for layer in info.layers)
        assert 0 < tier.resident_expert_bytes() <= budget
        # backward read experts again (they were not kept)
        assert 0 < forward_misses < misses
        # nothing saved for backward is (a view of) a slot, and every stack of experts saved is the
        # trainable copies themselves
        slots = {t.untyped_storage().data_ptr() for c in tier.caches.values() for t in c.tensors.values()}
        trainable = {p.untyped_storage().data_ptr() for p in arena.parameters()}
        shapes = {tuple(t.shape[1:]) for c in tier.caches.values() for t in c.tensors.values()}
        for tensor in saved:
            assert tensor.untyped_storage().data_ptr() not in slots
            if tensor.dim() == 3 and tuple(tensor.shape[1:]) in shapes:
                assert tensor.untyped_storage().data_ptr() in trainable, tuple(tensor.shape)
    finally:
        tier.close()


def test_gradient_checkpointing_reads_a_third_time_and_changes_nothing(f32_checkpoints):
    path, selection = f32_checkpoints["qwen2_moe"], SELECTION["qwen2_moe"]
    ids = torch.randint(2, 200, (4, 24), generator=torch.Generator().manual_seed(0))
    resident = load_model(path, dtype="float32")
    loss, grads, *_ = _step(resident, find_moe_layers(resident), selection, ids)
    counts = {}
    for checkpointing in (False, True):
        model, info, tier = _tier(path, "25%", torch.float32)
        try:
            got_loss, got_grads, forward, total, *_ = _step(model, info, selection, ids, tier, checkpointing)
        finally:
            tier.close()
        torch.testing.assert_close(got_loss, loss, **TOL)
        for name, grad in grads.items():
            torch.testing.assert_close(got_grads[name], grad, **TOL, msg=name)
        counts[checkpointing] = (forward, total - forward)
    assert counts[True][0] == counts[False][0]  # the same forward
    assert counts[True][1] > counts[False][1]  # backward recomputes the layers: more reads


def test_slots_in_the_storage_dtype_change_nothing(tmp_path):
    """bf16 stored, float32 computed: slots kept in bf16 (half the memory), each pass's experts widened
    as it runs; loss and gradients equal resident ESFT on the float32-widened weights."""
    path = save_checkpoint(tmp_path / "bf16", "qwen2_moe", dtype=torch.bfloat16, num_hidden_layers=2)
    selection = SELECTION["qwen2_moe"]
    ids = torch.randint(2, 200, (4, 24), generator=torch.Generator().manual_seed(0))
    resident = load_model(path, dtype="float32")
    loss, grads, *_ = _step(resident, find_moe_layers(resident), selection, ids)
    model, info, store = load_offloaded_model(path, dtype=torch.float32)
    tier = OffloadTier(info, store, OffloadConfig(budget="25%", slot_dtype="storage"))
    try:
        got_loss, got_grads, forward, total, *_ = _step(model, info, selection, ids, tier)
        slots = [t for cache in tier.caches.values() for t in cache.tensors.values()]
        assert all(t.dtype == torch.bfloat16 for t in slots)
        assert tier.resident_expert_bytes() <= parse_budget("25%").share * tier.offloaded_bytes() / 2
        assert 0 < forward < total
    finally:
        tier.close()
    torch.testing.assert_close(got_loss, loss, **TOL)
    for name, grad in grads.items():
        assert got_grads[name].dtype == torch.float32
        torch.testing.assert_close(got_grads[name], grad, **TOL, msg=name)
