"""peft LoRA adapters (LoRA on q/o projections and on the fused expert parameters, with
rank_pattern / alpha_pattern) serve in one mixed batch beside an ESFT adapter, a routed-LoRA
adapter and base rows. Each peft row equals peft's own model with that adapter active
(``set_adapter``), run alone, on the embedded demo model and random models of 4 families: identical greedy tokens, per-step logits within atol/rtol 1e-4
(float32; the engine sums experts in another order than peft's parametrized forward).
"""

from __future__ import annotations

import pytest
import torch
from helpers.peft_adapters import write_peft_adapter
from helpers.routed_lora import write_random_lora
from helpers.serving import greedy_reference, make_adapter, merged_copy

from moe_runtime.errors import AdapterError
from moe_runtime.models import find_moe_layers, load_model
from moe_runtime.runtime import DecodeConfig, MultiAdapterEngine, Request
from moe_runtime.testing import build_random_model
from moe_runtime.tuning.routed_lora import RoutedLoraSettings

TOL = {"atol": 1e-4, "rtol": 1e-4}
FAMILIES = ["demo", "olmoe", "qwen2_moe", "mixtral", "deepseek_v2"]  # demo: the embedded model
# (prompt length, adapter, max_new_tokens)
PLAN = [
    (6, "p1", 5),
    (4, None, 4),
    (9, "p2", 6),
    (3, "esft", 4),
    (7, "p1", 3),
    (5, "routed", 4),
    (2, "p2", 5),
]
PEFT = {"p1": {"rank": 4, "ours": False}, "p2": {"rank": 2, "ours": True}}


@pytest.fixture(scope="module", params=FAMILIES)
def served(request, tmp_path_factory):
    family = request.param
    root = tmp_path_factory.mktemp(family)

    def build():
        return (
            load_model("demo", dtype=torch.float32)
            if family == "demo"
            else build_random_model(family, seed=4)
        )

    model = build()
    info = find_moe_layers(model)
    dirs = {
        name: write_peft_adapter(
            build,
            root / name,
            seed=i,
            rank=spec["rank"],
            ours=spec["ours"],
            rank_pattern={f"layers.{info.layer_indices[-1]}.self_attn.q_proj": 3},
        )
        for i, (name, spec) in enumerate(PEFT.items())
    }
    dirs["esft"] = make_adapter(model, root / "esft", {info.layer_indices[0]: [1, 5]}, seed=7, info=info)
    dirs["routed"] = write_random_lora(
        model, root / "routed", RoutedLoraSettings(variant="perft-r", rank=4), seed=8
    )
    engine = MultiAdapterEngine(model)
    for name, path in dirs.items():
        engine.add_adapter(name, path)
    vocab = model.config.get_text_config().vocab_size
    generator = torch.Generator().manual_seed(11)
    requests = [
        Request(torch.randint(3, vocab, (n,), generator=generator).tolist(), adapter, limit, id=i)
        for i, (n, adapter, limit) in enumerate(PLAN)
    ]
    completions = engine.generate(requests, DecodeConfig(output_logits=True))
    return build, dirs, engine, requests, completions


def _peft_reference(build, dirs):
    """peft's own model holding both peft adapters (one active at a time)."""
    from peft import PeftModel

    names = list(PEFT)
    peft_model = PeftModel.from_pretrained(build(), str(dirs[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        peft_model.load_adapter(str(dirs[name]), adapter_name=name)
    return peft_model.eval()


def _generate(model, request: Request):
    return greedy_reference(model, request)


def test_peft_rows_of_a_mixed_batch_equal_peft_with_that_adapter_active(served):
    build, dirs, engine, requests, completions = served
    peft_model = _peft_reference(build, dirs)
    checked = 0
    for request, completion in zip(requests, completions):
        if request.adapter not in PEFT:
            continue
        peft_model.set_adapter(request.adapter)
        tokens, logits = _generate(peft_model, request)
        assert completion.token_ids == tokens, request.id
        torch.testing.assert_close(completion.logits, logits, **TOL)
        checked += 1
    assert checked == sum(1 for _, adapter, _ in PLAN if adapter in PEFT)
    with peft_model.disable_adapter():  # the adapters matter: without them peft gives other logits
        _, base_logits = _generate(peft_model, requests[0])
    assert (base_logits - completions[0].logits).abs().max() > 1e-2


def test_other_rows_of_the_batch_are_unchanged_by_the_peft_rows(served):
    build, dirs, engine, requests, completions = served
    for request, completion in zip(requests, completions):
        if request.adapter in (None, "esft"):
            reference = merged_copy(build, dirs[request.adapter] if request.adapter else None)
            tokens, logits = _generate(reference, request)
            assert completion.token_ids == tokens
            torch.testing.assert_close(completion.logits, logits, **TOL)
        elif request.adapter == "routed":  # alone in its batch, as served beside the others
            alone = engine.generate([request], DecodeConfig(output_logits=True))[0]
            assert completion.token_ids == alone.token_ids
            torch.testing.assert_close(completion.logits, alone.logits, **TOL)


def test_removing_a_peft_adapter_restores_the_model(served):
    build, dirs, engine, requests, completions = served
    engine.remove_adapter("p1")
    engine.remove_adapter("p2")
    assert engine.linear_terms.terms == {} and not engine.linear_terms._hooks
    base_request = requests[1]
    again = engine.generate([base_request], DecodeConfig(output_logits=True))[0]
    torch.testing.assert_close(again.logits, completions[1].logits, **TOL)
    for name in PEFT:
        engine.add_adapter(name, dirs[name])


@pytest.mark.parametrize(
    ("change", "expected"),
    [({"bias": "all"}, "bias: 'all' is not supported"), ({"use_dora": True}, "DoRA is not supported"),
     ({"auto_mapping": {"base_model_class": "LlamaForCausalLM"}}, "base_model_class LlamaForCausalLM")],
)  # fmt: skip
def test_unsupported_or_foreign_peft_adapters_are_refused(tmp_path, served, change, expected):
    import json

    _, dirs, engine, _, _ = served
    bad = tmp_path / "bad"
    bad.mkdir()
    for file in dirs["p1"].iterdir():
        (bad / file.name).write_bytes(file.read_bytes())
    config = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**config, **change}))
    loaded = list(engine.adapters)
    with pytest.raises(AdapterError, match=expected):
        engine.add_adapter("bad", bad)
    assert engine.adapters == loaded
