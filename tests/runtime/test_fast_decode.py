"""Served generation through the compiled decode step equals plain transformers, and whatever the step
cannot serve falls back to the model's forward.

Greedy tokens must be identical to ``model.generate`` of each request alone (float32); logits within
atol 1e-4, rtol 1e-4. Requests of different prompt lengths and limits, more than ``max_batch_size``,
so rows join (caches merged), leave (rows cut) and groups are copied into fresh step buffers.
"""

from __future__ import annotations

import pytest
import torch
from helpers.serving import greedy_reference

from moe_runtime.ops import extension_available
from moe_runtime.runtime import DecodeConfig, MultiAdapterEngine, Request
from moe_runtime.runtime.fast_decode import FastDecode
from moe_runtime.testing import build_random_model

requires_extension = pytest.mark.skipif(not extension_available(), reason="moe_runtime._C is not built")

TOL = {"atol": 1e-4, "rtol": 1e-4}
FAMILIES = {
    "mixtral": {"sliding_window": None},
    "qwen3_moe": {"mlp_only_layers": [0], "norm_topk_prob": True},
    "olmoe": {},
    "qwen2_moe": {},
}
PLAN = [(5, 6), (9, 4), (3, 8), (12, 5), (1, 3)]  # (prompt length, max_new_tokens)


def _requests(model) -> list[Request]:
    generator = torch.Generator().manual_seed(3)
    vocab = model.config.vocab_size
    return [
        Request(torch.randint(3, vocab, (n,), generator=generator).tolist(), max_new_tokens=limit, id=i)
        for i, (n, limit) in enumerate(PLAN)
    ]


def _counting(monkeypatch, method: str = "step") -> list[int]:
    """Calls of ``FastDecode.<method>`` (``step``: decode steps, ``prompt``: prefills) from now on."""
    calls = [0]
    original = getattr(FastDecode, method)

    def counted(self, *args, **kwargs):
        calls[0] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(FastDecode, method, counted)
    return calls


def _serve_and_compare(engine: MultiAdapterEngine, requests: list[Request]) -> None:
    config = DecodeConfig(stop_on_eos=False, output_logits=True, max_batch_size=3)
    served = engine.generate(requests, config)
    with engine.stock() as stock:
        for request, completion in zip(requests, served):
            tokens, logits = greedy_reference(stock, request)
            assert completion.token_ids == tokens, request.id
            torch.testing.assert_close(completion.logits, logits, check_dtype=False, **TOL)


@requires_extension
@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("threads", [1, 2])
def test_generate_equals_transformers(family, threads, monkeypatch):
    calls, prefills = _counting(monkeypatch), _counting(monkeypatch, "prompt")
    model = build_random_model(family, **FAMILIES[family])
    engine = MultiAdapterEngine(model)
    assert engine._scheduler.fast_decode is not None
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _serve_and_compare(engine, _requests(model))
    finally:
        torch.set_num_threads(before)
    assert calls[0] > 0  # the compiled step served decode steps
    assert prefills[0] > 0  # and prompts


@requires_extension
def test_prompts_past_the_limit_take_the_forward(monkeypatch):
    """Prompt batches of more real tokens than ``prompt_rows_max()`` run the model's forward (the
    decode steps after them still the compiled step); the tokens are transformers' either way."""
    import moe_runtime.runtime.fast_decode as fast_decode

    calls, prefills = _counting(monkeypatch), _counting(monkeypatch, "prompt")
    monkeypatch.setattr(fast_decode, "prompt_rows_max", lambda: 9)
    model = build_random_model("qwen3_moe", **FAMILIES["qwen3_moe"])
    requests = _requests(model)
    _serve_and_compare(MultiAdapterEngine(model), [requests[1], requests[2], requests[4]])  # 9 + 3 + 1
    assert prefills[0] == 0 and calls[0] > 0
    _serve_and_compare(MultiAdapterEngine(model), requests[2:3])
    assert prefills[0] == 1


@requires_extension
def test_switch_off(monkeypatch):
    monkeypatch.setenv("MOE_RUNTIME_FAST_DECODE", "0")
    assert FastDecode.of(build_random_model("mixtral", sliding_window=None)) is None


@requires_extension
@pytest.mark.parametrize(
    "family, overrides, why",
    [
        ("granitemoe", {}, "no compiled decode step"),  # an unrecognised family
        ("mixtral", {"dtype": torch.float64}, "not float32"),
    ],
)
def test_unrecognised_falls_back(family, overrides, why, monkeypatch):
    calls = _counting(monkeypatch)
    model = build_random_model(family, **overrides)
    fast, reason = FastDecode.recognise(model)
    assert fast is None and why in reason
    engine = MultiAdapterEngine(model)
    assert engine._scheduler.fast_decode is None
    _serve_and_compare(engine, _requests(model)[:3])
    assert calls[0] == 0


