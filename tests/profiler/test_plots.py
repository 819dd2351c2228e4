"""Profile plots: one colour scale across tasks, colour bars on the overlap matrices, plots listed."""

from __future__ import annotations

import pytest

from moe_runtime.cli import main
from moe_runtime.profiler import plots, run


def _profile(capsys, checkpoint, task_files, out, *extra):
    argv = ["profile", "--model", str(checkpoint), "--out", str(out), "--batch-size", "4", *extra]
    for name, path in task_files.items():
        argv += ["--task", f"{name}={path}"]
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


@pytest.mark.parametrize("scale", ["shared", "per-task"])
def test_heatmaps_share_one_colour_scale(capsys, monkeypatch, tmp_path, moe_checkpoint, task_files, scale):
    seen: dict[str, tuple[float | None, float]] = {}
    real = plots.plot_heatmap

    def record(scores, layers, selected, title, path, *, vmax=None):
        seen[path.parent.name] = (vmax, float(scores.max()))
        return real(scores, layers, selected, title, path, vmax=vmax)

    monkeypatch.setattr(run, "plot_heatmap", record)
    _profile(capsys, moe_checkpoint, task_files, tmp_path / "prof", "--color-scale", scale)
    assert set(seen) == set(task_files)
    maxima = [peak for _, peak in seen.values()]
    if scale == "shared":
        assert {vmax for vmax, _ in seen.values()} == {max(maxima)}
    else:
        assert all(vmax is None for vmax, _ in seen.values())


def test_profile_lists_the_plots_it_wrote(capsys, tmp_path, moe_checkpoint, task_files):
    out = _profile(capsys, moe_checkpoint, task_files, tmp_path / "prof")
    listed = {line.split("plot:", 1)[1].strip() for line in out.splitlines() if "plot:" in line}
    written = {str(p) for p in (tmp_path / "prof").rglob("*.png")}
    assert written and listed == written
    assert str(tmp_path / "prof" / "overlap.png") in listed


def test_overlap_plot_has_colour_bars(monkeypatch, tmp_path):
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig))
    plots.plot_overlap(["a", "b"], [[1.0, 0.2], [0.2, 1.0]], [[0.0, 0.5], [0.5, 0.0]], tmp_path / "o.png")
    (fig,) = figures
    colorbars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(colorbars) == 2
