"""``bench scale --layers-series``: the same bench at fractions of one shape's layers (cost growth).

    spec "1/4,1/2,all" -> layer counts of the checkpoint (at least 2 each)
    per count          -> bench_scale on a reduced copy of the shape (written into the work directory,
                          deleted after its run unless ``keep``) or, for "all", the checkpoint given;
                          its JSON kept in ``work/series/`` and reused by a later series with the same
                          settings (points can be run one by one, then assembled)
    compute fit        -> shared by every point (``work/compute_fit.json``)
    table + PNG        -> layers, model GB, bytes missed per decoded token, s/token (measured and
                          bound), peak RSS; cost per token against bytes missed and against model size

Free disk is checked first for the largest reduced copy (copies are written one at a time).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from fractions import Fraction
from pathlib import Path

from ..errors import UsageError
from ..io import atomic_write_json
from .scale_bench import ScaleBenchSettings, bench_scale, check_shape

__all__ = ["bench_scale_series", "format_series_table", "series_layers", "write_growth_plot"]

_DISK_MARGIN = 10**9


def series_layers(spec: str, total: int) -> list[int]:
    """Layer counts of ``spec`` ("1/4,1/2,all", fractions or whole counts) of a ``total``-layer model.

    Raises:
        UsageError: an entry that is neither "all", a fraction in (0, 1] nor a count in [2, total].
    """
    counts = []
    for item in spec.split(","):
        item = item.strip()
        try:
            if item == "all":
                value = Fraction(1)
            elif "/" in item or "." in item:
                value = Fraction(item)
                if not 0 < value <= 1:
                    raise ValueError
            else:
                value = Fraction(int(item), total)
                if not 2 <= int(item) <= total:
                    raise ValueError
        except (ValueError, ZeroDivisionError):
            raise UsageError(
                f"--layers-series '{spec}': '{item}' is not 'all', a fraction in (0, 1] or a layer count "
                f"from 2 to {total}"
            ) from None
        counts.append(max(2, min(total, int(value * total + Fraction(1, 2)))))
    return sorted(set(counts))


def _point_file(work: Path, shape: str, layers: int) -> Path:
    return work / "series" / f"{shape}-{layers}l.json"


def _same_settings(point: dict, settings: ScaleBenchSettings) -> bool:
    return point.get("settings") == json.loads(json.dumps(dataclasses.asdict(settings)))


def bench_scale_series(
    settings: ScaleBenchSettings,
    *,
    spec: str,
    workdir: str | Path,
    checkpoint: str | Path | None = None,
    keep: bool = False,
    plot: str | Path,
    log=print,
) -> dict:
    """Run :func:`bench_scale` at each layer count of ``spec``; returns ``{"points": [...], ...}``.

    Raises:
        UsageError: a bad spec, a checkpoint of another shape, or not enough disk for the largest copy.
    """
    from ..testing.shapes import checkpoint_bytes, shape_config

    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    if checkpoint is not None:
        total = check_shape(Path(checkpoint), settings)
    else:
        total = shape_config(settings.shape, layers=settings.layers)["num_hidden_layers"]
    counts = series_layers(spec, total)
    todo = []
    for layers in counts:
        point_settings = dataclasses.replace(settings, layers=layers)
        file = _point_file(work, settings.shape, layers)
        if file.is_file() and _same_settings(json.loads(file.read_text()), point_settings):
            continue
        todo.append(layers)
    written = [n for n in todo if not (checkpoint is not None and n == total)]
    if written:
        largest = max(written)
        need = checkpoint_bytes(shape_config(settings.shape, layers=largest, **(settings.widths or {})))
        free = shutil.disk_usage(work).free
        if need + _DISK_MARGIN > free:
            raise UsageError(
                f"not enough disk in '{work}' for the {largest}-layer copy: it needs {need / 1e9:.2f} GB "
                f"(+{_DISK_MARGIN / 1e9:.0f} GB margin), {free / 1e9:.2f} GB free"
            )
    points = []
    for layers in counts:
        point_settings = dataclasses.replace(settings, layers=layers)
        file = _point_file(work, settings.shape, layers)
        if layers not in todo:
            log(f"layers {layers}: reusing {file}")
            points.append(json.loads(file.read_text()))
            continue
        log(f"layers {layers}: running")
        ckpt = checkpoint if checkpoint is not None and layers == total else None
        result = bench_scale(point_settings, workdir=work, checkpoint=ckpt, keep=keep)
        atomic_write_json(file, result)
        points.append(result)
    out = {"shape": settings.shape, "layers_total": total, "spec": spec, "points": points}
    out["accelerate_largest"] = _largest_accelerate(points)
    out["plot"] = str(write_growth_plot(points, plot))
    return out


def _largest_accelerate(points: list[dict]) -> dict | None:
    ran = [p for p in points if p.get("tokens_per_s_accelerate")]
    if not ran:
        return None
    p = max(ran, key=lambda p: p["layers"])
    return {
        "layers": p["layers"],
        "speedup_vs_accelerate_end_to_end": p["speedup_vs_accelerate_end_to_end"],
        "peak_rss_bytes_accelerate": p["peak_rss_bytes_accelerate"],
    }


def _row(p: dict) -> dict:
    bound = p["bound_tokens_per_s"]
    return {
        "layers": p["layers"],
        "model GB": p["checkpoint_bytes"] / 1e9,
        "missed MB/token": p["bytes_read_per_decode_token"] / 1e6,
        "s/token": p["s_per_token"],
        "bound s/token": 1 / bound if bound else None,
        "fraction": p["bound_fraction"],
        "peak RSS GB": p["peak_rss_bytes"] / 1e9,
        "RSS limit GB": p["peak_rss_limit_bytes"] / 1e9,
        "vs accelerate": p.get("speedup_vs_accelerate_end_to_end"),
    }


def format_series_table(result: dict) -> str:
    """The growth table, one row per layer count."""
    rows = [_row(p) for p in result["points"]]
    names = list(rows[0])

    def cell(value) -> str:
        if value is None:
            return "-"
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    widths = [max(len(n), *(len(cell(r[n])) for r in rows)) for n in names]
    lines = ["  ".join(n.rjust(w) for n, w in zip(names, widths))]
    lines += ["  ".join(cell(r[n]).rjust(w) for n, w in zip(names, widths)) for r in rows]
    for p in result["points"]:
        if p.get("accelerate_not_run"):
            lines.append(f"accelerate at {p['layers']} layers: not run ({p['accelerate_not_run']})")
    return "\n".join(lines)


def write_growth_plot(points: list[dict], path: str | Path) -> Path:
    """Seconds per decoded token against bytes missed per token and against model size, atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    rows = sorted((_row(p) for p in points), key=lambda r: r["layers"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for ax, x_name, label in (
        (axes[0], "missed MB/token", "bytes missed per decoded token (MB)"),
        (axes[1], "model GB", "model size on disk (GB)"),
    ):
        xs = [r[x_name] for r in rows]
        ax.plot(xs, [r["s/token"] for r in rows], "o-", label="measured")
        ax.plot(xs, [r["bound s/token"] for r in rows], "s--", mfc="none", label="bound (compute + reads)")
        for r, x in zip(rows, xs):
            ax.annotate(f"{r['layers']} layers", (x, r["s/token"]), textcoords="offset points", xytext=(4, 4))
        ax.set_xlabel(label)
        ax.set_ylabel("seconds per decoded token")
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
    shape = points[0]["shape"] if points else ""
    fig.suptitle(f"bench scale: {shape}, cost per token as layers grow")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=110)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
    return path
