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
    assert main(["bench", "offload", "--offload-size", "smoke", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result) >= FIELDS
    assert all(result[k] is not None for k in FIELDS)
    assert result["tokens_match_resident"] and result["tokens_match_accelerate"]
    assert 0 <= result["hit_rate"] <= 1 and 0 <= result["hit_rate_lru"] <= 1
    assert "hit_rate" in capsys.readouterr().out
