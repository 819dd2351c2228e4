"""MoLA and DynMoLE, routed-LoRA variants each added by its own folder: flags, per-layer plans,
routing math against a per-token pure-Python reference, and bad input through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.checkpoints import save_checkpoint
from helpers.variant_reference import hybrid_reference, tsallis_reference

from moe_runtime.cli import main
from moe_runtime.tuning.dynmole import DynMoLEOptions, HybridRouting, tsallis_entropy
from moe_runtime.tuning.mola import MoLAOptions, layer_counts
from moe_runtime.tuning.registry import ConfigError
from moe_runtime.tuning.routed_lora import RoutedLoraSettings, plan_layers


def test_mola_counts_from_lists_and_schedules():
    assert layer_counts("2,2,4,4,8,8", 6) == [2, 2, 4, 4, 8, 8]
    assert layer_counts("inverted-triangle", 6) == [2, 2, 4, 6, 6, 8]
    assert layer_counts("inverted-triangle", 4) == [2, 4, 6, 8]
    assert layer_counts("triangle", 8) == [8, 8, 6, 6, 4, 4, 2, 2]
    for bad, message in [("2,x", "expected counts"), ("2,0", "positive"), ("2,4,8", "3 counts")]:
        with pytest.raises(ConfigError, match=message):
            layer_counts(bad, 2)


def test_mola_plan_gives_each_layer_its_count():
    from moe_runtime.models import find_moe_layers
    from moe_runtime.testing import build_random_model

    info = find_moe_layers(build_random_model("qwen2_moe", seed=0))
    settings = RoutedLoraSettings(variant="mola", options=MoLAOptions("2,4"))
    assert [(p.layer, p.num_lora) for p in plan_layers(settings, info)] == [(0, 2), (1, 4)]
    settings = RoutedLoraSettings(variant="mola", options=MoLAOptions("2,4"), layers="all,1:3")
    assert [(p.layer, p.num_lora) for p in plan_layers(settings, info)] == [(0, 2), (1, 3)]  # --layers wins
    with pytest.raises(ConfigError, match="exceeds"):
        plan_layers(RoutedLoraSettings(variant="mola", options=MoLAOptions("1,4")), info)  # top-2 > 1


def test_dynmole_routing_matches_per_token_reference():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 6, generator=generator, dtype=torch.float64) * 3
    logits[::4] *= 0.05  # near-uniform rows: these go to soft routing
    probs = torch.softmax(logits, dim=-1)
    options = DynMoLEOptions(tsallis_q=1.5, entropy_threshold=0.9, top_p=0.6, entropy_loss_coef=0.3)
    weights, chosen, aux = HybridRouting(options, min_experts=2, aux_loss_coef=0.5)(probs, None, True)
    soft = 0
    for t in range(probs.shape[0]):
        row = probs[t].tolist()
        expected = hybrid_reference(row, 1.5, 0.9, 0.6, 2)
        got = {int(e): float(w) for e, w in zip(chosen[t], weights[t]) if int(e) < 6}
        assert got.keys() == expected.keys(), t
        for e, w in expected.items():
            assert got[e] == pytest.approx(w, rel=1e-9, abs=1e-12)
        soft += len(expected) == 6
        assert tsallis_entropy(probs[t : t + 1], 1.5).item() == pytest.approx(tsallis_reference(row, 1.5))
    assert 0 < soft < probs.shape[0]  # both branches ran
    # auxiliary loss: balance over the experts actually chosen + entropy term
    share = [0.0] * 6
    for t in range(probs.shape[0]):
        for e in hybrid_reference(probs[t].tolist(), 1.5, 0.9, 0.6, 2):
            share[e] += 1
    total = sum(share)
    mean_p = probs.mean(dim=0).tolist()
    balance = 6 * sum(s / total * p for s, p in zip(share, mean_p))
    entropy = sum(tsallis_reference(probs[t].tolist(), 1.5) for t in range(64)) / 64
    assert aux.item() == pytest.approx(0.5 * balance + 0.3 * entropy, rel=1e-9)


def test_dynmole_options_are_validated():
    for field, options in [
        ("tsallis_q", DynMoLEOptions(tsallis_q=1.0)),
        ("entropy_threshold", DynMoLEOptions(entropy_threshold=1.5)),
        ("top_p", DynMoLEOptions(top_p=0.0)),
        ("entropy_loss_coef", DynMoLEOptions(entropy_loss_coef=-1.0)),
    ]:
        with pytest.raises(ConfigError) as raised:
            RoutedLoraSettings(variant="dynmole", options=options).validate()
        assert raised.value.field == field


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("f32"), "qwen2_moe", dtype=torch.float32)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text(
        "".join(json.dumps({"prompt": f"{i} + 1 =", "response": f" {i + 1}"}) + "\n" for i in range(8))
    )
    return path


def _tune(capsys, checkpoint, data, out, *extra) -> tuple[int, str]:
    capsys.readouterr()
    argv = ["tune", "--model", checkpoint, "--data", data, "--method", "routed-lora", "--out", out]
    code = main([str(a) for a in [*argv, "--steps", 1, "--batch-size", 4, *extra]])
    return code, capsys.readouterr().err


def test_cli_records_the_variants_and_their_options(capsys, tmp_path, checkpoint, data):
    code, err = _tune(
        capsys, checkpoint, data, tmp_path / "m", "--variant", "mola", "--experts-per-layer", "2,4"
    )
    assert code == 0, err
    meta = json.loads((tmp_path / "m" / "moe_runtime_adapter.json").read_text())["routed_lora"]
    assert meta["variant"] == "mola" and meta["options"] == {"experts_per_layer": "2,4"}
    assert meta["layers"] == {"0": {"num_lora": 2}, "1": {"num_lora": 4}}
    extra = ["--variant", "dynmole", "--tsallis-q", "2", "--lora-top-p", "0.5", "--lora-experts", "3"]
    code, err = _tune(capsys, checkpoint, data, tmp_path / "d", *extra)
    assert code == 0, err
    meta = json.loads((tmp_path / "d" / "moe_runtime_adapter.json").read_text())["routed_lora"]
    assert meta["variant"] == "dynmole" and meta["top_k"] == 1
    assert meta["options"]["tsallis_q"] == 2.0 and meta["options"]["top_p"] == 0.5
    assert meta["layers"] == {"0": {"num_lora": 3}, "1": {"num_lora": 3}}


@pytest.mark.parametrize(
    "extra,expect",
    [
        (["--variant", "mola", "--experts-per-layer", "2,2,2"], "--experts-per-layer '2,2,2': 3 counts"),
        (["--variant", "mola", "--experts-per-layer", "big"], "--experts-per-layer 'big': expected counts"),
        (["--variant", "mola", "--lora-experts", "3"], "--lora-experts: does not apply to mola"),
        (
            ["--variant", "perft-r", "--experts-per-layer", "2,4"],
            "--experts-per-layer: goes with another variant",
        ),
        (["--variant", "dynmole", "--tsallis-q", "1"], "--tsallis-q: must be a positive finite number"),
        (["--variant", "dynmole", "--lora-top-p", "1.5"], "--lora-top-p: must lie in (0, 1]"),
    ],
)
def test_cli_bad_variant_flags_exit_2(capsys, tmp_path, checkpoint, data, extra, expect):
    code, err = _tune(capsys, checkpoint, data, tmp_path / "ad", *extra)
    assert code == 2 and expect in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "ad").exists()
