"""Storage dtype != compute dtype: bf16 checkpoints of the real shapes (reduced widths, the hub's
per-expert layout) served in float32 equal transformers' float32 model of the same weights, resident
and with experts read straight from the checkpoint's files (no packed copy)."""

from __future__ import annotations

import pytest
import torch
from helpers.checkpoints import save_checkpoint
from helpers.serving import greedy_reference

from moe_runtime.ops.loader import widen_in_place
from moe_runtime.runtime import DecodeConfig, MultiAdapterEngine, Request
from moe_runtime.runtime.offload import OffloadConfig
from moe_runtime.testing import shapes

PROMPTS = [[5, 17, 42, 7, 99, 12], [3, 250, 11], [64, 1, 2, 3, 4, 5, 6, 7]]
# float32, two implementations (grouped GEMM vs transformers' own) summing in different orders
TOL = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def bf16_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    out = {}
    for shape in sorted(shapes.SHAPES):
        config = shapes.shape_config(shape, layers=2, **shapes.TINY_WIDTHS[shape])
        out[shape] = shapes.write_checkpoint(config, root / shape, shard_bytes=200_000)
    return out


def _requests() -> list[Request]:
    return [Request(prompt=p, id=i, max_new_tokens=5) for i, p in enumerate(PROMPTS)]


@pytest.mark.parametrize("shape", sorted(shapes.SHAPES))
def test_bf16_stored_float32_served_equals_transformers(bf16_checkpoints, tmp_path, shape):
    from transformers import AutoModelForCausalLM

    path = bf16_checkpoints[shape]
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    expected = [greedy_reference(reference, r) for r in _requests()]
    config = DecodeConfig(max_new_tokens=5, output_logits=True)
    engines = {
        "resident": MultiAdapterEngine.from_pretrained(path, dtype="auto"),
        "disk": MultiAdapterEngine.from_pretrained(
            path, dtype="float32", offload=OffloadConfig(budget="50%", cache_dir=str(tmp_path / "c"))
        ),
        # bf16 slots, each pass's experts widened as it runs (exact: the same tokens and logits)
        "disk-bf16-slots": MultiAdapterEngine.from_pretrained(
            path, dtype="float32", offload=OffloadConfig(budget="50%", slot_dtype="storage")
        ),
    }
    for name, engine in engines.items():
        assert next(engine.model.parameters()).dtype == torch.float32, name
        completions = engine.generate(_requests(), config)
        for completion, (tokens, logits) in zip(completions, expected):
            assert completion.token_ids == tokens, name
            torch.testing.assert_close(completion.logits, logits, **TOL)
    narrow = engines["disk-bf16-slots"].offload
    assert all(t.dtype == torch.bfloat16 for c in narrow.caches.values() for t in c.tensors.values())
    assert narrow.stats.misses > 0
    offload = engines["disk"].offload
    store = offload.store
    assert (
        store.kind == "checkpoint" and store.storage_dtype == torch.bfloat16 and store.dtype == torch.float32
    )
    assert not (tmp_path / "c").exists()  # no second copy of the experts
    per_expert = store.expert_bytes(offload.info.layers[0].index)  # bytes on disk: bf16
    assert offload.stats.bytes_read == offload.stats.misses * per_expert > 0
    assert offload.caches[offload.info.layers[0].index].tensors["down_proj"].dtype == torch.float32


@pytest.mark.parametrize(
    ("stored", "wide"),
    [(torch.bfloat16, torch.float32), (torch.float16, torch.float32), (torch.float16, torch.float64)],
)
@pytest.mark.parametrize("n", [1, 2, 3, 7, 1000, 4099])
def test_widen_in_place_equals_a_cast(stored, wide, n):
    values = torch.randn(n).to(stored)
    slot = torch.full((n,), float("nan"), dtype=wide)
    raw = slot.view(torch.uint8)
    raw[raw.numel() - n * values.element_size() :].copy_(values.view(torch.uint8))
    widen_in_place(slot, stored)
    assert torch.equal(slot, values.to(wide))


def test_narrower_compute_than_storage(tmp_path):
    """float64 stored, float32 computed: read through a buffer, same as the resident float32 model."""
    path = save_checkpoint(tmp_path / "m", "mixtral", num_hidden_layers=2)
    requests = [Request(prompt="the quick brown fox", id=0)]
    config = DecodeConfig(max_new_tokens=5, output_logits=True)
    resident = MultiAdapterEngine.from_pretrained(path, dtype=torch.float32).generate(requests, config)
    offloaded = MultiAdapterEngine.from_pretrained(
        path, dtype=torch.float32, offload=OffloadConfig(budget="50%", cache_dir=str(tmp_path / "c"))
    )
    got = offloaded.generate(requests, config)
    assert offloaded.offload.store.storage_dtype == torch.float64
    assert got[0].token_ids == resident[0].token_ids
    torch.testing.assert_close(got[0].logits, resident[0].logits, rtol=1e-5, atol=1e-5)
