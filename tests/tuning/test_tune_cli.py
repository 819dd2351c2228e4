"""``tune`` and ``eval`` through the CLI: methods, resume, torchrun, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.torchrun import run_torchrun
from safetensors.torch import load_file

from moe_runtime.cli import main


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


@pytest.fixture(scope="module")
def experts_cfg(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "expert_cfg.json"
    path.write_text(
        json.dumps({"experts": {"0": [1, 4], "1": [2]}, "shared_experts": False, "non_expert_modules": False})
    )
    return path


def _tune_args(model, data, out, *extra) -> list[str]:
    args = [
        "tune",
        "--model",
        model,
        "--data",
        data,
        "--out",
        out,
        "--steps",
        "6",
        "--lr",
        "1e-2",
        "--batch-size",
        "8",
    ]
    return [str(a) for a in [*args, *extra]]


def _tune(model, data, out, *extra) -> int:
    return main(_tune_args(model, data, out, *extra))


def _eval(capsys, model, data, *extra) -> dict:
    result = Path(data).with_name(f"eval-{len(list(Path(data).parent.glob('eval-*.json')))}.json")
    argv = ["eval", "--model", model, "--data", data, "--no-exact-match", "--json", result, *extra]
    result = Path(argv[len(argv) - 1 - argv[::-1].index("--json") + 1])  # the last --json wins
    assert main([str(a) for a in argv]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("loss ")  # one human line, no bare JSON
    return json.loads(result.read_text())


@pytest.mark.parametrize("method", ["esft", "lora", "full"])
def test_tune_then_eval_lowers_loss(capsys, tmp_path, f32_checkpoint, data, experts_cfg, method):
    extra = ["--method", method] + (["--experts", experts_cfg] if method == "esft" else [])
    assert _tune(f32_checkpoint, data, tmp_path / "ad", *extra) == 0
    meta = json.loads((tmp_path / "ad" / "moe_runtime_adapter.json").read_text())
    assert meta["method"] == method and meta["base_fingerprint"].startswith("sha256:")
    capsys.readouterr()
    base = _eval(capsys, f32_checkpoint, data)
    tuned = _eval(capsys, f32_checkpoint, data, "--adapter", tmp_path / "ad", "--json", tmp_path / "e.json")
    assert tuned["loss"] < base["loss"]
    assert json.loads((tmp_path / "e.json").read_text())["loss"] == tuned["loss"]
    assert not (tmp_path / "ad.checkpoints").exists()
    if method == "esft":  # the routing profile 'auto' serving matches prompts against: the profiler's own
        from moe_runtime.data import read_examples
        from moe_runtime.models import find_moe_layers, load_model, load_tokenizer
        from moe_runtime.profiler import ProfileConfig, profile_model
        from moe_runtime.runtime.profiles import RoutingProfile, load_routing_profile

        stored = load_routing_profile(tmp_path / "ad")
        model = load_model(f32_checkpoint)
        stored.check(find_moe_layers(model))
        config = ProfileConfig(max_tokens=4096, max_length=512, progress=False)
        meta, profiles = profile_model(
            model, load_tokenizer(f32_checkpoint), {"t": read_examples(data)}, config
        )
        expected = RoutingProfile.from_counts(meta.layers, profiles["t"].counts)
        assert stored.layers == expected.layers and stored.tokens == profiles["t"].tokens
        np.testing.assert_allclose(stored.frequencies, expected.frequencies, atol=1e-7)


def test_resume_gives_the_uninterrupted_adapter(tmp_path, f32_checkpoint, data, experts_cfg):
    common = ["--method", "esft", "--experts", experts_cfg, "--seed", "3"]
    assert _tune(f32_checkpoint, data, tmp_path / "straight", *common) == 0
    # a first run that checkpoints every 3 steps, then a run resuming from its last checkpoint
    assert _tune(f32_checkpoint, data, tmp_path / "resumed", *common, "--save-steps", "3") == 0
    checkpoints = sorted((tmp_path / "resumed.checkpoints").glob("checkpoint-*"))
    assert [c.name for c in checkpoints] == ["checkpoint-3", "checkpoint-6"]
    import shutil

    shutil.rmtree(checkpoints[-1])  # as if interrupted after step 3
    shutil.rmtree(tmp_path / "resumed")
    assert _tune(f32_checkpoint, data, tmp_path / "resumed", *common, "--save-steps", "3", "--resume") == 0
    a = load_file(tmp_path / "straight" / "adapter.safetensors")
    b = load_file(tmp_path / "resumed" / "adapter.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "case,expect",
    [
        ("no_experts", "--experts"),
        ("bad_ids", "out of range"),
        ("bad_data", "train.jsonl:1"),
        ("bad_steps", "--steps"),
        ("bad_batch", "--batch-size"),
    ],
)
def test_tune_bad_input_exit_2(capsys, tmp_path, f32_checkpoint, data, experts_cfg, case, expect):
    extra = ["--method", "esft", "--experts", experts_cfg]
    model_data = data
    if case == "no_experts":
        extra = ["--method", "esft"]
    elif case == "bad_ids":
        cfg = tmp_path / "cfg.json"
        cfg.write_text(json.dumps({"experts": {"0": [99]}}))
        extra = ["--method", "esft", "--experts", cfg]
    elif case == "bad_data":
        model_data = tmp_path / "train.jsonl"
        model_data.write_text("not json\n")
    elif case == "bad_steps":
        extra += ["--steps", "0"]
    elif case == "bad_batch":
        extra += ["--batch-size", "0"]
    capsys.readouterr()
    assert _tune(f32_checkpoint, model_data, tmp_path / "ad", *extra) == 2
    err = capsys.readouterr().err
    assert expect in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "ad").exists()


def test_eval_refuses_adapter_of_another_base(capsys, tmp_path, f32_checkpoint, data, experts_cfg):
    from helpers.checkpoints import save_checkpoint

    other = save_checkpoint(tmp_path / "other", "qwen2_moe", dtype=torch.float32, seed=7)
    assert _tune(f32_checkpoint, data, tmp_path / "ad", "--method", "esft", "--experts", experts_cfg) == 0
    capsys.readouterr()
    code = main(["eval", "--model", str(other), "--adapter", str(tmp_path / "ad"), "--data", str(data)])
    err = capsys.readouterr().err
    assert code == 2 and "different base weights" in err


@pytest.mark.slow
@pytest.mark.torchrun
def test_torchrun_two_processes_equal_one(tmp_path, f32_checkpoint, data, experts_cfg):
    # float64: Adam's first steps move every weight by about lr * sign(grad), so float32 summation-order
    # noise on near-zero gradients would show up as lr-sized differences; in float64 it cannot.
    common = [
        "--method",
        "esft",
        "--experts",
        experts_cfg,
        "--aux-loss-coef",
        "0",
        "--seed",
        "1",
        "--dtype",
        "float64",
    ]
    assert _tune(f32_checkpoint, data, tmp_path / "one", *common) == 0
    result = run_torchrun(_tune_args(f32_checkpoint, data, tmp_path / "two", *common))
    assert result.returncode == 0, result.stderr[-3000:]
    a = load_file(tmp_path / "one" / "adapter.safetensors")
    b = load_file(tmp_path / "two" / "adapter.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-9, atol=1e-10)
