"""``moe-runtime convert`` round trips (byte-identical files, same fingerprints) and the refusals of
``convert`` and ``export`` (exit 2, one line naming the problem, nothing written)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.peft_adapters import write_peft_adapter
from helpers.routed_lora import write_random_lora
from helpers.serving import make_adapter, make_esft_lora_adapter

from moe_runtime.cli import main
from moe_runtime.models import find_moe_layers, load_model
from moe_runtime.testing import build_random_model
from moe_runtime.tuning.meta import META_FILE
from moe_runtime.tuning.routed_lora import RoutedLoraSettings


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("base")
    build_random_model("olmoe", seed=2).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def adapters(base, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    model = load_model(base)
    info = find_moe_layers(model)
    return {
        "esft": make_adapter(model, root / "esft", {info.layer_indices[0]: [1, 4]}, seed=1, info=info),
        "lora": write_peft_adapter(lambda: load_model(base), root / "lora", seed=2, ours=True),
        "peft": write_peft_adapter(lambda: load_model(base), root / "peft", seed=3),
        "routed": write_random_lora(
            model, root / "routed", RoutedLoraSettings(variant="perft-e", rank=4), seed=4
        ),
        "esft-lora-merge": make_esft_lora_adapter(
            model,
            root / "esft-lora-merge",
            {info.layer_indices[0]: [0, 3], info.layer_indices[-1]: [5]},
            seed=6,
        ),
        "esft-lora": write_random_lora(
            model,
            root / "esft-lora",
            RoutedLoraSettings(
                variant="esft-lora", rank=4, experts=_selection({info.layer_indices[0]: [0, 2]})
            ),
            seed=5,
        ),
    }


def _selection(experts):
    from moe_runtime.tuning.esft import ExpertSelection

    return ExpertSelection(experts=experts)


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.name != META_FILE}


def _meta(directory: Path) -> dict:
    meta = json.loads((directory / META_FILE).read_text())
    meta.pop("training", None)  # the other formats have no place for the training record
    return meta


@pytest.mark.parametrize(("kind", "other"), [("lora", "peft"), ("esft", "esft-official")])
def test_ours_to_other_and_back_is_byte_identical(capsys, tmp_path, base, adapters, kind, other):
    there, back = tmp_path / "there", tmp_path / "back"
    assert run_cli(capsys, "convert", "--adapter", adapters[kind], "--to", other, "--out", there)[0] == 0
    assert not (there / META_FILE).exists()
    assert _files(there) == _files(adapters[kind])
    code, _ = run_cli(
        capsys, "convert", "--adapter", there, "--to", "moe-runtime", "--model", base, "--out", back
    )
    assert code == 0
    assert _files(back) == _files(adapters[kind])
    assert _meta(back) == _meta(adapters[kind])


def test_peft_to_ours_and_back_is_byte_identical(capsys, tmp_path, base, adapters):
    ours, back = tmp_path / "ours", tmp_path / "back"
    assert run_cli(capsys, "convert", "--adapter", adapters["peft"], "--to", "moe-runtime", "--model", base, "--out", ours)[0] == 0  # fmt: skip
    assert json.loads((ours / META_FILE).read_text())["method"] == "lora"
    assert run_cli(capsys, "convert", "--adapter", ours, "--to", "peft", "--out", back)[0] == 0
    assert _files(back) == _files(adapters["peft"])


def _corrupt(source: Path, target: Path) -> Path:
    target.mkdir()
    for file in source.iterdir():
        data = file.read_bytes()
        (target / file.name).write_bytes(data[: len(data) // 2] if file.suffix == ".safetensors" else data)
    return target


def _other_base(tmp_path: Path) -> Path:
    directory = tmp_path / "other-base"
    build_random_model("olmoe", seed=9).save_pretrained(directory)
    return directory


REFUSALS = {
    "routed-lora export": (
        ["export", "--adapter", "{routed}", "--out", "{out}"],
        "cannot be exported: routed-LoRA",
    ),
    "esft-lora export": (
        ["export", "--adapter", "{esft-lora}", "--out", "{out}"],
        "'tune --method esft-lora-merge'",
    ),
    "esft-lora-merge to peft": (
        ["convert", "--adapter", "{esft-lora-merge}", "--to", "peft", "--out", "{out}"],
        "converts only to esft-official",
    ),
    "esft-lora-merge without model": (
        ["convert", "--adapter", "{esft-lora-merge}", "--to", "esft-official", "--out", "{out}"],
        "needs --model",
    ),
    "esft-lora-merge of another base": (
        ["export", "--adapter", "{esft-lora-merge}", "--out", "{out}", "--model", "{other}"],
        "tuned on different base weights",
    ),
    "corrupt esft export": (
        ["export", "--adapter", "{corrupt-esft}", "--out", "{out}"],
        "corrupt safetensors",
    ),
    "corrupt peft export": (
        ["export", "--adapter", "{corrupt-peft}", "--out", "{out}"],
        "corrupt safetensors",
    ),
    "esft of another base": (
        ["export", "--adapter", "{esft}", "--out", "{out}", "--model", "{other}"],
        "tuned on different base weights",
    ),
    "lora of another base": (
        ["export", "--adapter", "{lora}", "--out", "{out}", "--model", "{other}"],
        "tuned from different base weights",
    ),
    "existing output": (["export", "--adapter", "{esft}", "--out", "{full}"], "exists and is not empty"),
    "routed-lora convert": (
        ["convert", "--adapter", "{routed}", "--to", "peft", "--out", "{out}"],
        "has no peft format",
    ),
    "lora to esft": (
        ["convert", "--adapter", "{lora}", "--to", "esft-official", "--out", "{out}"],
        "has no esft-official",
    ),
    "peft without model": (
        ["convert", "--adapter", "{peft}", "--to", "moe-runtime", "--out", "{out}"],
        "needs --model",
    ),
    "peft of another model": (
        [
            "convert",
            "--adapter",
            "{peft-llama}",
            "--to",
            "moe-runtime",
            "--model",
            "{base}",
            "--out",
            "{out}",
        ],
        "base_model_class",
    ),
    "dora": (
        ["convert", "--adapter", "{dora}", "--to", "moe-runtime", "--model", "{base}", "--out", "{out}"],
        "DoRA",
    ),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_bad_input_is_refused_with_one_line_and_nothing_written(capsys, tmp_path, base, adapters, case):
    argv, expected = REFUSALS[case]
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("user data")
    peft_llama = tmp_path / "peft-llama"
    peft_llama.mkdir()
    for file in adapters["peft"].iterdir():
        (peft_llama / file.name).write_bytes(file.read_bytes())
    config = json.loads((peft_llama / "adapter_config.json").read_text())
    (peft_llama / "adapter_config.json").write_text(
        json.dumps({**config, "auto_mapping": {"base_model_class": "LlamaForCausalLM"}})
    )
    dora = tmp_path / "dora"
    dora.mkdir()
    for file in adapters["peft"].iterdir():
        (dora / file.name).write_bytes(file.read_bytes())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    paths = {
        **{k: str(v) for k, v in adapters.items()},
        "corrupt-esft": _corrupt(adapters["esft"], tmp_path / "corrupt-esft"),
        "corrupt-peft": _corrupt(adapters["peft"], tmp_path / "corrupt-peft"),
        "other": _other_base(tmp_path) if "{other}" in argv else "",
        "out": tmp_path / "out",
        "full": full,
        "base": base,
        "peft-llama": peft_llama,
        "dora": dora,
    }
    argv = [a.format(**paths) for a in argv]
    if "--model" not in argv and argv[0] == "export":
        argv += ["--model", str(base)]
    before = sorted(p.name for p in tmp_path.iterdir())
    code, err = run_cli(capsys, *argv)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("moe-runtime: error: ") and expected in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output, no temporary left behind
    assert [p.name for p in full.iterdir()] == ["keep.txt"]


def test_export_keeps_a_requested_dtype(capsys, tmp_path, base, adapters):
    out = tmp_path / "out"
    assert run_cli(capsys, "export", "--model", base, "--adapter", adapters["esft"], "--out", out, "--dtype", "bfloat16")[0] == 0  # fmt: skip
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for file in sorted(directory.glob("*.safetensors")) for k, v in load_file(file).items()}


def test_esft_lora_merge_to_official_is_its_merged_experts(capsys, tmp_path, base, adapters):
    """One way: the official directory holds the merged experts; read back as an ESFT adapter it
    exports to the same checkpoint, tensor for tensor, as the esft-lora-merge adapter itself."""
    official, ours = tmp_path / "official", tmp_path / "ours"
    source = adapters["esft-lora-merge"]
    assert run_cli(capsys, "convert", "--adapter", source, "--to", "esft-official", "--model", base, "--out", official)[0] == 0  # fmt: skip
    assert not (official / META_FILE).exists()
    assert json.loads((official / "expert_cfg.json").read_text()) == json.loads(
        (source / "expert_cfg.json").read_text()
    )
    assert run_cli(capsys, "convert", "--adapter", official, "--to", "moe-runtime", "--model", base, "--out", ours)[0] == 0  # fmt: skip
    exports = {}
    for name, adapter in (("direct", source), ("via-official", ours)):
        exports[name] = tmp_path / f"export-{name}"
        assert (
            run_cli(capsys, "export", "--model", base, "--adapter", adapter, "--out", exports[name])[0] == 0
        )
    direct, via = _tensors(exports["direct"]), _tensors(exports["via-official"])
    assert direct.keys() == via.keys()
    assert all(torch.equal(direct[k], via[k]) for k in direct)
    assert any(not torch.equal(direct[k], v) for k, v in _tensors(base).items())  # it did change the base
