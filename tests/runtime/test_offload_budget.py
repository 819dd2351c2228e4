"""Expert budgets against the fast tier's free memory, with the memory query replaced by a stub.

A share of experts (``25%``) or bytes keep their meaning on every device; on a GPU they must also fit
its free memory. ``80%free`` is a share of the fast tier's free memory when the model is loaded.
"""

from __future__ import annotations

import pytest
import torch
from helpers.checkpoints import save_checkpoint

from moe_runtime.errors import UsageError
from moe_runtime.models import find_moe_layers
from moe_runtime.runtime import MultiAdapterEngine
from moe_runtime.runtime.offload import Budget, OffloadConfig, parse_budget, slots_per_layer
from moe_runtime.runtime.offload import config as offload_config
from moe_runtime.runtime.offload.config import fast_tier_slots, free_memory
from moe_runtime.testing.random_models import build_random_model

CUDA, CPU = torch.device("cuda", 0), torch.device("cpu")


@pytest.fixture(scope="module")
def info():
    return find_moe_layers(build_random_model("qwen2_moe", seed=0))  # 8 experts per layer, top-k 2


def per_slot(info) -> int:
    return sum(layer.expert_bytes for layer in info.layers)


class Free:
    """A stub of ``free_memory``: ``bytes`` free on any device; records the devices asked about."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes, self.asked = nbytes, []

    def __call__(self, device: torch.device) -> int:
        self.asked.append(device)
        return self.nbytes


def test_parse_share_of_free_memory():
    assert parse_budget("80%free") == Budget(free_share=0.8)
    assert parse_budget(" 12.5 %FREE ").free_share == 0.125
    assert parse_budget(Budget(free_share=0.3)) == Budget(free_share=0.3)
    assert str(Budget(free_share=0.8)) == "80%free"
    for bad in ("0%free", "150%free", "x%free", "%free"):
        with pytest.raises(UsageError, match="free"):
            parse_budget(bad)
    with pytest.raises(UsageError, match="exactly one"):
        parse_budget(Budget(share=0.5, free_share=0.5))


def test_share_of_experts_keeps_its_meaning_and_must_fit_the_gpu(info):
    budget = parse_budget("50%")
    plenty = Free(100 * per_slot(info))
    assert fast_tier_slots(info, budget, CUDA, plenty) == slots_per_layer(info, budget) == 4
    assert plenty.asked == [CUDA]
    with pytest.raises(UsageError, match=f"need {4 * per_slot(info)} bytes on cuda:0, which has"):
        fast_tier_slots(info, budget, CUDA, Free(4 * per_slot(info) - 1))
    assert fast_tier_slots(info, budget, CUDA, Free(4 * per_slot(info))) == 4  # exactly fits


def test_cpu_fast_tier_is_not_checked_against_free_memory(info):
    nothing = Free(0)
    assert fast_tier_slots(info, parse_budget("25%"), CPU, nothing) == 2
    assert fast_tier_slots(info, parse_budget(3 * per_slot(info)), CPU, nothing) == 3
    assert nothing.asked == []


@pytest.mark.parametrize("fast", [CUDA, CPU], ids=["cuda", "cpu"])
def test_share_of_free_memory(info, fast):
    free = Free(10 * per_slot(info) + 7)
    assert fast_tier_slots(info, parse_budget("50%free"), fast, free) == 5  # 5 slots of 10 that fit
    assert free.asked == [fast]
    assert fast_tier_slots(info, parse_budget("100%free"), fast, Free(10**15)) == 8  # every expert
    with pytest.raises(UsageError, match="fewer than one token's working set"):
        fast_tier_slots(info, parse_budget("10%free"), fast, Free(10 * per_slot(info)))


def test_free_memory_counts_unused_cached_blocks(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1000, 5000))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 300)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 120)
    assert free_memory(CUDA) == 1000 + 300 - 120
    assert free_memory(CPU) > 0


def test_compute_device_is_checked(monkeypatch):
    assert OffloadConfig(tier="cpu", compute_device="cpu").device() == CPU
    with pytest.raises(UsageError, match="disk tier computes on the cpu"):
        OffloadConfig(tier="disk", compute_device="cuda").validate()
    with pytest.raises(UsageError, match="unknown compute device"):
        OffloadConfig(tier="cpu", compute_device="gpu0").validate()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UsageError, match="CUDA is not available"):
        OffloadConfig(tier="cpu", compute_device="cuda").validate()
    assert OffloadConfig(tier="cpu").device() == CPU  # the default without a GPU


def test_engine_resolves_a_share_of_free_memory(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "ckpt", "qwen2_moe", num_hidden_layers=2)
    slot = per_slot(find_moe_layers(build_random_model("qwen2_moe", seed=0, dtype=torch.float64)))
    free = Free(12 * slot)
    monkeypatch.setattr(offload_config, "free_memory", free)
    config = OffloadConfig(tier="cpu", compute_device="cpu", budget="50%free", cache_dir=str(tmp_path))
    engine = MultiAdapterEngine.from_pretrained(path, offload=config)
    assert engine.offload.num_slots == 6 and free.asked == [CPU]
    engine.close()
