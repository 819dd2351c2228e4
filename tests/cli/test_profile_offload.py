"""``profile --offload disk``: the same profile as resident while only the budget's experts are in RAM.

Routing does not depend on where expert weights live, but later layers' inputs depend on the earlier
layers' expert outputs, so the offloaded forward must be exact for the counts to match. Counts, token
scores and traces must be equal; gate scores (sums of routing weights) to 1e-12 relative in float64
and 1e-6 in float32 compute (the offloaded experts run through another kernel, so rounding may differ).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.checkpoints import save_checkpoint

from moe_runtime.cli import main
from moe_runtime.runtime import MultiAdapterEngine
from moe_runtime.runtime.offload import parse_budget


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def gpt_oss_checkpoint(tmp_path_factory) -> Path:
    """Fused expert tensors stored in bf16, computed in float32 (widened as they are read); the float64
    qwen2_moe ``moe_checkpoint`` stores one tensor per expert."""
    return save_checkpoint(
        tmp_path_factory.mktemp("gpt_oss"), "gpt_oss", dtype=torch.bfloat16, num_hidden_layers=2
    )


def _args(model, task_files, out, *extra) -> list:
    args = ["profile", "--model", model, "--out", out, "--batch-size", "4", "--trace", "--no-plots", *extra]
    for name, path in task_files.items():
        args += ["--task", f"{name}={path}"]
    return args


@pytest.fixture
def engines(monkeypatch) -> list[MultiAdapterEngine]:
    """The engines the CLI builds (kept after it closes them, to inspect their tiers)."""
    made = []
    original = MultiAdapterEngine.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        engine = original(cls, *args, **kwargs)
        made.append(engine)
        return engine

    monkeypatch.setattr(MultiAdapterEngine, "from_pretrained", classmethod(spy))
    return made


@pytest.mark.parametrize(
    ("which", "budget"), [("qwen2_moe", "25%"), ("gpt_oss", "50%"), ("demo", "25%"), ("qwen2_moe", "bytes")]
)
def test_offloaded_profile_equals_resident(
    capsys, tmp_path, moe_checkpoint, gpt_oss_checkpoint, task_files, engines, which, budget
):
    model = {"qwen2_moe": moe_checkpoint, "gpt_oss": gpt_oss_checkpoint, "demo": "demo"}[which]
    code, _, err = run_cli(capsys, *_args(model, task_files, tmp_path / "res"))
    assert code == 0, err
    assert not engines  # the resident profile does not go through an engine
    if budget == "bytes":  # two experts of every layer, as a byte size
        from moe_runtime.models import find_moe_layers, load_model

        info = find_moe_layers(load_model(model))
        budget = str(2 * sum(layer.expert_bytes for layer in info.layers))
    code, _, err = run_cli(
        capsys, *_args(model, task_files, tmp_path / "off", "--offload", "disk", "--expert-budget", budget)
    )
    assert code == 0, err
    assert "routed-expert bytes in RAM" in err

    # only the budget's experts were ever held in RAM; the modules' own expert weights never materialized
    (engine,) = engines
    tier, info = engine.offload, engine.info
    assert all(layer.experts.down_proj.is_meta for layer in info.layers)
    resident, total = tier.resident_expert_bytes(), tier.offloaded_bytes()
    limit = parse_budget(budget)
    allowed = limit.bytes if limit.bytes is not None else limit.share * total
    assert 0 < resident <= allowed < total
    assert tier.stats.misses > 0 and tier.stats.bytes_read > 0

    res, off = tmp_path / "res", tmp_path / "off"
    assert json.loads((off / "meta.json").read_text()) == json.loads((res / "meta.json").read_text())
    assert json.loads((off / "overview.json").read_text()) == json.loads((res / "overview.json").read_text())
    # float64: exact to rounding; float32: the offloaded path may run other kernels (few-row streaming
    # products, chunked passes), so sums over thousands of tokens differ in the last bits
    gate_tol = 1e-12 if which == "qwen2_moe" else 1e-5
    for task in task_files:
        got, want = (json.loads((d / task / "counts.json").read_text()) for d in (off, res))
        np.testing.assert_allclose(got.pop("gate_sums"), want.pop("gate_sums"), rtol=gate_tol, atol=0)
        assert got == want  # the counts themselves, tokens, examples
        got, want = (json.loads((d / task / "summary.json").read_text()) for d in (off, res))
        assert got["token_scores"] == want["token_scores"]
        assert got["gate_scores"].keys() == want["gate_scores"].keys()
        for layer, row in want["gate_scores"].items():
            assert got["gate_scores"][layer].keys() == row.keys()
            np.testing.assert_allclose(
                [got["gate_scores"][layer][e] for e in row], list(row.values()), rtol=gate_tol, atol=0
            )
        with np.load(off / task / "trace.npz") as a, np.load(res / task / "trace.npz") as b:
            assert sorted(a.files) == sorted(b.files)
            for key in b.files:
                np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.parametrize(
    ("extra", "expect"),
    [
        (["--expert-budget", "25%"], "--expert-budget goes with --offload disk"),
        (["--offload", "disk", "--expert-budget", "1%"], "top-k"),
        (["--offload", "disk", "--expert-budget", "lots"], "--expert-budget"),
    ],
)
def test_offload_flags_bad_input_exit_2(capsys, tmp_path, moe_checkpoint, task_files, extra, expect):
    out = tmp_path / "prof"
    code, _, err = run_cli(capsys, *_args(moe_checkpoint, task_files, out, *extra))
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and expect in lines[0], err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".prof")]


def test_merge_refuses_offload(capsys, tmp_path):
    code, _, err = run_cli(
        capsys, "profile", "--merge", tmp_path, tmp_path, "--out", tmp_path / "m", "--offload", "disk"
    )
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--offload" in err


def test_plan_with_offload_sizes_the_budget(capsys, moe_checkpoint):
    code, out, err = run_cli(capsys, "profile", "--model", moe_checkpoint, "--plan")
    assert code == 0, err
    resident = json.loads(out)
    code, out, err = run_cli(
        capsys, "profile", "--model", moe_checkpoint, "--offload", "disk", "--expert-budget", "25%", "--plan"
    )
    assert code == 0, err
    plan = json.loads(out)
    assert plan["offload"] == "disk" and resident["offload"] is None
    assert plan["ram_bytes"] < resident["ram_bytes"]
    per_slot = resident["routed_expert_bytes"] // resident["slots_per_layer"]  # one expert of every layer
    assert plan["slots_per_layer"] * 4 <= resident["slots_per_layer"]
    assert plan["ram_bytes"] == plan["non_expert_bytes"] + plan["slots_per_layer"] * per_slot
    code, _, err = run_cli(
        capsys, "profile", "--model", moe_checkpoint, "--offload", "disk", "--expert-budget", "1%", "--plan"
    )
    assert code == 2 and "top-k" in err and len(err.strip().splitlines()) == 1
