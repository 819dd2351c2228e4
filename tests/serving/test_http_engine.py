"""The HTTP server over the real engine (the demo model, two ESFT adapters with routing profiles): the
official ``openai`` client, streaming or not, gets exactly the tokens the in-process engine generates
for the base model, an adapter and ``auto``; chat through a chat template; admin loads; a client
that leaves mid-stream frees its rows."""

from __future__ import annotations

import time

import httpx
import numpy as np
import openai
import pytest
from helpers.serving import make_adapter

from moe_runtime.models import find_moe_layers
from moe_runtime.runtime import MultiAdapterEngine, Request
from moe_runtime.runtime.profiles import RoutingProfile, write_routing_profile
from moe_runtime.serving.http import BoundServer, create_app

PROMPTS = ["12 + 35 =", "def total(xs):", "The city of"]
TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def _adapter(engine, root, name: str, experts: dict, seed: int):
    info = find_moe_layers(engine.model)
    path = make_adapter(engine.model, root / name, experts, seed=seed, scale=1.0, info=info)
    counts = np.random.default_rng(seed).random((len(info.layers), info.layers[0].num_experts)) ** 4
    write_routing_profile(path, RoutingProfile.from_counts(info.layer_indices, counts, tokens=100, task=name))
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("http-engine")
    engine = MultiAdapterEngine.from_pretrained("demo")
    layers = find_moe_layers(engine.model).layer_indices
    dirs = {
        "arith": _adapter(engine, root, "arith", {layers[0]: [1, 3], layers[-1]: [0, 2]}, seed=1),
        "code": _adapter(engine, root, "code", {layers[1]: [4], layers[2]: [5, 6]}, seed=2),
        "extra": _adapter(engine, root, "extra", {layers[0]: [7]}, seed=3),
    }
    engine.add_adapter("arith", dirs["arith"])
    engine.add_adapter("code", dirs["code"])
    with BoundServer(create_app(engine, enable_admin=True), port=0) as server:
        yield engine, server, dirs
    engine.close()


def reference(engine, request: Request):
    """The in-process engine's completion (its handle claimed by this thread alone)."""
    return engine.submit(request).result()


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("model", ["base", "arith", "auto"])
def test_openai_client_gets_the_engines_tokens(setup, model, stream):
    engine, server, _ = setup
    for prompt in PROMPTS[:2]:
        want = reference(engine, Request(prompt, None if model == "base" else model, 10, temperature=0))
        out = client(server).completions.create(
            model=model,
            prompt=prompt,
            max_tokens=10,
            temperature=0,
            stream=stream,
            stream_options={"include_usage": True} if stream else None,
            extra_body={"return_token_ids": True},
        )
        if stream:
            *chunks, usage_chunk = list(out)
            text = "".join(c.choices[0].text for c in chunks)
            ids = [t for c in chunks for t in c.choices[0].token_ids]
            finish, served_by, usage = (
                chunks[-1].choices[0].finish_reason,
                chunks[-1].model,
                usage_chunk.usage,
            )
        else:
            choice = out.choices[0]
            text, ids, finish, served_by, usage = (
                choice.text,
                choice.token_ids,
                choice.finish_reason,
                out.model,
                out.usage,
            )
        assert (ids, text, finish) == (want.token_ids, want.completion, want.finish_reason)
        assert served_by == (want.adapter or "base")
        assert (usage.prompt_tokens, usage.completion_tokens) == (want.prompt_tokens, len(want.token_ids))
    if model == "auto":
        assert served_by in ("arith", "code")


