"""``bench reroute`` runs end to end and reports consistent numbers (timings are not asserted)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moe_runtime.bench.reroute_bench import bench_reroute
from moe_runtime.cli import main


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from helpers.checkpoints import save_checkpoint

    return save_checkpoint(tmp_path_factory.mktemp("bench"), "qwen2_moe", dtype=torch.float32)


def test_bench_reroute_small(checkpoint, device):
    result = bench_reroute(
        checkpoint,
        adapters=3,
        requests_per_adapter=2,
        prompt_lengths=(3, 8),
        new_tokens=(2, 4),
        repeats=1,
        device=device,
    )
    assert result["adapters"] == 3 and result["requests"] == 8
    assert (result["device"] == "cpu") == (device == "cpu") and result["dtype"] == "float32"
    assert result["mixed_s"] > 0 and result["base_s"] > 0 and result["swap_s"] > 0
    # the arena holds the tuned experts and nothing else but the (tiny) slot tables
    assert result["arena_bytes"] - result["tuned_expert_bytes"] < 1024
    assert 1.0 <= result["memory_ratio_vs_ideal"] < 1.02
    assert result["merged_models_bytes"] == 3 * result["base_bytes"]
    assert len(result["mixed_runs"]) == len(result["base_runs"]) == len(result["swap_runs"]) == 1


@pytest.mark.slow
def test_bench_reroute_cli(capsys, tmp_path, checkpoint):
    out = tmp_path / "reroute.json"
    assert main(["bench", "reroute", "--model", str(checkpoint), "--repeats", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    for key in ("adapters", "latency_ratio_vs_base", "speedup_vs_swap", "memory_ratio_vs_ideal"):
        assert key in result
    assert result["adapters"] >= 20
    assert "latency_ratio_vs_base" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["profile", "--device", "cuda"], "bench profile runs on the cpu"),
        (["offload", "--device", "cuda"], "with --tier cpu only"),
        (["reroute", "--tier", "cpu"], "--tier cpu goes with bench offload"),
        (["tune", "--dtype", "bfloat16"], "--dtype bfloat16 goes with bench reroute"),
    ],
)
def test_bench_device_options_refused(capsys, argv, message):
    assert main(["bench", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_bench_cuda_without_cuda_is_refused(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench", "reroute", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "CUDA is not available" in err and len(err.strip().splitlines()) == 1, err