@requires_extension
def test_sliding_window_cache_falls_back(monkeypatch):
    """Mixtral's tiny config keeps a 4-token sliding window: its cache layers are not plain, so every
    decode step runs the model's forward (and the tokens are still transformers')."""
    calls = _counting(monkeypatch)
    model = build_random_model("mixtral")
    assert model.config.sliding_window == 4
    engine = MultiAdapterEngine(model)
    assert engine._scheduler.fast_decode is not None
    _serve_and_compare(engine, _requests(model)[:3])
    assert calls[0] == 0


@requires_extension
def test_hooks_block_the_step_but_model_hooks_still_fire(monkeypatch):
    """A hook on an inner module must see it run (the step falls back); the model's own hooks are
    called around every compiled step as around a forward."""
    calls, prefills = _counting(monkeypatch), _counting(monkeypatch, "prompt")
    model = build_random_model("mixtral", sliding_window=None)
    engine = MultiAdapterEngine(model)
    seen = []
    handle = model.register_forward_hook(
        lambda m, args, kwargs, out: seen.append(kwargs["input_ids"].shape), with_kwargs=True
    )
    request = _requests(model)[0]
    engine.generate([request], DecodeConfig(stop_on_eos=False))
    assert calls[0] == request.max_new_tokens - 1 and prefills[0] == 1
    assert [tuple(s) for s in seen] == [(1, 5)] + [(1, 1)] * (request.max_new_tokens - 1)
    handle.remove()
    inner = model.model.layers[0].mlp.register_forward_hook(lambda m, args, out: None)
    calls[0] = prefills[0] = 0
    _serve_and_compare(engine, [request])
    assert calls[0] == 0 and prefills[0] == 0
    inner.remove()


@requires_extension
def test_generate_batch_with_the_step_equals_without(monkeypatch):
    from moe_runtime.runtime import generate_batch

    calls, prefills = _counting(monkeypatch), _counting(monkeypatch, "prompt")
    model = build_random_model("qwen2_moe")
    requests = _requests(model)
    prompts, limits = [r.prompt for r in requests], [r.max_new_tokens for r in requests]
    config = DecodeConfig(stop_on_eos=False, output_logits=True)
    plain = generate_batch(model, prompts, limits, config=config, eos_ids=set(), pad_id=0)
    assert calls[0] == 0
    fast = generate_batch(
        model, prompts, limits, config=config, eos_ids=set(), pad_id=0, fast_decode=FastDecode.of(model)
    )
    assert calls[0] == max(limits) - 1 and prefills[0] == 1
    for a, b in zip(plain, fast):
        assert a.token_ids == b.token_ids
        torch.testing.assert_close(a.logits, b.logits, **TOL)


@requires_extension
def test_buffers_grow_past_their_first_capacity(monkeypatch):
    """A 2-token prompt and 45 new tokens: the buffers first hold the prompt plus 32 columns, then
    are copied into bigger ones; the tokens stay transformers'."""
    calls = _counting(monkeypatch)
    model = build_random_model("olmoe")
    engine = MultiAdapterEngine(model)
    _serve_and_compare(engine, [Request([5, 9], max_new_tokens=45)])
    assert calls[0] == 44


@requires_extension
def test_what_blocks_is_seen_after_a_clean_check():
    """The module scan is reused while no hook was registered and no experts state attached: a hook
    added later, a routing observer and a removed-then-restored state are all still seen."""
    from moe_runtime.models.hook import install, state_of, uninstall

    model = build_random_model("olmoe")
    engine = MultiAdapterEngine(model)
    fast = engine._scheduler.fast_decode
    with torch.no_grad():
        assert fast.blocked(1, 4) is None
        assert fast.blocked(1, 4) is None  # the cached scan
        experts = model.model.layers[1].mlp.experts
        state_of(experts).observers.append(lambda *args: None)
        assert fast.blocked(1, 4) == "routing observers"
        state_of(experts).observers.clear()
        assert fast.blocked(1, 4) is None
        handle = model.model.layers[0].self_attn.register_forward_pre_hook(lambda m, args: None)
        assert "pre-hook" in fast.blocked(1, 4)
        handle.remove()
        assert fast.blocked(1, 4) is None
        uninstall(model)
        install(model)  # new states: found again, observers included
        state_of(model.model.layers[0].mlp.experts).observers.append(lambda *args: None)
        assert fast.blocked(1, 4) == "routing observers"
