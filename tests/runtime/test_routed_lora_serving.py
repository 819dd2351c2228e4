"""Routed-LoRA adapters served in mixed batches with ESFT adapters and the base model.

Every request of a mixed batch (base + an ESFT adapter + routed-LoRA adapters of four variants,
different prompt lengths and limits) must give the tokens it gets served alone, and tokens and
logits equal to a reference computed without the runtime: plain ``transformers`` ``generate`` on a
fresh base model whose experts run the stock implementation plus a per-token, per-pair pure-PyTorch
loop of the LoRA math (ESFT requests: the adapter merged into a fresh base model).

Tolerance for logits (float32): atol = rtol = 1e-4; generated tokens must be identical.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.routed_lora import attach_reference, write_random_lora
from helpers.serving import greedy_reference, make_adapter, merged_copy

from moe_runtime.errors import AdapterError  # noqa: E402
from moe_runtime.models import find_moe_layers  # noqa: E402
from moe_runtime.runtime import DecodeConfig, MultiAdapterEngine, Request  # noqa: E402
from moe_runtime.testing.random_models import build_random_model  # noqa: E402
from moe_runtime.tuning.esft import ExpertSelection  # noqa: E402
from moe_runtime.tuning.routed_lora import RoutedLoraSettings, read_routed_lora  # noqa: E402

TOL = {"atol": 1e-4, "rtol": 1e-4}
FAMILIES = ["qwen2_moe", "deepseek_v2"]
LORAS = {
    "r": RoutedLoraSettings(variant="perft-r", num_experts=4, top_k=2, rank=4),
    "e": RoutedLoraSettings(variant="perft-e", rank=4),
    "d": RoutedLoraSettings(variant="perft-d", num_experts=2, rank=4),
}
# (prompt length, adapter, max_new_tokens)
PLAN = [
    (5, None, 6),
    (9, "r", 4),
    (3, "esft", 7),
    (12, "e", 5),
    (7, "r", 6),
    (1, "d", 3),
    (10, "e", 2),
    (4, "d", 5),
    (6, "s", 4),
]


class Served:
    def __init__(self, family: str, root: Path) -> None:
        self.build = lambda: build_random_model(family, seed=0)
        self.model = self.build()
        info = find_moe_layers(self.model)
        self.dirs = {
            "esft": make_adapter(
                self.model, root / "esft", {info.layer_indices[-1]: [0, 2]}, seed=0, scale=1.0
            )
        }
        esft_lora = RoutedLoraSettings(
            variant="esft-lora", rank=4, experts=ExpertSelection({info.layer_indices[-1]: [0, 1, 3]})
        )
        for i, (name, settings) in enumerate({**LORAS, "s": esft_lora}.items()):
            self.dirs[name] = write_random_lora(self.model, root / name, settings, seed=10 + i)
        self.engine = MultiAdapterEngine(self.model)
        for name, path in self.dirs.items():
            self.engine.add_adapter(name, path)
        vocab = self.model.config.get_text_config().vocab_size
        generator = torch.Generator().manual_seed(7)
        self.requests = [
            Request(torch.randint(3, vocab, (n,), generator=generator).tolist(), adapter, limit, id=i)
            for i, (n, adapter, limit) in enumerate(PLAN)
        ]
        self._references: dict = {}

    def reference_model(self, adapter: str | None):
        if adapter is None or adapter == "esft":
            return merged_copy(self.build, self.dirs[adapter] if adapter else None)
        model = self.build()
        lora = read_routed_lora(self.dirs[adapter]).build(model, find_moe_layers(model))
        return attach_reference(model, lora).eval()

    def reference(self, request: Request):
        """Plain transformers generate, the request alone, LoRA math as a per-token loop."""
        if request.adapter not in self._references:
            self._references[request.adapter] = self.reference_model(request.adapter)
        return greedy_reference(self._references[request.adapter], request)


@pytest.fixture(scope="module", params=FAMILIES)
def served(request, tmp_path_factory) -> Served:
    return Served(request.param, tmp_path_factory.mktemp(request.param))


def test_mixed_batch_equals_alone_and_reference(served):
    engine = served.engine
    mixed = engine.generate(served.requests, DecodeConfig(output_logits=True))
    differs_from_base = 0
    for request, completion in zip(served.requests, mixed):
        alone = engine.generate([request], DecodeConfig(output_logits=True))[0]
        assert completion.token_ids == alone.token_ids, request.id
        torch.testing.assert_close(completion.logits, alone.logits, **TOL)
        tokens, logits = served.reference(request)
        assert completion.token_ids == tokens, request.id
        torch.testing.assert_close(completion.logits, logits, **TOL)
        if request.adapter is not None:
            base = served.reference(Request(request.prompt, None, request.max_new_tokens))[1]
            differs_from_base += not torch.allclose(base[:1], logits[:1], atol=1e-3)
    assert differs_from_base >= 6  # the adapters do change the outputs: the test is not vacuous


def test_prompt_logits_equal_reference_forward(served):
    logits = served.engine.prompt_logits(served.requests)
    for request, got in zip(served.requests, logits):
        if request.adapter not in served._references:
            served._references[request.adapter] = served.reference_model(request.adapter)
        with torch.no_grad():
            expected = served._references[request.adapter](torch.tensor([request.prompt])).logits[0]
        torch.testing.assert_close(got, expected, **TOL)


def test_remove_and_reload_routed_lora(served, tmp_path):
    engine = served.engine
    request = next(r for r in served.requests if r.adapter == "r")
    before = engine.generate([request])[0].token_ids
    engine.remove_adapter("r")
    assert "r" not in engine.adapters and not any(a is None for a in engine.executor.terms.values())
    with pytest.raises(AdapterError, match="not loaded"):
        engine.submit(Request(request.prompt, adapter="r"))
    engine.add_adapter("r", served.dirs["r"])
    assert engine.generate([request])[0].token_ids == before
    with pytest.raises(AdapterError, match="already loaded"):
        engine.add_adapter("r", served.dirs["r"])


def test_routed_lora_of_another_base_is_refused(served, tmp_path):
    other = build_random_model("qwen2_moe", seed=3)
    path = write_random_lora(other, tmp_path / "other", LORAS["r"], seed=1)
    with pytest.raises(AdapterError, match="different base weights"):
        served.engine.add_adapter("other", path)
    assert "other" not in served.engine.adapters


def test_generate_cli_serves_routed_lora(tmp_path, moe_checkpoint):
    import json

    from moe_runtime.cli import main
    from moe_runtime.models import load_model

    model = load_model(moe_checkpoint)
    adapter = write_random_lora(model, tmp_path / "rl", LORAS["r"], seed=4, b_std=0.3)
    rows = [
        {"id": i, "prompt": p, "adapter": a}
        for i, (p, a) in enumerate([("the quick", "r"), ("the quick", None)])
    ]
    (tmp_path / "req.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = [
        "generate",
        "--model",
        moe_checkpoint,
        "--adapter",
        f"r={adapter}",
        "--requests",
        tmp_path / "req.jsonl",
    ]
    assert main([str(a) for a in [*args, "--output", tmp_path / "out.jsonl", "--max-new-tokens", "6"]]) == 0
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    engine = MultiAdapterEngine.from_pretrained(moe_checkpoint)
    engine.add_adapter("r", adapter)
    expected = engine.generate([Request("the quick", "r", 6), Request("the quick", None, 6)])
    assert [row["token_ids"] for row in out] == [c.token_ids for c in expected]
    assert out[0]["token_ids"] != out[1]["token_ids"]
