"""bench kernels: the compiled few-row products against the GEMM, timed and checked (tiny sizes)."""

from __future__ import annotations

import json

import pytest

from moe_runtime.bench import kernels_bench
from moe_runtime.cli import main
from moe_runtime.ops import extension_available, rows_mm_max

requires_extension = pytest.mark.skipif(not extension_available(), reason="moe_runtime._C is not built")


@requires_extension
def test_reports_every_shape_rows_and_threads(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(kernels_bench, "LINEAR_SHAPES", ((96, 64),))
    monkeypatch.setattr(kernels_bench, "_EXPERTS", 3)
    monkeypatch.setattr(kernels_bench, "_WIDTH", 40)
    monkeypatch.setattr(kernels_bench, "_HIDDEN", 64)
    monkeypatch.setattr(kernels_bench, "ROWS", (1, 6))
    out = tmp_path / "k.json"
    code = main(["bench", "kernels", "--repeats", "1", "--thread-counts", "1,2", "--json", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    result = json.loads(out.read_text())
    assert result["rows_mm_max"] == rows_mm_max()
    assert {(r["threads"], r["rows"]) for r in result["linear"]} == {(1, 1), (1, 6), (2, 1), (2, 6)}
    assert {(r["threads"], r["rows_per_expert"]) for r in result["experts"]} == {
        (1, 1),
        (1, 6),
        (2, 1),
        (2, 6),
    }
    for r in result["linear"] + result["experts"]:
        assert r["ours_ms"] > 0 and r["gemm_ms"] > 0
        assert r["speedup"] == pytest.approx(r["gemm_ms"] / r["ours_ms"])
    assert "linear [96 x 64]" in printed and "experts 3 x [80 x 64]" in printed


@pytest.mark.parametrize("counts", ["0", "1,x", ""])
def test_bad_thread_counts_exit_2(capsys, counts):
    code = main(["bench", "kernels", "--thread-counts", counts])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--thread-counts" in err
