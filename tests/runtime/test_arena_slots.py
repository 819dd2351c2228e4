"""The serving arena: slots hold exactly the tuned experts, are reused after unloading, never leak."""

from __future__ import annotations

import pytest
import torch
from helpers.serving import make_adapter

from moe_runtime.errors import AdapterError
from moe_runtime.models import find_moe_layers, split_expert
from moe_runtime.models.weights import fuse_slices
from moe_runtime.runtime import ExpertArena
from moe_runtime.testing.random_models import build_random_model
from moe_runtime.tuning.esft import read_adapter

EXPERT_SETS = {
    "a": {0: [1, 3], 1: [0, 2, 5]},
    "b": {1: [7]},
    "c": {0: [0, 2, 4, 6]},
    "d": {0: [5], 1: [1, 4]},
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model = build_random_model("qwen2_moe", seed=0)
    info = find_moe_layers(model)
    root = tmp_path_factory.mktemp("adapters")
    dirs = {
        name: make_adapter(model, root / name, sel, seed=i)
        for i, (name, sel) in enumerate(EXPERT_SETS.items())
    }
    return model, info, dirs


def _load(model, info, path):
    adapter = read_adapter(path)
    adapter.check(model, info)
    return adapter


def _slot_weights(arena: ExpertArena, layer: int, slot: int) -> dict[str, torch.Tensor]:
    slots = arena.layers[layer]
    for seg in slots.segments:
        if seg.start <= slot < seg.start + seg.size:
            layout = slots.layer.layout
            return {layout.up_name: seg.up[slot - seg.start], "down_proj": seg.down[slot - seg.start]}
    raise AssertionError(f"slot {slot} not held")


def _check_tables(arena: ExpertArena, model, info, dirs, loaded: list[str]) -> None:
    """Every owner row maps tuned experts to slots holding exactly the adapter's weights, others to base."""
    for name in loaded:
        adapter = _load(model, info, dirs[name])
        owner = arena.owner(name)
        for layer_index, slots in arena.layers.items():
            row = slots.table[owner].tolist()
            tuned = EXPERT_SETS[name].get(layer_index, [])
            for expert in range(slots.num_experts):
                if expert not in tuned:
                    assert row[expert] == expert
                    continue
                assert row[expert] >= slots.num_experts
                expected = fuse_slices(slots.layer.layout, adapter.experts[(layer_index, expert)])
                for key, tensor in _slot_weights(arena, layer_index, row[expert]).items():
                    assert torch.equal(tensor, expected[key]), (name, layer_index, expert, key)
    for slots in arena.layers.values():
        assert slots.table[0].tolist() == list(range(slots.num_experts))
        assert int(slots.table.max()) < slots.num_slots


@pytest.mark.parametrize("max_chunks", [None, 1])
def test_load_unload_reuses_slots_and_never_leaks(setup, max_chunks):
    model, info, dirs = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    arena = ExpertArena(info, max_chunks=max_chunks)
    expert_bytes = info.layers[0].expert_bytes
    tuned = {name: sum(len(ids) for ids in sel.values()) for name, sel in EXPERT_SETS.items()}

    for name in ("a", "b", "c"):
        arena.add(name, _load(model, info, dirs[name]))
    memory = arena.memory()
    assert memory.live_slots == tuned["a"] + tuned["b"] + tuned["c"] and memory.free_slots == 0
    assert memory.slot_bytes == memory.live_bytes == memory.live_slots * expert_bytes  # exact, no padding
    assert memory.chunks == (4 if max_chunks is None else 2)  # per (adapter, layer), or one per layer
    _check_tables(arena, model, info, dirs, ["a", "b", "c"])

    # unloading a frees its slots; d (smaller than a in both layers) fits entirely in them
    a_slots = arena.slots_of("a")
    a_owner = arena.owner("a")
    arena.remove("a")
    assert arena.memory().free_slots == tuned["a"]
    held = arena.memory().slot_bytes
    arena.add("d", _load(model, info, dirs["d"]))
    assert arena.owner("d") == a_owner  # the owner row is reused too
    assert arena.memory().slot_bytes == held  # no new chunk
    for layer, slots in arena.slots_of("d").items():
        assert set(slots) <= set(a_slots[layer])
    assert arena.memory().free_slots == tuned["a"] - tuned["d"]
    _check_tables(arena, model, info, dirs, ["b", "c", "d"])

    # many cycles: memory stays bounded by the peak and everything frees at the end
    peak = arena.memory().slot_bytes
    for _ in range(3):
        for name in ("b", "c", "d"):
            arena.remove(name)
            arena.add(name, _load(model, info, dirs[name]))
        assert arena.memory().slot_bytes <= peak
        assert arena.memory().live_slots == tuned["b"] + tuned["c"] + tuned["d"]
    _check_tables(arena, model, info, dirs, ["b", "c", "d"])
    for name in ("b", "c", "d"):
        arena.remove(name)
    assert arena.memory().live_slots == 0 and arena.memory().free_slots * expert_bytes == peak
    arena.trim()  # gives back every chunk left entirely free
    memory = arena.memory()
    assert (
        memory.adapters == memory.live_slots == memory.free_slots == memory.slot_bytes == memory.chunks == 0
    )
    for slots in arena.layers.values():
        assert slots.num_slots == slots.num_experts
        assert (slots.table == slots.table[0]).all()
    for key, value in model.state_dict().items():  # the base weights are used in place, never written
        assert torch.equal(value, before[key]), key


def test_trim_and_compact(setup):
    model, info, dirs = setup
    arena = ExpertArena(info, max_chunks=None)
    for name in ("a", "b", "c"):
        arena.add(name, _load(model, info, dirs[name]))
    assert arena.memory().chunks == 4  # one exact-size chunk per (adapter, layer it tunes)
    arena.remove("a")
    arena.add("d", _load(model, info, dirs["d"]))  # reuses part of a's slots in both layers
    arena.remove("c")
    assert arena.memory().free_slots > 0
    arena.trim()  # c's chunk goes; the chunks shared by a's leftovers and d stay
    memory = arena.memory()
    assert memory.chunks == 3 and memory.free_slots == 2
    _check_tables(arena, model, info, dirs, ["b", "d"])
    arena.compact()  # one exact chunk per layer
    memory = arena.memory()
    assert memory.free_slots == 0 and memory.slot_bytes == memory.live_bytes
    assert memory.chunks == sum(1 for slots in arena.layers.values() if slots.held_slots) == 2
    _check_tables(arena, model, info, dirs, ["b", "d"])
    arena.add("a", _load(model, info, dirs["a"]))
    _check_tables(arena, model, info, dirs, ["a", "b", "d"])


def test_refusals(setup, tmp_path):
    model, info, dirs = setup
    arena = ExpertArena(info)
    arena.add("a", _load(model, info, dirs["a"]))
    with pytest.raises(AdapterError, match="already loaded"):
        arena.add("a", _load(model, info, dirs["b"]))
    with pytest.raises(AdapterError, match="not loaded"):
        arena.remove("zzz")
    with pytest.raises(AdapterError, match="not loaded"):
        arena.owner("zzz")
    # an adapter that also tunes a shared expert cannot differ per request within a batch
    adapter = _load(model, info, dirs["b"])
    shared = info.layers[0].shared_names[0]
    name = next(n for n, _ in model.named_parameters() if n.startswith(shared))
    adapter.others = {name: dict(model.named_parameters())[name].detach().clone()}
    with pytest.raises(AdapterError, match="not servable in a mixed batch"):
        arena.add("shared", adapter)
    assert arena.names == ["a"] and arena.memory().live_slots == 5
    assert split_expert(info.layers[0], 0)  # base untouched and readable
