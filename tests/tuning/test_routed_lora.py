"""Routed LoRA: the grouped LoRA math against a per-token reference, layer specs, the training
wrapper's balance loss, save/load round trips, refusals, and tune/eval through the CLI.

Tolerances: float64 layers against the per-token reference, rtol = atol = 1e-10; a saved and
reloaded adapter gives bit-identical logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.routed_lora import random_lora, reference_delta, write_random_lora
from safetensors.torch import load_file, save_file

from moe_runtime.cli import main
from moe_runtime.errors import AdapterError, UsageError
from moe_runtime.models import find_moe_layers, install
from moe_runtime.testing.random_models import build_random_model
from moe_runtime.tuning import apply_adapter
from moe_runtime.tuning.esft import ExpertSelection
from moe_runtime.tuning.routed_lora import (
    RoutedLoraSettings,
    balance_loss,
    parse_layer_spec,
    plan_layers,
    prepare_routed_lora,
    read_routed_lora,
)

VARIANT_SETTINGS = {
    "perft-r": dict(variant="perft-r", num_experts=5, top_k=2, rank=3),
    "perft-e": dict(variant="perft-e", rank=4),
    "esft-lora": dict(variant="esft-lora", experts=ExpertSelection({0: [1, 4, 6], 1: [2]})),
    "perft-s": dict(variant="perft-s", rank=2, alpha=3.0),
    "perft-d": dict(variant="perft-d", num_experts=3, layers="1"),
}


def _model(seed: int = 0, dtype=torch.float64):
    return build_random_model("qwen2_moe", seed=seed, dtype=dtype, experts_implementation="eager")


@pytest.mark.parametrize("variant", list(VARIANT_SETTINGS))
def test_grouped_layer_equals_per_token_reference(variant):
    model = _model()
    info = find_moe_layers(model)
    lora = random_lora(model, RoutedLoraSettings(**VARIANT_SETTINGS[variant]), seed=1)
    generator = torch.Generator().manual_seed(0)
    num_experts, top_k, hidden_size = (
        info.layers[0].num_experts,
        info.layers[0].top_k,
        info.layers[0].hidden_size,
    )
    hidden = torch.randn(23, hidden_size, generator=generator, dtype=torch.float64)
    top_k_index = torch.stack([torch.randperm(num_experts, generator=generator)[:top_k] for _ in range(23)])
    top_k_weights = torch.rand(23, top_k, generator=generator, dtype=torch.float64)
    for layer in lora.layers.values():
        delta, aux = layer(hidden, top_k_index, top_k_weights)
        expected = reference_delta(layer, hidden, top_k_index, top_k_weights)
        assert aux is None
        assert expected.abs().max() > 1e-3  # not vacuous: the term is non-zero
        torch.testing.assert_close(delta, expected, rtol=1e-10, atol=1e-10)
    if variant == "esft-lora":
        assert {k: layer.expert_ids for k, layer in lora.layers.items()} == {"0": [1, 4, 6], "1": [2]}


def test_zero_b_starts_at_the_base_model_and_only_lora_trains():
    model = _model()
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = model(ids).logits
    info = find_moe_layers(model)
    lora = prepare_routed_lora(model, info, RoutedLoraSettings(variant="perft-r"))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, base, rtol=0, atol=0)
    assert not any(p.requires_grad for p in model.parameters())
    assert all(p.requires_grad for p in lora.parameters())


def test_layer_specs():
    info = find_moe_layers(build_random_model("qwen2_moe", num_hidden_layers=6))
    assert parse_layer_spec("all", info) == dict.fromkeys(range(6))
    assert parse_layer_spec("all:2,3-5:8", info) == {0: 2, 1: 2, 2: 2, 3: 8, 4: 8, 5: 8}
    assert parse_layer_spec("1, 4", info) == {1: None, 4: None}
    for bad, match in [
        ("7", "not an MoE layer"),
        ("9-12", "no MoE layer"),
        ("all:0", "positive"),
        ("x", "expected all"),
        ("1,,2", "empty item"),
        ("all:two", "not an integer"),
    ]:
        with pytest.raises(UsageError, match=match):
            parse_layer_spec(bad, info)
    plans = plan_layers(RoutedLoraSettings(variant="perft-r", layers="all:2,4-5:6", num_experts=3), info)
    assert [(p.layer, p.num_lora) for p in plans] == [(0, 2), (1, 2), (2, 2), (3, 2), (4, 6), (5, 6)]
    with pytest.raises(UsageError, match="exceeds"):
        plan_layers(RoutedLoraSettings(variant="perft-r", layers="all:1"), info)
    with pytest.raises(UsageError, match="per-layer counts"):
        plan_layers(RoutedLoraSettings(variant="perft-e", layers="all:2"), info)
    with pytest.raises(UsageError, match="^top_k: does not apply to perft-d"):  # fields, not flags
        plan_layers(RoutedLoraSettings(variant="perft-d", top_k=2), info)
    with pytest.raises(UsageError, match="^experts: variant esft-lora needs"):
        plan_layers(RoutedLoraSettings(variant="esft-lora"), info)
    with pytest.raises(UsageError, match="out of range"):
        plan_layers(RoutedLoraSettings(variant="esft-lora", experts=ExpertSelection({0: [99]})), info)
    esft = plan_layers(
        RoutedLoraSettings(variant="esft-lora", layers="0-2", experts=ExpertSelection({1: [3], 4: [0, 1]})),
        info,
    )
    assert [(p.layer, p.expert_ids) for p in esft] == [(1, (3,))]


def test_balance_loss():
    uniform = torch.full((8, 4), 0.25)
    chosen = torch.tensor([[0, 1], [2, 3]] * 4)
    torch.testing.assert_close(balance_loss(uniform, chosen, None), torch.tensor(1.0))
    skewed = torch.tensor([[0.7, 0.1, 0.1, 0.1]] * 8)
    assert balance_loss(skewed, torch.tensor([[0, 1]] * 8), None) > 1.0
    mask = torch.tensor([True] * 4 + [False] * 4)
    mixed = torch.cat([uniform[:4], skewed[:4]])
    torch.testing.assert_close(balance_loss(mixed, chosen, mask), torch.tensor(1.0))


@pytest.mark.parametrize("variant", list(VARIANT_SETTINGS))
def test_save_load_round_trip_gives_identical_logits(tmp_path, variant):
    settings = RoutedLoraSettings(**VARIANT_SETTINGS[variant])
    model = _model(dtype=torch.float32)
    path = write_random_lora(model, tmp_path / "ad", settings, seed=2)
    meta = json.loads((path / "moe_runtime_adapter.json").read_text())
    assert meta["method"] == "routed_lora" and meta["routed_lora"]["variant"] == variant
    tensors = load_file(path / "adapter.safetensors")
    assert all(".routed_lora." in key for key in tensors)
    # the in-memory adapter attached to a base model vs the saved one loaded through eval's path
    ids = torch.randint(3, 100, (3, 10), generator=torch.Generator().manual_seed(1))
    original = random_lora(model, settings, seed=2)
    original.attach(model)
    with torch.no_grad():
        expected = model(ids).logits
        base = _model(dtype=torch.float32)(ids).logits
    loaded = apply_adapter(_model(dtype=torch.float32), path)
    with torch.no_grad():
        got = loaded(ids).logits
    assert torch.equal(got, expected)
    assert not torch.allclose(got, base, atol=1e-3)


def _saved(tmp_path: Path) -> Path:
    return write_random_lora(_model(dtype=torch.float32), tmp_path / "ad", RoutedLoraSettings(), seed=3)


@pytest.mark.parametrize(
    "case,expect",
    [
        ("other_base", "different base weights"),
        ("corrupt", "corrupt"),
        ("no_weights", "no adapter.safetensors"),
        ("misshaped", "shape"),
        ("missing", "missing"),
        ("extra", "not a tensor of this adapter"),
        ("nonfinite", "not finite"),
        ("bad_variant", "variant"),
        ("bad_layer", "not an MoE layer"),
    ],
)
def test_bad_adapters_are_refused(tmp_path, case, expect):
    path = _saved(tmp_path)
    weights, meta_file = path / "adapter.safetensors", path / "moe_runtime_adapter.json"
    tensors = load_file(weights)
    key = sorted(tensors)[0]
    meta = json.loads(meta_file.read_text())
    base = _model(dtype=torch.float32)
    if case == "other_base":
        base = _model(seed=5, dtype=torch.float32)
    elif case == "corrupt":
        weights.write_bytes(weights.read_bytes()[:100])
    elif case == "no_weights":
        weights.unlink()
    elif case == "misshaped":
        tensors[key] = tensors[key][:-1].clone()
    elif case == "missing":
        del tensors[key]
    elif case == "extra":
        tensors[key.replace("lora_A", "lora_C")] = tensors[key].clone()
    elif case == "nonfinite":
        tensors[key] = tensors[key].clone()
        tensors[key][0] = float("nan")
    elif case == "bad_variant":
        meta["routed_lora"]["variant"] = "perft-x"
    elif case == "bad_layer":
        meta["routed_lora"]["layers"]["7"] = {"num_lora": 4}
    if case in ("misshaped", "missing", "extra", "nonfinite"):
        save_file(tensors, str(weights))
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(AdapterError, match=expect):
        read_routed_lora(path).build(base, find_moe_layers(base))
    with pytest.raises(AdapterError, match=expect):
        apply_adapter(base, path)


# CLI ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def f32_checkpoint(tmp_path_factory) -> Path:
    from helpers.checkpoints import save_checkpoint

    return save_checkpoint(tmp_path_factory.mktemp("f32"), "qwen2_moe", dtype=torch.float32)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    rows = [{"prompt": f"{i} + {i + 1} =", "response": f" {2 * i + 1}"} for i in range(48)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cli(*args) -> int:
    return main([str(a) for a in args])


def _eval(capsys, model, data, *extra) -> dict:
    capsys.readouterr()
    result = Path(data).with_name(f"eval-{len(list(Path(data).parent.glob('eval-*.json')))}.json")
    assert _cli("eval", "--model", model, "--data", data, "--no-exact-match", "--json", result, *extra) == 0
    return json.loads(result.read_text())


@pytest.mark.parametrize(
    "extra",
    [
        ["--variant", "perft-r", "--layers", "all:2,1:4"],
        ["--variant", "perft-e", "--lora-rank", "4"],
    ],
)
def test_cli_tune_then_eval_lowers_loss(capsys, tmp_path, f32_checkpoint, data, extra):
    common = ["--steps", "8", "--lr", "1e-2", "--batch-size", "8"]
    assert (
        _cli(
            "tune",
            "--model",
            f32_checkpoint,
            "--data",
            data,
            "--method",
            "routed-lora",
            "--out",
            tmp_path / "ad",
            *common,
            *extra,
        )
        == 0
    )
    meta = json.loads((tmp_path / "ad" / "moe_runtime_adapter.json").read_text())
    assert meta["method"] == "routed_lora" and meta["base_fingerprint"].startswith("sha256:")
    if extra[1] == "perft-r":
        assert meta["routed_lora"]["layers"] == {"0": {"num_lora": 2}, "1": {"num_lora": 4}}
    base = _eval(capsys, f32_checkpoint, data)
    tuned = _eval(capsys, f32_checkpoint, data, "--adapter", tmp_path / "ad")
    assert tuned["loss"] < base["loss"]


@pytest.mark.parametrize(
    "extra,expect",
    [
        (["--variant", "esft-lora"], "--experts: variant esft-lora needs an expert_cfg.json"),
        (["--variant", "perft-e", "--lora-experts", "3"], "--lora-experts"),
        (["--layers", "all:1"], "exceeds"),
        (["--layers", "5"], "not an MoE layer"),
        (["--lora-rank", "0"], "--lora-rank"),
        (["--method", "lora", "--variant", "perft-e"], "--variant goes with --method routed-lora, not lora"),
    ],
)
def test_cli_bad_routed_lora_input_exit_2(capsys, tmp_path, f32_checkpoint, data, extra, expect):
    capsys.readouterr()
    code = _cli(
        "tune",
        "--model",
        f32_checkpoint,
        "--data",
        data,
        "--method",
        "routed-lora",
        "--out",
        tmp_path / "ad",
        *extra,
    )
    err = capsys.readouterr().err
    assert code == 2 and expect in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "ad").exists()


def test_install_is_kept_for_other_plugins():
    model = _model()
    info = install(model)
    lora = prepare_routed_lora(model, info, RoutedLoraSettings(variant="perft-s"))
    lora.detach()
    assert all(layer.experts.__dict__["_moe_runtime_state"].executor is None for layer in info.layers)


def test_cli_resume_gives_the_uninterrupted_adapter(tmp_path, f32_checkpoint, data):
    import shutil

    common = ["--method", "routed-lora", "--steps", "6", "--lr", "1e-2", "--batch-size", "8", "--seed", "3"]
    assert (
        _cli("tune", "--model", f32_checkpoint, "--data", data, "--out", tmp_path / "straight", *common) == 0
    )
    resumed = ["tune", "--model", f32_checkpoint, "--data", data, "--out", tmp_path / "resumed", *common]
    assert _cli(*resumed, "--save-steps", "3") == 0
    checkpoints = sorted((tmp_path / "resumed.checkpoints").glob("checkpoint-*"))
    assert [c.name for c in checkpoints] == ["checkpoint-3", "checkpoint-6"]
    shutil.rmtree(checkpoints[-1])  # as if interrupted after step 3
    shutil.rmtree(tmp_path / "resumed")
    assert _cli(*resumed, "--save-steps", "3", "--resume") == 0
    a = load_file(tmp_path / "straight" / "adapter.safetensors")
    b = load_file(tmp_path / "resumed" / "adapter.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.torchrun
def test_torchrun_two_processes_equal_one(tmp_path, f32_checkpoint, data):
    from helpers.torchrun import run_torchrun

    common = ["--method", "routed-lora", "--steps", "6", "--lr", "1e-2", "--batch-size", "8", "--seed", "1"]
    common += ["--aux-loss-coef", "0", "--lora-aux-loss-coef", "0", "--dtype", "float64"]
    assert _cli("tune", "--model", f32_checkpoint, "--data", data, "--out", tmp_path / "one", *common) == 0
    result = run_torchrun(
        ["tune", "--model", f32_checkpoint, "--data", data, "--out", tmp_path / "two", *common]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    a = load_file(tmp_path / "one" / "adapter.safetensors")
    b = load_file(tmp_path / "two" / "adapter.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-9, atol=1e-10)
