"""Adapters on another base model, warnings from transformers, and what generate/eval print."""

from __future__ import annotations

import argparse
import json
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from helpers.checkpoints import save_checkpoint

from moe_runtime.cli import build_parser, main
from moe_runtime.errors import AdapterError
from moe_runtime.models import load_model
from moe_runtime.runtime import MultiAdapterEngine, Request


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("base"), "qwen2_moe", dtype=torch.float32)


@pytest.fixture(scope="module")
def scaled(checkpoint, tmp_path_factory) -> Path:
    """The same checkpoint with its embeddings scaled by 1.01: every routed expert is unchanged."""
    out = tmp_path_factory.mktemp("scaled") / "ckpt"
    shutil.copytree(checkpoint, out)
    model = load_model(checkpoint)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(1.01)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapters(checkpoint, tmp_path_factory) -> dict[str, Path]:
    """An ESFT adapter made by ``tune`` and the same adapter in the official layout (no metadata)."""
    root = tmp_path_factory.mktemp("adapters")
    data = root / "train.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": f"{i} + 1 =", "response": f" {i + 1}"}) + "\n" for i in range(8))
    )
    cfg = root / "cfg.json"
    cfg.write_text(
        json.dumps({"experts": {"0": [1, 2]}, "shared_experts": False, "non_expert_modules": False})
    )
    argv = ["tune", "--model", checkpoint, "--data", data, "--method", "esft", "--experts", cfg]
    argv += ["--out", root / "ours", "--steps", 2, "--batch-size", 4, "--lr", 1e-2]
    assert main([str(a) for a in argv]) == 0
    official = root / "official"
    shutil.copytree(root / "ours", official)
    (official / "moe_runtime_adapter.json").unlink()
    return {"ours": root / "ours", "official": official, "data": data}


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_own_esft_adapter_refused_on_another_base_unless_allowed(capsys, scaled, adapters):
    generate = ["generate", "--model", scaled, "--adapter", f"a={adapters['ours']}", "--prompt", "1 +"]
    generate += ["--use", "a", "--max-new-tokens", 2]
    code, _, err = run_cli(capsys, *generate)
    assert code == 2 and "different base weights" in _one_line(err)
    evaluate = ["eval", "--model", scaled, "--adapter", adapters["ours"], "--data", adapters["data"]]
    code, _, err = run_cli(capsys, *evaluate, "--no-exact-match")
    assert code == 2 and "different base weights" in _one_line(err)
    assert run_cli(capsys, *generate, "--allow-base-mismatch")[0] == 0
    assert run_cli(capsys, *evaluate, "--no-exact-match", "--allow-base-mismatch")[0] == 0
    engine = MultiAdapterEngine.from_pretrained(scaled)
    with pytest.raises(AdapterError, match="different base weights"):
        engine.add_adapter("a", adapters["ours"])
    engine.add_adapter("a", adapters["ours"], allow_base_mismatch=True)
    engine.close()


def test_own_esft_adapter_accepted_on_its_base(capsys, checkpoint, adapters):
    code, _, err = run_cli(
        capsys, "generate", "--model", checkpoint, "--adapter", f"a={adapters['ours']}", "--prompt", "1 +",
        "--use", "a", "--max-new-tokens", 2,
    )  # fmt: skip
    assert code == 0 and "warning" not in err, err


def test_official_layout_is_checked_on_its_experts_with_one_warning(capsys, scaled, adapters):
    code, _, err = run_cli(
        capsys, "generate", "--model", scaled, "--adapter", f"a={adapters['official']}", "--prompt", "1 +",
        "--use", "a", "--max-new-tokens", 2,
    )  # fmt: skip
    assert code == 0, err
    warning = [line for line in err.splitlines() if "warning" in line]
    assert len(warning) == 1 and "no base fingerprint" in warning[0] and "unchecked" in warning[0], err


def test_generate_prints_one_timing_line(capsys, checkpoint):
    code, out, err = run_cli(
        capsys, "generate", "--model", checkpoint, "--prompt", "seven", "--max-new-tokens", 3
    )
    assert code == 0, err
    timing = [line for line in err.splitlines() if line.startswith("generated ")]
    assert len(timing) == 1, err
    match = re.fullmatch(r"generated (\d+) tokens in ([\d.]+) s \(([\d.]+) tokens/s\)", timing[0])
    assert match and 1 <= int(match[1]) <= 3, timing


def test_generation_emits_no_deprecation_warning_from_transformers(checkpoint):
    engine = MultiAdapterEngine.from_pretrained(checkpoint)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine.generate([Request("seven wizards", max_new_tokens=3), Request("oslo", max_new_tokens=2)])
    engine.close()
    bad = [
        w
        for w in caught
        if issubclass(w.category, (FutureWarning, DeprecationWarning)) and "transformers" in w.filename
    ]
    assert not bad, [str(w.message) for w in bad]


def test_eval_prints_one_human_line_and_json_only_to_the_file(capsys, tmp_path, checkpoint, adapters):
    code, out, err = run_cli(
        capsys, "eval", "--model", checkpoint, "--data", adapters["data"], "--json", tmp_path / "e.json"
    )
    assert code == 0, err
    line = _one_line(out)
    result = json.loads((tmp_path / "e.json").read_text())
    assert not line.startswith("{") and f"{result['loss']:.4f}" in line and "exact match" in line


@pytest.mark.parametrize("verb", ["tune", "eval"])
def test_every_flag_has_help_and_shows_its_default(verb):
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    parser = sub.choices[verb]
    parser.format_help()  # adds the flags built from the method configs
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        assert action.help, f"{verb} {action.option_strings[0]}: no help"
        if action.default not in (None, False, [], argparse.SUPPRESS) and not action.required:
            assert "default" in action.help, f"{verb} {action.option_strings[0]}: default not shown"
