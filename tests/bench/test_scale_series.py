"""bench scale's cost-growth series and its refusals: layer counts, point reuse, table + PNG, exit 2."""

from __future__ import annotations

import json
import shutil
from collections import namedtuple

import pytest

from moe_runtime.bench import scale_series
from moe_runtime.bench.scale_bench import ScaleBenchSettings
from moe_runtime.bench.scale_series import (
    bench_scale_series,
    format_series_table,
    series_layers,
    series_points,
)
from moe_runtime.cli import main
from moe_runtime.errors import UsageError
from moe_runtime.testing import shapes

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_series_layers():
    assert series_layers("1/4,1/2,all", 27) == [7, 14, 27]
    assert series_layers("all,0.5", 4) == [2, 4]
    assert series_layers("1/100,3", 16) == [2, 3]  # at least 2 layers; whole counts taken as they are
    assert series_points("1/4,all,1/4@25%,1/4", 27) == [(7, None), (27, None), (7, "25%")]
    for bad in ("abc", "0", "3/2", "1", "40", "1/0", "", "1/4@lots", "all@0%"):
        with pytest.raises(UsageError, match="--layers-series"):
            series_points(bad, 27)


@pytest.fixture(scope="module")
def sparse_ckpt(tmp_path_factory):
    """A 4-layer deepseek-v2-lite checkpoint at real widths, headers only (holes: no disk, no values)."""
    out = tmp_path_factory.mktemp("scale") / "dsv2-4"
    return shapes.write_checkpoint(shapes.shape_config("deepseek-v2-lite", layers=4), out, sparse=True)


def _one_line_refusal(code, out, err, *words):
    assert code == 2, (out, err)
    assert len(err.strip().splitlines()) == 1, err
    for word in words:
        assert word in err, err


def test_refusals_before_any_run(capsys, tmp_path, sparse_ckpt):
    work = tmp_path / "work"
    base = ["bench", "scale", "--checkpoint", sparse_ckpt, "--workdir", work, "--no-accelerate"]
    _one_line_refusal(*run_cli(capsys, *base, "--budget", "5%"), "top-k")
    _one_line_refusal(*run_cli(capsys, *base, "--shape", "olmoe-1b-7b"), "config.json has")
    _one_line_refusal(*run_cli(capsys, *base, "--plot", tmp_path / "p.png"), "--layers-series")
    _one_line_refusal(*run_cli(capsys, *base, "--layers-series", "1/2,x"), "--layers-series")
    _one_line_refusal(*run_cli(capsys, *base, "--compute-layers", "2,a"), "--compute-layers")

    broken = tmp_path / "broken"
    shutil.copytree(sparse_ckpt, broken)
    shard = sorted(broken.glob("*.safetensors"))[0]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    args = ["bench", "scale", "--checkpoint", broken, "--workdir", work, "--no-accelerate"]
    _one_line_refusal(*run_cli(capsys, *args), shard.name)
    shard.unlink()
    _one_line_refusal(*run_cli(capsys, *args), shard.name)
    assert not (tmp_path / "p.png").exists()
    assert list(work.iterdir()) == []  # no cache, copy or result left behind


def test_not_enough_disk(capsys, tmp_path, sparse_ckpt, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 10**6, 10**6))
    work = tmp_path / "work"
    code, out, err = run_cli(capsys, "bench", "scale", "--shape", "olmoe-1b-7b", "--layers", "2",
                             "--workdir", work, "--no-accelerate")  # fmt: skip
    _one_line_refusal(code, out, err, "not enough disk")
    code, out, err = run_cli(capsys, "bench", "scale", "--checkpoint", sparse_ckpt, "--workdir", work,
                             "--layers-series", "1/2,all", "--no-accelerate")  # fmt: skip
    _one_line_refusal(code, out, err, "not enough disk", "2-layer copy")
    assert [p.name for p in work.iterdir()] == []


def _fake_point(settings: ScaleBenchSettings, layers: int) -> dict:
    """What bench_scale returns, with costs growing with the layers (the series only tabulates them)."""
    import dataclasses

    return {
        "shape": settings.shape, "layers": layers, "budget": settings.budget, "checkpoint_bytes": layers * 10**9,
        "bytes_read_per_decode_token": layers * 10**8, "s_per_token": 0.1 * layers,
        "bound_tokens_per_s": 1 / (0.08 * layers), "bound_fraction": 0.8, "peak_rss_bytes": 2 * 10**9,
        "peak_rss_limit_bytes": 3 * 10**9, "speedup_vs_accelerate_end_to_end": 4.0 if layers < 4 else None,
        "tokens_per_s_accelerate": 1.0 if layers < 4 else None, "peak_rss_bytes_accelerate": 5 * 10**9,
        "accelerate_not_run": None if layers < 4 else "its float32 offload folder needs more disk",
        "settings": json.loads(json.dumps(dataclasses.asdict(settings))),
    }  # fmt: skip


