"""--plan sizes a run from config.json and safetensors headers only; bad input is one line and exit 2."""

from __future__ import annotations

import json
import time

import pytest
import torch
from helpers.checkpoints import damaged_copy

from moe_runtime.cli import main
from moe_runtime.runtime import MultiAdapterEngine
from moe_runtime.runtime.offload import OffloadConfig
from moe_runtime.runtime.offload.plan import plan_memory
from moe_runtime.testing import shapes


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    config = shapes.shape_config("deepseek-v2-lite", layers=3, **shapes.TINY_WIDTHS["deepseek-v2-lite"])
    return shapes.write_checkpoint(config, tmp_path_factory.mktemp("p") / "dsv2", shard_bytes=200_000)


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_plan_matches_what_the_run_holds(tiny, tmp_path):
    offload = OffloadConfig(budget="50%", cache_dir=str(tmp_path / "c"))
    plan = plan_memory(tiny, offload, "auto")
    engine = MultiAdapterEngine.from_pretrained(tiny, dtype="auto", offload=offload)
    tier = engine.offload
    non_expert = sum(p.numel() * p.element_size() for p in engine.model.parameters() if not p.is_meta)
    assert plan["compute_dtype"] == "float32" and plan["storage_dtype"] == "bfloat16"
    assert plan["slots_per_layer"] == tier.num_slots
    assert plan["non_expert_bytes"] == non_expert
    assert plan["ram_bytes"] == non_expert + tier.resident_expert_bytes()
    assert plan["routed_expert_bytes"] == tier.offloaded_bytes()
    assert plan["expert_read_bytes"] == tier.store.expert_bytes(tier.info.layers[0].index)
    layers = len(tier.info.layers)
    top_k = tier.info.layers[0].top_k
    assert plan["bytes_read_per_token_worst"] == layers * top_k * plan["expert_read_bytes"]
    assert plan["extra_disk_bytes"] == 0
    packed = plan_memory(tiny, OffloadConfig(budget="50%", pack=True), "auto")
    assert packed["extra_disk_bytes"] == layers * tier.info.layers[0].num_experts * plan["expert_read_bytes"]


def test_plan_of_the_full_deepseek_v2_lite_reads_no_weights(tmp_path, capsys):
    """31 GB of headers over holes: the plan answers in seconds, from the real config."""
    path = shapes.write_checkpoint(shapes.shape_config("deepseek-v2-lite"), tmp_path / "full", sparse=True)
    start = time.perf_counter()
    code, out, err = _run(
        capsys, "generate", "--model", path, "--offload", "disk", "--expert-budget", "25%", "--plan"
    )
    assert code == 0, err
    plan = json.loads(out)
    assert time.perf_counter() - start < 60
    expert = 3 * 1408 * 2048  # gate, up, down of one routed expert
    assert plan["checkpoint_bytes"] > 31.4e9 and plan["moe_layers"] == 26
    assert plan["routed_expert_bytes"] == 26 * 64 * expert * 4  # float32 compute
    assert plan["expert_read_bytes"] == expert * 2  # bf16 on disk
    assert plan["slots_per_layer"] == 16
    assert plan["ram_bytes"] == plan["non_expert_bytes"] + 16 * 26 * expert * 4
    assert plan["bytes_read_per_token_worst"] == 26 * 6 * expert * 2


def test_budget_below_top_k_is_one_line(tiny, capsys):
    for extra in ([], ["--plan"]):
        argv = ["generate", "--model", tiny, "--offload", "disk", "--expert-budget", "10%", *extra]
        if not extra:
            argv += ["--prompt", "x"]
        code, _, err = _run(capsys, *argv)
        assert code == 2 and len(err.strip().splitlines()) == 1 and "top-k = 6" in err, err


@pytest.mark.parametrize("damage", ["truncated", "missing"])
@pytest.mark.parametrize("offload", ["none", "disk"])
def test_damaged_shard_is_one_line(tiny, tmp_path, capsys, damage, offload):
    bad, shard_name = damaged_copy(tiny, tmp_path / "bad", damage)
    for extra in (["--prompt", "x"], ["--plan"]):
        code, out, err = _run(capsys, "generate", "--model", bad, "--offload", offload, *extra)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert shard_name in err and damage in err and "Traceback" not in err, err


def test_compute_dtype_flag(tiny, capsys):
    for choice, expected in (("auto", torch.float32), ("bfloat16", torch.bfloat16)):
        code, out, err = _run(capsys, "generate", "--model", tiny, "--compute-dtype", choice, "--plan")
        assert code == 0 and json.loads(out)["compute_dtype"] == str(expected).removeprefix("torch."), err
    code, _, err = _run(
        capsys, "generate", "--model", tiny, "--compute-dtype", "float32", "--prompt", "the quick"
    )
    assert code == 0, err
    code, _, err = _run(capsys, "generate", "--model", tiny, "--pack-experts", "--prompt", "x")
    assert code == 2 and "--pack-experts goes with --offload disk" in err


def test_profile_plan_and_compute_dtype(tiny, tmp_path, capsys):
    code, out, err = _run(capsys, "profile", "--model", tiny, "--plan")
    plan = json.loads(out)
    assert code == 0 and plan["offload"] is None and plan["compute_dtype"] == "float32", err
    assert plan["ram_bytes"] == plan["non_expert_bytes"] + plan["routed_expert_bytes"]
    data = tmp_path / "t.jsonl"
    data.write_text("".join(json.dumps({"text": f"the quick brown fox {i}"}) + "\n" for i in range(4)))
    for choice in ("auto", "bfloat16"):
        out_dir = tmp_path / f"prof-{choice}"
        code, _, err = _run(capsys, "profile", "--model", tiny, "--task", f"t={data}", "--out", out_dir,
                            "--compute-dtype", choice, "--no-plots")  # fmt: skip
        assert code == 0 and (out_dir / "t" / "summary.json").exists(), err
    code, _, err = _run(capsys, "profile", "--model", tiny, "--task", f"t={data}")
    assert code == 2 and "--out DIR is required" in err
