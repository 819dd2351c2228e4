"""``tune --method esft --offload disk``: the resident adapter (weights, metadata, official export) from
a bf16 per-expert checkpoint of the DeepSeek-V2-Lite shape computed in float32; --plan sizes the run
and writes nothing; bad input is one line and exit 2 with nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.checkpoints import damaged_copy
from safetensors.torch import load_file

from moe_runtime.cli import main
from moe_runtime.testing import shapes


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """3 layers (layer 0 dense), 16 routed experts (top-6) and 2 shared, bf16 in shards."""
    config = shapes.shape_config("deepseek-v2-lite", layers=3, **shapes.TINY_WIDTHS["deepseek-v2-lite"])
    return shapes.write_checkpoint(config, tmp_path_factory.mktemp("t") / "dsv2", shard_bytes=200_000)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("inputs")
    data = root / "train.jsonl"
    rows = [{"prompt": f"the quick fox {i} +", "response": f" {2 * i + 1} lazy dogs"} for i in range(16)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = root / "expert_cfg.json"
    cfg.write_text(
        json.dumps({"experts": {"1": [0, 5], "2": [3]}, "shared_experts": False, "non_expert_modules": False})
    )
    return data, cfg


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _tune(tiny, inputs, out, *extra) -> list[str]:
    data, cfg = inputs
    return [str(a) for a in ["tune", "--model", tiny, "--data", data, "--method", "esft", "--experts", cfg, "--out", out,
            "--steps", "2", "--batch-size", "4", "--lr", "1e-4", "--profile-tokens", "64", *extra]]  # fmt: skip


def test_offloaded_tune_writes_the_resident_adapter(tiny, inputs, tmp_path, capsys):
    code, _, err = _run(capsys, *_tune(tiny, inputs, tmp_path / "res", "--dtype", "float32"))
    assert code == 0, err
    code, out, err = _run(
        capsys,
        *_tune(
            tiny,
            inputs,
            tmp_path / "off",
            "--compute-dtype",
            "float32",
            "--offload",
            "disk",
            "--expert-budget",
            "50%",
        ),  # fmt: skip
    )
    assert code == 0, err
    assert "trained 3 experts" in out and "routed-expert bytes in RAM" in err
    res, off = tmp_path / "res", tmp_path / "off"
    assert sorted(p.name for p in off.iterdir()) == sorted(p.name for p in res.iterdir())
    for name in ("expert_cfg.json", "routing_profile.json"):
        assert json.loads((off / name).read_text()) == json.loads((res / name).read_text()), name
    meta_off, meta_res = (json.loads((d / "moe_runtime_adapter.json").read_text()) for d in (off, res))
    for key in ("replaced_fingerprint", "base_fingerprint", "method", "model_type"):
        assert meta_off[key] == meta_res[key], key
    # the gradients agree to float32 rounding (test_esft_offload); AdamW's steps of at most lr = 1e-4
    # turn that into differences far below 1e-6
    got, want = load_file(off / "adapter.safetensors"), load_file(res / "adapter.safetensors")
    assert got.keys() == want.keys() and len(want) == 3 * 3  # gate, up, down of 3 experts
    for key, tensor in want.items():
        torch.testing.assert_close(got[key], tensor, rtol=1e-6, atol=1e-6, msg=key)

    code, _, err = _run(capsys, "convert", "--adapter", off, "--to", "esft-official", "--out", tmp_path / "o")
    assert code == 0, err
    official = load_file(next((tmp_path / "o").glob("*.safetensors")))
    assert official.keys() == got.keys() and all(torch.equal(official[k], got[k]) for k in got)


def test_plan_prints_the_sizes_and_writes_nothing(tiny, inputs, tmp_path, capsys):
    _, cfg = inputs
    before = sorted(tmp_path.rglob("*"))
    code, out, err = _run(capsys, "tune", "--model", tiny, "--method", "esft", "--experts", cfg,
                          "--offload", "disk", "--expert-budget", "50%", "--batch-size", "4",
                          "--max-length", "256", "--out", tmp_path / "ad", "--plan")  # fmt: skip
    assert code == 0, err
    plan = json.loads(out)
    assert sorted(tmp_path.rglob("*")) == before  # not even the adapter directory
    expert = plan["routed_expert_bytes"] // (2 * 16)  # 2 MoE layers of 16 experts (float32)
    assert plan["method"] == "esft" and plan["compute_dtype"] == "float32" and plan["slots_per_layer"] == 8
    assert plan["trainable_bytes"] == 3 * expert and plan["optimizer_bytes"] == 2 * plan["trainable_bytes"]
    assert plan["weights_ram_bytes"] == plan["non_expert_bytes"] + 8 * 2 * expert
    assert plan["ram_bytes"] == (
        plan["weights_ram_bytes"] + 4 * plan["trainable_bytes"] + plan["activation_bytes_estimate"]
    )
    assert plan["tokens_per_micro_batch"] == 1024
    # 1024 tokens touch all 16 experts of each layer; backward reads all but the 8 slots again
    read = plan["expert_read_bytes"]
    assert plan["bytes_read_per_step_estimate"] == pytest.approx(2 * (16 + 8) * read, rel=1e-6)
    assert plan["bytes_read_per_step_worst"] == 2 * 2 * 16 * read

    code, out, err = _run(capsys, "tune", "--model", tiny, "--method", "esft", "--experts", cfg, "--plan")
    plan = json.loads(out)
    assert code == 0 and plan["offload"] is None and plan["bytes_read_per_step_worst"] == 0, err


@pytest.mark.parametrize(
    "case", ["budget below top-k", "other method", "budget without offload", "truncated", "missing"]
)
def test_bad_input_is_one_line_and_writes_nothing(tiny, inputs, tmp_path, capsys, case):
    model, expect, extra = tiny, None, ["--offload", "disk", "--expert-budget", "50%"]
    damage = case if case in ("truncated", "missing") else None
    if case == "budget below top-k":
        extra, expect = ["--offload", "disk", "--expert-budget", "25%"], "top-k = 6"
    elif case == "budget without offload":
        extra, expect = ["--expert-budget", "50%"], "--expert-budget goes with --offload disk"
    elif case in ("truncated", "missing"):
        model, expect = damaged_copy(tiny, tmp_path / "bad", case)
    argv = _tune(model, inputs, tmp_path / "ad", *extra)
    if case == "other method":
        argv[argv.index("esft")] = "lora"
        argv.remove("--experts")
        argv.remove(str(inputs[1]))
        expect = "--offload disk works with --method esft, not lora"
    for plan in ([], ["--plan"]):
        if plan and case == "budget without offload":
            continue
        code, _, err = _run(capsys, *argv, *plan)
        assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert expect in err and (damage is None or damage in err), err
        assert not (tmp_path / "ad").exists() and not list(tmp_path.glob("ad*"))