def test_series_reuses_points_and_writes_table_and_plot(tmp_path, monkeypatch):
    runs = []

    def fake_bench(settings, *, workdir, checkpoint=None, keep=False):
        runs.append(settings.layers)
        return _fake_point(settings, settings.layers)

    monkeypatch.setattr(scale_series, "bench_scale", fake_bench)
    settings = ScaleBenchSettings(layers=4, widths=shapes.TINY_WIDTHS["deepseek-v2-lite"], accelerate=True)
    plot = tmp_path / "out" / "growth.png"
    result = bench_scale_series(
        settings, spec="1/2,all", workdir=tmp_path / "w", plot=plot, log=lambda _: None
    )
    assert runs == [2, 4]
    assert plot.read_bytes().startswith(PNG_MAGIC) and result["plot"] == str(plot)
    assert [p.name for p in plot.parent.iterdir()] == ["growth.png"]  # no temporary file left
    assert result["accelerate_largest"]["layers"] == 2
    table = format_series_table(result).splitlines()
    assert table[0].split()[:4] == ["layers", "budget", "model", "GB"] and len(table) == 4  # 2 rows, a note
    assert "accelerate at 4 layers: not run" in table[-1]

    result = bench_scale_series(
        settings, spec="1/2,all", workdir=tmp_path / "w", plot=plot, log=lambda _: None
    )
    assert runs == [2, 4] and [p["layers"] for p in result["points"]] == [2, 4]  # both reused
    result = bench_scale_series(settings, spec="1/2,all,1/2@50%", workdir=tmp_path / "w", plot=plot,
                                log=lambda _: None)  # fmt: skip
    assert runs == [2, 4, 2]  # only the new budget runs; the others are reused
    assert [(p["layers"], p["budget"]) for p in result["points"]] == [(2, "25%"), (4, "25%"), (2, "50%")]
    no_baseline = ScaleBenchSettings(**{**settings.__dict__, "accelerate": False})
    bench_scale_series(no_baseline, spec="all", workdir=tmp_path / "w", plot=plot, log=lambda _: None)
    assert runs == [2, 4, 2]  # the same measurement, with or without the accelerate baseline
    changed = ScaleBenchSettings(**{**settings.__dict__, "prompts": 3})
    bench_scale_series(changed, spec="all", workdir=tmp_path / "w", plot=plot, log=lambda _: None)
    assert runs == [2, 4, 2, 4]  # other settings: run again


@pytest.mark.slow
def test_series_runs_on_a_tiny_copy(tmp_path):
    """The real thing on a 2-layer tiny copy: offload run, compute fit on reduced copies, table + PNG."""
    settings = ScaleBenchSettings(
        shape="deepseek-v2-lite", layers=2, budget="50%", widths=shapes.TINY_WIDTHS["deepseek-v2-lite"],
        prompts=1, prompt_len=5, new_tokens=3, accelerate=False, compute_from="reduced",
        compute_layers=(2, 3), bandwidth_bytes=1 << 20,
    )  # fmt: skip
    work, plot = tmp_path / "w", tmp_path / "g.png"
    result = bench_scale_series(settings, spec="all", workdir=work, plot=plot, log=lambda _: None)
    (point,) = result["points"]
    assert point["layers"] == 2 and point["store"] == "checkpoint"
    assert point["prefill_bytes_read"] > 0 and point["decode_tokens"] == 2
    fit = point["compute_fit"]
    assert [n for n, _ in fit["points"]] == [2, 3] and all(s > 0 for _, s in fit["points"])
    expected = fit["intercept_s"] + 2 * fit["per_layer_s"]
    assert point["compute_s_per_token"] == pytest.approx(expected)
    assert point["bound_tokens_per_s"] == pytest.approx(
        1 / (expected + point["bytes_read_per_decode_token"] / point["cold_bandwidth_bytes_per_s"])
    )
    assert point["peak_rss_within_limit"] is True
    assert plot.read_bytes().startswith(PNG_MAGIC)
    assert sorted(p.name for p in work.iterdir()) == ["compute_fit.json", "series"]  # copies deleted


def test_disk_check_skips_copies_already_there(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 10**6, 10**6))
    monkeypatch.setattr(scale_series, "bench_scale", lambda s, **kw: _fake_point(s, s.layers))
    settings = ScaleBenchSettings(layers=4, widths=shapes.TINY_WIDTHS["deepseek-v2-lite"])
    work = tmp_path / "w"
    (work / "deepseek-v2-lite-2l").mkdir(parents=True)
    (work / "deepseek-v2-lite-2l" / "config.json").write_text("{}")  # written before, e.g. by --write-only
    with pytest.raises(UsageError, match="4-layer copy"):
        bench_scale_series(
            settings, spec="1/2,all", workdir=work, plot=tmp_path / "g.png", log=lambda _: None
        )
    result = bench_scale_series(
        settings, spec="1/2", workdir=work, plot=tmp_path / "g.png", log=lambda _: None
    )
    assert [p["layers"] for p in result["points"]] == [2]
