"""Prefill without re-reading the model: prompts that arrive together are prefilled in one forward
whose offloaded layers read each expert at most once (the padding reads none), chunked layers equal
unchunked ones and read the same bytes, and the reads are counted per phase (prefill, decode).

Exactness is against one-request-at-a-time generation on float64 checkpoints: greedy tokens
identical, logits within 1e-10.
"""

from __future__ import annotations

import random

import pytest
import torch
from helpers.serving import esft_and_routed_lora

from moe_runtime.errors import UsageError
from moe_runtime.ops import slot_routed
from moe_runtime.runtime import DecodeConfig, MultiAdapterEngine, Request
from moe_runtime.runtime.generation import left_pad
from moe_runtime.runtime.offload import OffloadConfig

LENGTHS = (2, 5, 9, 14)  # prompts of different lengths: the batch is left-padded up to 14
NEW_TOKENS = 3


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A float64 mixtral (2 layers, 16 experts, top-2), an ESFT and a routed-LoRA adapter."""
    root = tmp_path_factory.mktemp("prefill")
    return esft_and_routed_lora(root, "mixtral", num_hidden_layers=2, num_local_experts=16)


def _engine(checkpoint, offload: bool, **settings) -> MultiAdapterEngine:
    path, adapters, root = checkpoint
    config = OffloadConfig(budget="25%", cache_dir=str(root / "cache"), **settings) if offload else None
    engine = MultiAdapterEngine.from_pretrained(path, offload=config)
    for name, adapter in adapters.items():
        engine.add_adapter(name, adapter)
    return engine


def _requests(engine, adapters) -> list[Request]:
    rng = random.Random(0)
    vocab = engine.model.get_input_embeddings().num_embeddings
    return [
        Request([rng.randrange(3, vocab) for _ in range(n)], adapters[i % len(adapters)], NEW_TOKENS, id=i)
        for i, n in enumerate(LENGTHS)
    ]


CONFIG = DecodeConfig(max_new_tokens=NEW_TOKENS, stop_on_eos=False, output_logits=True)


def _touched(engine, requests) -> dict[int, set[int]]:
    """Base experts the real (unpadded) tokens of the batched prefill route to, per layer, recorded
    by the executor's observer in the first forward of ``engine.generate(requests)``."""
    mask = left_pad([r.prompt for r in requests], 0)[1].reshape(-1).bool()
    owners = torch.tensor([engine.arena.owner(r.adapter) for r in requests]).repeat_interleave(
        max(len(r.prompt) for r in requests)
    )
    touched: dict[int, set[int]] = {}

    def observe(layer: int, top_k_index: torch.Tensor) -> None:
        if layer in touched or top_k_index.shape[0] != mask.shape[0]:
            return  # a later (decode) forward
        slots = engine.arena.layers[layer]
        logical = slots.table[owners[mask].unsqueeze(1), top_k_index[mask]]
        touched[layer] = set(logical[logical < slots.num_experts].tolist())

    engine.executor.observer = observe
    return touched


@pytest.mark.parametrize("offload", [False, True], ids=["resident", "offload"])
def test_batched_prefill_equals_one_at_a_time(checkpoint, offload):
    """Four prompts of different lengths and mixed adapters (base, ESFT, routed LoRA), prefilled in
    one forward: the same tokens as each alone; offloaded, every touched expert is read exactly once
    per layer (cold cache, no prefetch), nothing for the padding, and decode is counted apart."""
    engine = _engine(checkpoint, offload)
    requests = _requests(engine, [None, "esft", "rl", "esft"])
    touched = _touched(engine, requests)
    batched = engine.generate(requests, CONFIG)
    engine.executor.observer = None
    if offload:
        stats = engine.offload.stats
        prefill, decode = stats.phases["prefill"], stats.phases["decode"]
        assert prefill.forwards == 1 and prefill.tokens == sum(LENGTHS)
        assert decode.forwards == NEW_TOKENS - 1 and decode.tokens == len(LENGTHS) * (NEW_TOKENS - 1)
        store = engine.offload.store
        bound = sum(len(ids) * store.expert_bytes(layer) for layer, ids in touched.items())
        slots = engine.offload.num_slots
        assert all(len(ids) > slots for ids in touched.values())  # layers ran in several passes
        assert prefill.misses == sum(len(ids) for ids in touched.values())
        assert prefill.bytes_read == bound
        assert decode.bytes_read > 0 and prefill.bytes_read + decode.bytes_read == stats.bytes_read
        assert prefill.misses + decode.misses == stats.misses
    one_engine = _engine(checkpoint, offload)
    for request, got in zip(requests, batched):
        alone = one_engine.generate([request], CONFIG)[0]
        assert got.token_ids == alone.token_ids, request.id
        torch.testing.assert_close(got.logits, alone.logits, rtol=1e-10, atol=1e-10)
    if offload:
        phases = one_engine.offload.stats.phases
        assert phases["prefill"].forwards == len(requests)
        assert phases["prefill"].bytes_read >= prefill.bytes_read  # the gain of batching


@pytest.mark.parametrize("chunk", [1, 4])
def test_chunked_layers_equal_unchunked(checkpoint, monkeypatch, chunk):
    """An offloaded layer run ``chunk`` tokens at a time: the same logits (float64, 1e-10), the same
    bytes read and misses, and no expert call sees more than ``chunk`` tokens."""
    reference = _engine(checkpoint, True)
    requests = _requests(reference, [None, "esft", "rl"])
    expected = reference.generate(requests, CONFIG)
    assert reference.offload.chunk_tokens(reference.info.layers[0]) > max(LENGTHS) * len(LENGTHS)

    engine = _engine(checkpoint, True, chunk_tokens=chunk)
    rows = []
    inner = slot_routed.segmented_experts

    def counting(experts, hidden, top_k_weights, routed, segments):
        rows.append(hidden.shape[0])
        return inner(experts, hidden, top_k_weights, routed, segments)

    monkeypatch.setattr(slot_routed, "segmented_experts", counting)
    got = engine.generate(requests, CONFIG)
    assert rows and max(rows) <= chunk and len(rows) > engine.offload.stats.passes
    for a, b in zip(got, expected):
        assert a.token_ids == b.token_ids
        torch.testing.assert_close(a.logits, b.logits, rtol=1e-10, atol=1e-10)
    for phase in ("prefill", "decode"):
        mine, theirs = engine.offload.stats.phases[phase], reference.offload.stats.phases[phase]
        assert (mine.bytes_read, mine.misses, mine.passes) == (
            theirs.bytes_read,
            theirs.misses,
            theirs.passes,
        )


def test_chunk_size_from_a_byte_bound(checkpoint):
    """The default chunk: top-k entries of 2H + 3I values per token (float64 here) within chunk_bytes."""
    path, _, root = checkpoint
    engine = MultiAdapterEngine.from_pretrained(
        path, offload=OffloadConfig(budget="25%", cache_dir=str(root / "cache"), chunk_bytes="1MiB")
    )
    config = engine.model.config
    hidden, inter, top_k = config.hidden_size, config.intermediate_size, config.num_experts_per_tok
    per_token = top_k * (2 * hidden + 3 * inter) * 8
    for layer in engine.info.layers:
        assert engine.offload.chunk_tokens(layer) == 2**20 // per_token
    for bad in ({"chunk_tokens": 0}, {"chunk_bytes": "25%"}, {"chunk_bytes": 0}):
        with pytest.raises(UsageError):
            OffloadConfig(**bad).validate()
