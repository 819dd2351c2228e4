"""MoLA and DynMoLE adapters served in mixed batches beside ESFT, perft-r and the base model.

Every request of the mixed batch must get the tokens it gets served alone, and tokens and logits
equal to a reference without the runtime: plain ``transformers`` ``generate`` on a fresh base model
whose experts run the stock implementation plus a per-token, per-pair pure-Python loop of the LoRA
math and of the variant's routing (ESFT: the adapter merged into a fresh base model).

Tolerance for logits (float32 model, float64 reference terms): atol = rtol = 1e-4; tokens identical.
"""

from __future__ import annotations

import pytest
import torch
from helpers.routed_lora import write_random_lora
from helpers.serving import greedy_reference, make_adapter, merged_copy
from helpers.variant_reference import attach_routed_reference, hybrid_reference, topk_reference

from moe_runtime.models import find_moe_layers
from moe_runtime.runtime import DecodeConfig, MultiAdapterEngine, Request
from moe_runtime.testing import build_random_model
from moe_runtime.tuning.dynmole import DynMoLEOptions
from moe_runtime.tuning.mola import MoLAOptions
from moe_runtime.tuning.routed_lora import RoutedLoraSettings, read_routed_lora

TOL = {"atol": 1e-4, "rtol": 1e-4}
DYNMOLE = DynMoLEOptions(tsallis_q=1.5, entropy_threshold=0.6, top_p=0.7)
LORAS = {
    "r": RoutedLoraSettings(variant="perft-r", num_experts=4, top_k=2, rank=4),
    "mola": RoutedLoraSettings(variant="mola", rank=4, options=MoLAOptions("2,6")),
    "dyn": RoutedLoraSettings(variant="dynmole", rank=4, num_experts=4, options=DYNMOLE),
}
ROUTES = {
    "r": lambda probs: topk_reference(probs, 2),
    "mola": lambda probs: topk_reference(probs, 2),
    "dyn": lambda probs: hybrid_reference(probs, 1.5, 0.6, 0.7, 1),
}
PLAN = [
    (5, None, 5),
    (9, "mola", 4),
    (3, "esft", 6),
    (12, "dyn", 5),
    (7, "r", 4),
    (2, "mola", 3),
    (8, "dyn", 2),
]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("variants")
    build = lambda: build_random_model("qwen2_moe", seed=0)  # noqa: E731
    model = build()
    info = find_moe_layers(model)
    dirs = {"esft": make_adapter(model, root / "esft", {info.layer_indices[-1]: [0, 2]}, seed=0, scale=1.0)}
    for i, (name, settings) in enumerate(LORAS.items()):
        dirs[name] = write_random_lora(model, root / name, settings, seed=20 + i, b_std=0.3)
    engine = MultiAdapterEngine(model)
    for name, path in dirs.items():
        engine.add_adapter(name, path)
    vocab = model.config.get_text_config().vocab_size
    generator = torch.Generator().manual_seed(3)
    requests = [
        Request(torch.randint(3, vocab, (n,), generator=generator).tolist(), adapter, limit, id=i)
        for i, (n, adapter, limit) in enumerate(PLAN)
    ]
    return build, dirs, engine, requests


def _reference(build, dirs, request: Request):
    if request.adapter in (None, "esft"):
        model = merged_copy(build, dirs[request.adapter] if request.adapter else None)
    else:
        model = build()
        lora = read_routed_lora(dirs[request.adapter]).build(model, find_moe_layers(model))
        attach_routed_reference(model, lora, ROUTES[request.adapter])
    return greedy_reference(model.eval(), request)


def test_mixed_batch_equals_alone_and_reference(served):
    build, dirs, engine, requests = served
    mixed = engine.generate(requests, DecodeConfig(output_logits=True))
    changed = 0
    for request, completion in zip(requests, mixed):
        alone = engine.generate([request], DecodeConfig(output_logits=True))[0]
        assert completion.token_ids == alone.token_ids, request.id
        torch.testing.assert_close(completion.logits, alone.logits, **TOL)
        tokens, logits = _reference(build, dirs, request)
        assert completion.token_ids == tokens, request.id
        torch.testing.assert_close(completion.logits, logits, **TOL)
        if request.adapter is not None:
            base = _reference(build, dirs, Request(request.prompt, None, 1))[1]
            changed += not torch.allclose(base[:1], logits[:1], atol=1e-3)
    assert changed >= 5  # the adapters change the outputs: the comparison is not vacuous


def test_mola_layers_hold_their_own_counts(served):
    _, dirs, _, _ = served
    meta = read_routed_lora(dirs["mola"]).meta["routed_lora"]
    assert meta["layers"] == {"0": {"num_lora": 2}, "1": {"num_lora": 6}}
