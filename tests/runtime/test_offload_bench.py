"""``bench offload`` runs end to end on a tiny model and reports the contract's fields."""

from __future__ import annotations

import json

import pytest

from moe_runtime.cli import main

FIELDS = {
    "budget", "tokens_per_s", "tokens_per_s_resident", "tokens_per_s_accelerate", "speedup_vs_accelerate",
    "hit_rate", "hit_rate_lru", "bytes_read_per_token", "bound_fraction",
}  # fmt: skip


@pytest.mark.slow
def test_bench_offload_smoke(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MOE_RUNTIME_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "offload.json"
    assert main(["bench", "offload", "--offload-size", "smoke", "--threads", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result) >= FIELDS
    assert all(result[k] is not None for k in FIELDS)
    assert result["tokens_match_resident"] and result["tokens_match_accelerate"]
    # --threads reaches both children: resident and offloaded compute with the same threads
    assert result["compute_threads"] == {"offload": 1, "resident": 1}
    assert 0 <= result["hit_rate"] <= 1 and 0 <= result["hit_rate_lru"] <= 1
    assert "hit_rate" in capsys.readouterr().out


def test_cpu_tier_runs_on_device(tmp_path, device):
    """The benchmark's ``cpu`` tier runs (in this process): same tokens as resident on ``device``,
    every expert copied once by the bandwidth run, GPU peaks reported on a GPU only."""
    from moe_runtime.bench.offload_bench import (
        OffloadBenchSettings,
        _checkpoint,
        _child_bandwidth,
        _child_offload,
        _child_resident,
    )

    settings = OffloadBenchSettings.smoke()
    settings.tier, settings.device, settings.accelerate = "cpu", device, False
    ckpt = _checkpoint(settings, tmp_path)
    resident = _child_resident(ckpt, settings, str(tmp_path))
    offload = _child_offload(ckpt, settings, str(tmp_path))
    bandwidth = _child_bandwidth(ckpt, settings, str(tmp_path))
    assert offload["tokens"] == resident["tokens"] and offload["stats"]["misses"] > 0
    assert bandwidth["bytes"] == offload["offloaded_bytes"] and bandwidth["bandwidth_bytes_per_s"] > 0
    for run in (resident, offload):
        assert (run["peak_gpu_bytes"] is None) == (device == "cpu")
    if device == "cuda":
        assert offload["peak_gpu_bytes"] < resident["peak_gpu_bytes"]  # the experts stay in host memory
