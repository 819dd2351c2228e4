"""The HTTP layer over a fake engine that keeps the serving contract (helpers/fake_engine.py): the
official ``openai`` client gets exactly the engine's tokens, streaming and not; bad requests get one
400 each and the server keeps serving; API key, admin switch, and a client that leaves mid-answer."""

from __future__ import annotations

import contextlib
import json
import time

import httpx
import openai
import pytest
from helpers.fake_engine import EOS, FakeEngine, FakeTokenizer, expected_tokens

from moe_runtime.serving.http import BoundServer, create_app

TEMPLATE = "role: content lines"  # the fake tokenizer's own template (any non-empty string enables chat)


@contextlib.contextmanager
def serving(engine, **kwargs):
    with BoundServer(create_app(engine, **kwargs), host="127.0.0.1", port=0) as server:
        yield server


def client(server, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=30)


def text_of(ids: list[int]) -> str:
    return FakeTokenizer().decode(ids)


@pytest.fixture
def engine(tmp_path):
    engine = FakeEngine(tokenizer=FakeTokenizer(TEMPLATE))
    for name in ("arith", "code"):
        (tmp_path / name).mkdir()
        engine.add_adapter(name, tmp_path / name)
    return engine


@pytest.fixture
def server(engine):
    with serving(engine, enable_admin=False) as server:
        yield server


def test_models_lists_base_adapters_and_auto(server):
    names = [m.id for m in client(server).models.list()]
    assert names == ["base", "arith", "code", "auto"]
    assert client(server).models.retrieve("code").id == "code"


@pytest.mark.parametrize("model", ["base", "arith", "auto"])
def test_completion_equals_the_engine(server, engine, model):
    prompt = "12 + 35 ="
    adapter = {"base": None, "auto": "arith"}.get(model, model)  # the fake's auto takes the first adapter
    want = expected_tokens(FakeTokenizer()(prompt)["input_ids"], adapter, 7)
    out = client(server).completions.create(
        model=model, prompt=prompt, max_tokens=7, temperature=0, extra_body={"return_token_ids": True}
    )
    choice = out.choices[0]
    assert (choice.text, choice.token_ids, choice.finish_reason) == (text_of(want), want, "length")
    assert out.model == (adapter or "base")
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (9, 7, 16)
    request = engine.submitted[-1].request
    assert (request.adapter, request.max_new_tokens, request.temperature) == (
        model if model != "base" else None,
        7,
        0,
    )


@pytest.mark.parametrize("model", ["base", "code", "auto"])
def test_stream_equals_the_engine(server, model):
    prompt = [5, 6, 7]
    adapter = {"base": None, "auto": "arith"}.get(model, model)
    want = expected_tokens(prompt, adapter, 12)
    chunks = list(
        client(server).completions.create(
            model=model,
            prompt=prompt,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"return_token_ids": True},
        )
    )
    *tokens, usage = chunks
    assert "".join(c.choices[0].text for c in tokens) == text_of(want)
    assert [t for c in tokens for t in c.choices[0].token_ids] == want
    assert [c.choices[0].finish_reason for c in tokens] == [None] * (len(tokens) - 1) + ["length"]
    assert tokens[-1].model == (adapter or "base")
    assert usage.choices == [] and (usage.usage.prompt_tokens, usage.usage.completion_tokens) == (3, 12)


