"""A mixed batch (base + several adapters, different prompt lengths and limits) served together equals
each request run alone by plain transformers on its adapter merged into a copy of the base model.

Tolerance for logits (float32): atol 1e-4, rtol 1e-4; generated tokens must be identical. Both sides
run on the test's device (the reference is plain transformers on that device).
"""

from __future__ import annotations

import pytest
import torch
from helpers.serving import greedy_reference, make_adapter, merged_copy

from moe_runtime.errors import AdapterError
from moe_runtime.models import find_moe_layers
from moe_runtime.runtime import DecodeConfig, MultiAdapterEngine, Request
from moe_runtime.testing.random_models import build_random_model

TOL = {"atol": 1e-4, "rtol": 1e-4}
# qwen2_moe: shared expert; deepseek_v2: dense first layer, shared expert, group-limited routing, MLA
FAMILIES = ["qwen2_moe", "deepseek_v2", "olmoe"]
# (prompt length, adapter, max_new_tokens)
PLAN = [(5, None, 6), (9, "x", 4), (3, "y", 8), (12, "z", 5), (7, "x", 7), (1, "z", 3), (10, None, 2)]


class Served:
    def __init__(self, family: str, root, device: str) -> None:
        self.family = family
        self.device = device
        self.build = lambda: build_random_model(family, seed=0).to(device)
        cpu_model = build_random_model(family, seed=0)  # adapters are written from CPU weights
        info = find_moe_layers(cpu_model)
        layers, num_experts = info.layer_indices, info.layers[0].num_experts
        expert_sets = {
            "x": {layers[0]: [0, 3]},
            "y": {layers[-1]: [1, 2, 5]},
            "z": {
                layer: [(3 * i + 1) % num_experts, (i + 5) % num_experts] for i, layer in enumerate(layers)
            },
        }
        self.dirs = {
            name: make_adapter(cpu_model, root / name, experts, seed=i, scale=1.0, info=info)
            for i, (name, experts) in enumerate(expert_sets.items())
        }
        self.model = self.build()
        self.engine = MultiAdapterEngine(self.model)
        for name, path in self.dirs.items():
            self.engine.add_adapter(name, path)
        vocab = self.model.config.get_text_config().vocab_size
        generator = torch.Generator().manual_seed(7)
        self.requests = [
            Request(torch.randint(3, vocab, (n,), generator=generator).tolist(), adapter, limit, id=i)
            for i, (n, adapter, limit) in enumerate(PLAN)
        ]
        self._merged: dict = {}
        self._references: dict = {}

    def merged(self, adapter: str | None):
        if adapter not in self._merged:
            self._merged[adapter] = merged_copy(self.build, self.dirs[adapter] if adapter else None)
        return self._merged[adapter]

    def reference(self, request: Request, **kwargs):
        """Plain transformers generate on the merged model, one request alone (no padding)."""
        key = (tuple(request.prompt), request.adapter, request.max_new_tokens, tuple(sorted(kwargs.items())))
        if key not in self._references:
            self._references[key] = self._generate(request, **kwargs)
        return self._references[key]

    def _generate(self, request: Request, **kwargs):
        return greedy_reference(self.merged(request.adapter), request, self.device, **kwargs)


@pytest.fixture(scope="module", params=FAMILIES)
def served(request, tmp_path_factory, device) -> Served:
    return Served(request.param, tmp_path_factory.mktemp(request.param), device)


@pytest.mark.parametrize("max_chunks", [1, None])
def test_mixed_batch_equals_merged_models(served, max_chunks):
    engine = served.engine
    if max_chunks is None:  # one chunk per (adapter, layer): several segments per layer
        engine = MultiAdapterEngine(served.build(), max_chunks=None)
        for name, path in served.dirs.items():
            engine.add_adapter(name, path)
        assert engine.memory().chunks > len(engine.info.layers)
    completions = engine.generate(served.requests, DecodeConfig(output_logits=True))
    assert all(c.logits.device.type == served.device for c in completions)
    differs_from_base = 0
    for request, completion in zip(served.requests, completions):
        tokens, logits = served.reference(request)
        assert completion.id == request.id and completion.adapter == request.adapter
        assert completion.token_ids == tokens, (served.family, request.id)
        torch.testing.assert_close(completion.logits, logits, **TOL)
        if request.adapter is not None:
            base_logits = served.reference(Request(request.prompt, None, request.max_new_tokens))[1]
            differs_from_base += not torch.allclose(base_logits[:1], logits[:1], atol=1e-3)
    assert differs_from_base >= 3  # the adapters do change the outputs: the test is not vacuous


def test_prompt_logits_equal_merged_forward(served):
    logits = served.engine.prompt_logits(served.requests)
    for request, got in zip(served.requests, logits):
        with torch.no_grad():
            ids = torch.tensor([request.prompt], device=served.device)
            expected = served.merged(request.adapter)(ids).logits[0]
        torch.testing.assert_close(got, expected, **TOL)


def test_finished_on_eos_leave_the_batch(served):
    engine = served.engine
    free_running = engine.generate(served.requests, DecodeConfig(stop_on_eos=False))
    eos = free_running[2].token_ids[2]  # request 2 emits it third: it must stop there
    saved = engine.model.generation_config.eos_token_id
    engine.model.generation_config.eos_token_id = eos
    try:
        completions = engine.generate(served.requests)
    finally:
        engine.model.generation_config.eos_token_id = saved
    assert completions[2].token_ids[-1] == eos and len(completions[2].token_ids) <= 3
    for request, completion in zip(served.requests, completions):
        tokens, _ = served.reference(request, eos_token_id=eos)
        assert completion.token_ids == tokens, request.id


def test_sampling(served):
    engine = served.engine
    sampled = DecodeConfig(do_sample=True, temperature=1.5, seed=3)
    first = engine.generate(served.requests, sampled)
    assert [c.token_ids for c in engine.generate(served.requests, sampled)] == [c.token_ids for c in first]
    greedy = engine.generate(served.requests)
    assert [c.token_ids for c in first] != [c.token_ids for c in greedy]
    # nucleus of a tiny mass keeps only the most likely token: sampling reduces to greedy
    nucleus = engine.generate(served.requests, DecodeConfig(do_sample=True, top_p=1e-6, seed=3))
    assert [c.token_ids for c in nucleus] == [c.token_ids for c in greedy]


def test_pending_requests_pin_their_adapters(served):
    engine = served.engine
    with pytest.raises(AdapterError, match="not loaded"):
        engine.submit(Request([5, 6], adapter="nope"))
    engine.submit([Request([5, 6, 7], adapter="y", max_new_tokens=2, id="r")])
    with pytest.raises(AdapterError, match="pending"):
        engine.remove_adapter("y")
    done = engine.run()
    assert [c.id for c in done] == ["r"] and engine.pending == 0
    before = engine.memory()
    engine.remove_adapter("y")  # no longer pending: removable, and loadable again in its slots
    engine.add_adapter("y", served.dirs["y"])
    assert engine.memory().slot_bytes == before.slot_bytes and engine.adapters == ["x", "z", "y"]
    again = engine.generate([Request(served.requests[2].prompt, "y", served.requests[2].max_new_tokens)])
    assert again[0].token_ids == served.reference(served.requests[2])[0]