def test_seeded_sampling_and_stop_strings_as_in_process(setup):
    engine, server, _ = setup
    want = reference(engine, Request(PROMPTS[1], "code", 12, temperature=0.8, top_p=0.9, seed=5))
    out = client(server).completions.create(
        model="code", prompt=PROMPTS[1], max_tokens=12, temperature=0.8, top_p=0.9, seed=5
    )
    assert out.choices[0].text == want.completion
    full = reference(engine, Request(PROMPTS[0], None, 12, temperature=0)).completion
    stop = full.strip()[2:4]
    cut = reference(engine, Request(PROMPTS[0], None, 12, temperature=0, stop=[stop]))
    assert cut.finish_reason == "stop" and stop not in cut.completion
    chunks = list(
        client(server).completions.create(
            model="base", prompt=PROMPTS[0], max_tokens=12, temperature=0, stop=stop, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == cut.completion
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_chat_through_the_chat_template(setup):
    engine, server, _ = setup
    messages = [{"role": "user", "content": "12 + 35 ="}]
    response = httpx.post(server.url + "/v1/chat/completions", json={"model": "base", "messages": messages})
    assert response.status_code == 400 and "no chat template" in response.json()["error"]["message"]
    engine.tokenizer.chat_template = TEMPLATE
    try:
        ids = engine.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        want = reference(engine, Request(list(ids), "arith", 8, temperature=0))
        out = client(server).chat.completions.create(
            model="arith", messages=messages, max_tokens=8, temperature=0
        )
        assert out.choices[0].message.content == want.completion
        assert out.usage.prompt_tokens == len(ids)
        chunks = list(
            client(server).chat.completions.create(
                model="arith", messages=messages, max_tokens=8, temperature=0, stream=True
            )
        )
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.completion
    finally:
        engine.tokenizer.chat_template = None


def test_bad_requests_then_a_good_one(setup):
    engine, server, _ = setup
    url = server.url + "/v1/completions"
    for body, message in [
        ({"model": "nope", "prompt": "x"}, "model 'nope' is not served"),
        ({"model": "base", "prompt": "x", "max_tokens": -1}, "'max_tokens' must be at least 1"),
        ({"model": "base", "prompt": [1, 10**6]}, "is not in [0, 1024)"),
        ({"model": "base", "prompt": "x", "max_tokens": 600}, "exceed this model's context of 512"),
    ]:
        response = httpx.post(url, json=body)
        assert response.status_code == 400 and message in response.json()["error"]["message"], response.text
    response = httpx.post(url, content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]
    assert (
        client(server).completions.create(model="base", prompt="x", max_tokens=3).usage.completion_tokens >= 1
    )


def test_admin_loads_and_unloads_adapters(setup):
    engine, server, dirs = setup
    url = server.url + "/v1/adapters"
    response = httpx.post(url, json={"name": "extra", "path": str(dirs["extra"])})
    assert response.status_code == 201, response.text
    assert "extra" in engine.adapters and "extra" in [m.id for m in client(server).models.list()]
    want = reference(engine, Request(PROMPTS[2], "extra", 8, temperature=0))
    out = client(server).completions.create(model="extra", prompt=PROMPTS[2], max_tokens=8, temperature=0)
    assert out.choices[0].text == want.completion
    bad = httpx.post(url, json={"name": "broken", "path": str(dirs["extra"] / "missing")})
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    assert httpx.delete(url + "/extra").status_code == 200
    assert "extra" not in engine.adapters
    assert httpx.delete(url + "/extra").status_code == 404


def test_a_client_leaving_mid_stream_frees_its_rows(setup, monkeypatch):
    engine, server, _ = setup
    handles = []
    submit = engine.submit
    monkeypatch.setattr(
        engine, "submit", lambda request, *a, **k: handles.append(submit(request, *a, **k)) or handles[-1]
    )
    body = {"model": "code", "prompt": PROMPTS[1], "max_tokens": 480, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
    deadline = time.monotonic() + 10
    while not handles[0].done and time.monotonic() < deadline:
        time.sleep(0.02)
    result = handles[0].result(timeout=1)
    assert result.finish_reason == "cancelled" and len(result.token_ids) < 480
    deadline = time.monotonic() + 5
    while engine.pending and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.pending == 0
    # no live request names the adapter any more: it can be unloaded (then loaded back for other tests)
    assert httpx.delete(server.url + "/v1/adapters/code").status_code == 200
    engine.add_adapter("code", setup[2]["code"])