def test_stream_wire_format_ends_with_done(server):
    body = {"model": "base", "prompt": "hi", "max_tokens": 3, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert {c["object"] for c in chunks} == {"text_completion"}
    assert len({c["id"] for c in chunks}) == 1


def test_eos_and_stop_strings(server):
    out = client(server).completions.create(model="base", prompt="<eos>", max_tokens=10, temperature=0)
    want = expected_tokens(FakeTokenizer()("<eos>")["input_ids"], None, 10)
    assert want[-1] == EOS and (out.choices[0].finish_reason, out.usage.completion_tokens) == (
        "stop",
        len(want),
    )
    assert out.choices[0].text == text_of(want)

    full = text_of(expected_tokens(FakeTokenizer()("abc")["input_ids"], None, 20))
    stop = full[5:7]
    cut = full[: full.index(stop)]
    out = client(server).completions.create(
        model="base", prompt="abc", max_tokens=20, temperature=0, stop=[stop]
    )
    assert (out.choices[0].text, out.choices[0].finish_reason) == (cut, "stop")
    stream = client(server).completions.create(
        model="base", prompt="abc", max_tokens=20, temperature=0, stop=stop, stream=True
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == cut and chunks[-1].choices[0].finish_reason == "stop"


def test_chat_templated_by_the_tokenizer(server):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    prompt = FakeTokenizer().apply_chat_template(messages, add_generation_prompt=True)
    want = text_of(expected_tokens(prompt, "code", 6))
    out = client(server).chat.completions.create(model="code", messages=messages, max_tokens=6, temperature=0)
    assert (out.choices[0].message.role, out.choices[0].message.content) == ("assistant", want)
    assert (out.object, out.model, out.usage.prompt_tokens) == ("chat.completion", "code", len(prompt))
    stream = client(server).chat.completions.create(
        model="code", messages=messages, max_completion_tokens=6, temperature=0, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "length"


def test_chat_without_a_template_is_a_400(tmp_path):
    with serving(FakeEngine()) as server, pytest.raises(openai.BadRequestError) as caught:
        client(server).chat.completions.create(model="base", messages=[{"role": "user", "content": "hi"}])
    assert "no chat template" in caught.value.body["message"]


def test_sampling_parameters_reach_the_engine(server, engine):
    def sample(seed):
        out = client(server).completions.create(
            model="base", prompt="x", max_tokens=12, temperature=0.7, top_p=0.9, seed=seed
        )
        return out.choices[0].text

    assert sample(3) == sample(3) != sample(4)
    request = engine.submitted[-1].request
    assert (request.temperature, request.top_p, request.seed, request.stop) == (0.7, 0.9, 4, None)


BAD = [
    ("not json", b"{'model': 'base'", "not valid JSON"),
    ("not an object", [1, 2], "must be a JSON object"),
    ("no model", {"prompt": "hi"}, "'model' is required"),
    ("unknown adapter", {"model": "nope", "prompt": "hi"}, "model 'nope' is not served"),
    (
        "negative max_tokens",
        {"model": "base", "prompt": "hi", "max_tokens": -3},
        "'max_tokens' must be at least 1",
    ),
    (
        "max_tokens as text",
        {"model": "base", "prompt": "hi", "max_tokens": "5"},
        "'max_tokens' must be an integer",
    ),
    ("temperature as text", {"model": "base", "prompt": "hi", "temperature": "hot"}, "'temperature' must be"),
    ("negative temperature", {"model": "base", "prompt": "hi", "temperature": -1}, "'temperature' must be"),
    ("top_p 0", {"model": "base", "prompt": "hi", "top_p": 0}, "'top_p' must be"),
    ("seed float", {"model": "base", "prompt": "hi", "seed": 1.5}, "'seed' must be"),
    ("stream as text", {"model": "base", "prompt": "hi", "stream": "yes"}, "'stream' must be a boolean"),
    ("stop of numbers", {"model": "base", "prompt": "hi", "stop": [1]}, "'stop' must be"),
    ("n > 1", {"model": "base", "prompt": "hi", "n": 2}, "'n' must be 1"),
    (
        "stream_options without stream",
        {"model": "base", "prompt": "hi", "stream_options": {"include_usage": True}},
        "'stream_options' goes with 'stream': true",
    ),
    (
        "penalty",
        {"model": "base", "prompt": "hi", "presence_penalty": 0.5},
        "'presence_penalty' is not supported",
    ),
    ("logprobs", {"model": "base", "prompt": "hi", "logprobs": 2}, "'logprobs' is not supported"),
    ("no prompt", {"model": "base"}, "'prompt' is required"),
    ("prompt of objects", {"model": "base", "prompt": {"a": 1}}, "'prompt' must be"),
    ("two prompts", {"model": "base", "prompt": ["a", "b"]}, "one prompt"),
    ("token out of range", {"model": "base", "prompt": [1, 999]}, "token id out of range"),
]


@pytest.mark.parametrize("body, message", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_request_is_a_400_and_the_server_keeps_serving(server, body, message):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(
        server.url + "/v1/completions", content=content, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert message in error["message"], error["message"]
    assert "\n" not in error["message"]
    assert (
        client(server).completions.create(model="base", prompt="ok", max_tokens=2).usage.completion_tokens
        == 2
    )


BAD_CHAT = [
    ("no messages", {"model": "base"}, "'messages' is required"),
    ("empty messages", {"model": "base", "messages": []}, "non-empty array"),
    ("bad role", {"model": "base", "messages": [{"role": "robot", "content": "x"}]}, "role' must be one of"),
    (
        "image part",
        {"model": "base", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        "text parts",
    ),
    (
        "template refuses",
        {"model": "base", "messages": [{"role": "tool", "content": "x"}]},
        "chat template refused",
    ),
    ("tools", {"model": "base", "messages": [{"role": "user", "content": "x"}], "tools": [{}]}, "tools"),
]


@pytest.mark.parametrize("body, message", [b[1:] for b in BAD_CHAT], ids=[b[0] for b in BAD_CHAT])
def test_bad_chat_request_is_a_400(server, body, message):
    response = httpx.post(server.url + "/v1/chat/completions", json=body)
    assert response.status_code == 400 and message in response.json()["error"]["message"]


def test_unknown_endpoint_and_method(server):
    response = httpx.get(server.url + "/v1/nothing")
    assert response.status_code == 404 and "no such endpoint" in response.json()["error"]["message"]
    assert httpx.get(server.url + "/v1/completions").status_code == 405


def test_context_overflow(engine):
    engine.model = type("M", (), {"config": type("C", (), {"max_position_embeddings": 12})()})()
    with serving(engine) as server:
        response = httpx.post(
            server.url + "/v1/completions", json={"model": "base", "prompt": "x" * 8, "max_tokens": 5}
        )
        assert (
            response.status_code == 400
            and "exceed this model's context of 12" in response.json()["error"]["message"]
        )
        # without max_tokens the default (32) is shortened to what the context leaves
        out = client(server).completions.create(model="base", prompt="x" * 8, temperature=0)
        assert out.usage.completion_tokens == 4


def test_api_key(engine, monkeypatch):
    with serving(engine, api_key="s3cret") as server:
        for path in ("/v1/models", "/v1/completions"):
            response = (
                httpx.post(server.url + path, json={}) if "compl" in path else httpx.get(server.url + path)
            )
            assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            client(server, key="wrong").models.list()
        with pytest.raises(openai.AuthenticationError):
            client(server, key="wrong").completions.create(model="base", prompt="x", stream=True)
        assert client(server, key="s3cret").completions.create(model="base", prompt="x", max_tokens=2).choices


def test_admin_off_by_default(server, tmp_path):
    (tmp_path / "new").mkdir()
    response = httpx.post(server.url + "/v1/adapters", json={"name": "new", "path": str(tmp_path / "new")})
    assert response.status_code == 403 and "--enable-admin" in response.json()["error"]["message"]
    assert httpx.delete(server.url + "/v1/adapters/arith").status_code == 403
    assert [m.id for m in client(server).models.list()] == ["base", "arith", "code", "auto"]


def test_admin_load_and_unload(engine, tmp_path):
    (tmp_path / "new").mkdir()
    with serving(engine, enable_admin=True) as server:
        url = server.url + "/v1/adapters"
        response = httpx.post(url, json={"name": "new", "path": str(tmp_path / "new")})
        assert response.status_code == 201 and response.json()["id"] == "new"
        assert "new" in [m.id for m in client(server).models.list()]
        out = client(server).completions.create(model="new", prompt="q", max_tokens=3, temperature=0)
        assert out.choices[0].text == text_of(expected_tokens(FakeTokenizer()("q")["input_ids"], "new", 3))
        assert httpx.post(url, json={"name": "new", "path": str(tmp_path / "new")}).status_code == 409
        for body, message in [
            ({"name": "x", "path": str(tmp_path / "missing")}, "no such directory"),
            ({"name": "auto", "path": str(tmp_path)}, "reserved"),
            ({"name": 3, "path": str(tmp_path)}, "'name' must be"),
        ]:
            response = httpx.post(url, json=body)
            assert response.status_code == 400 and message in response.json()["error"]["message"]
        assert httpx.delete(url + "/new").json() == {"id": "new", "object": "model", "deleted": True}
        assert httpx.delete(url + "/new").status_code == 404
        assert "new" not in [m.id for m in client(server).models.list()]
        with pytest.raises(openai.BadRequestError):
            client(server).completions.create(model="new", prompt="q")


def _wait_until(condition, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def test_a_client_leaving_mid_stream_frees_its_rows(tmp_path):
    engine = FakeEngine(step_s=0.01)
    with serving(engine) as server:
        body = {"model": "base", "prompt": "long", "max_tokens": 100000, "stream": True}
        with httpx.stream("POST", server.url + "/v1/completions", json=body) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
            assert engine.live == 1
        handle = engine.submitted[-1]
        assert _wait_until(lambda: handle.done)  # within a few steps, not after 100000 tokens
        assert handle.result().finish_reason == "cancelled" and engine.live == 0
        assert (
            client(server).completions.create(model="base", prompt="x", max_tokens=2).usage.completion_tokens
            == 2
        )


def test_a_client_leaving_before_the_answer_frees_its_rows():
    engine = FakeEngine(step_s=0.01)
    with serving(engine) as server:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                server.url + "/v1/completions",
                json={"model": "base", "prompt": "x", "max_tokens": 100000},
                timeout=0.3,
            )
        handle = engine.submitted[-1]
        assert _wait_until(lambda: handle.done)
        assert handle.result().finish_reason == "cancelled" and engine.live == 0


def test_concurrent_clients_get_their_own_tokens(server):
    from concurrent.futures import ThreadPoolExecutor

    def one(i):
        prompt = f"request {i}"
        adapter = (None, "arith", "code")[i % 3]
        out = client(server).completions.create(
            model=adapter or "base", prompt=prompt, max_tokens=5 + i % 4, temperature=0, stream=i % 2 == 0
        )
        text = "".join(c.choices[0].text for c in out) if i % 2 == 0 else out.choices[0].text
        return text == text_of(expected_tokens(FakeTokenizer()(prompt)["input_ids"], adapter, 5 + i % 4))

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(one, range(24)))


def test_other_accepted_shapes(server):
    """A batch of one prompt, chat content as text parts, ignored harmless fields."""
    want = text_of(expected_tokens(FakeTokenizer()("hi")["input_ids"], None, 3))
    for prompt in (["hi"], [[b + 1 for b in b"hi"]]):
        body = {"model": "base", "prompt": prompt, "max_tokens": 3, "temperature": 0, "user": "u", "n": 1}
        assert httpx.post(server.url + "/v1/completions", json=body).json()["choices"][0]["text"] == want
    parts = [{"type": "text", "text": "hel"}, {"type": "text", "text": "lo"}]
    body = {
        "model": "base",
        "messages": [{"role": "user", "content": parts}],
        "max_tokens": 3,
        "temperature": 0,
    }
    plain = dict(body, messages=[{"role": "user", "content": "hello"}])
    answer = httpx.post(server.url + "/v1/chat/completions", json=body).json()
    assert (
        answer["choices"][0]["message"]
        == httpx.post(server.url + "/v1/chat/completions", json=plain).json()["choices"][0]["message"]
    )
