"""``bench scale --layers-series``: the same bench at fractions of one shape's layers (cost growth).

    spec "1/4,1/2,all" -> layer counts of the checkpoint (at least 2 each)
    per count          -> bench_scale on a reduced copy of the shape (written into the work directory,
                          deleted after its run unless ``keep``) or, for "all", the checkpoint given;
                          its JSON kept in ``work/series/`` and reused by a later series with the same
                          settings, the accelerate baseline aside (points can be run one by one, each
                          with or without the baseline, then assembled)
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

__all__ = ["bench_scale_series", "format_series_table", "series_layers", "series_points", "write_growth_plot"]

_DISK_MARGIN = 10**9


def _fraction_layers(item: str, spec: str, total: int) -> int:
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
    return max(2, min(total, int(value * total + Fraction(1, 2))))


def series_points(spec: str, total: int) -> list[tuple[int, str | None]]:
    """``(layers, budget)`` of each entry of ``spec``: "1/4,1/2,all" (fractions or whole counts of a
    ``total``-layer model, at least 2 layers), an entry optionally at its own budget: "1/4@25%".

    Budget None: the bench's ``--budget``. Sorted, duplicates dropped.

    Raises:
        UsageError: an entry that is neither "all", a fraction in (0, 1] nor a count in [2, total],
            or a budget that does not parse.
    """
    from ..runtime.offload.config import BudgetError, parse_budget

    points = set()
    for entry in spec.split(","):
        item, _, budget = entry.strip().partition("@")
        if budget:
            try:
                parse_budget(budget)
            except BudgetError as exc:
                raise UsageError(f"--layers-series '{spec}': '{entry}': budget {exc.detail}") from None
        points.add((_fraction_layers(item.strip(), spec, total), budget or None))
    return sorted(points, key=lambda p: (p[1] is not None, p[0], p[1] or ""))


def series_layers(spec: str, total: int) -> list[int]:
    """The distinct layer counts of ``spec`` (see :func:`series_points`)."""
    return sorted({layers for layers, _ in series_points(spec, total)})


def _point_file(work: Path, settings: ScaleBenchSettings) -> Path:
    budget = settings.budget.replace("/", "_")
    return work / "series" / f"{settings.shape}-{settings.layers}l-{budget}.json"


_BASELINE_FIELDS = ("accelerate", "accelerate_timeout_s")  # not part of our own measurement


def _same_settings(point: dict, settings: ScaleBenchSettings) -> bool:
    """The point measured ``settings`` (whether the accelerate baseline ran beside it aside)."""
    wanted = json.loads(json.dumps(dataclasses.asdict(settings)))
    stored = dict(point.get("settings") or {})
    for name in _BASELINE_FIELDS:
        stored.pop(name, None)
        wanted.pop(name, None)
    return stored == wanted


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
    """Run :func:`bench_scale` at each entry of ``spec`` (:func:`series_points`).

    Returns:
        ``{"shape", "layers_total", "spec", "budget", "points": [bench_scale results],
        "accelerate_largest", "plot"}``.

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
    entries = [
        dataclasses.replace(settings, layers=layers, budget=budget or settings.budget)
        for layers, budget in series_points(spec, total)
    ]
    reuse = {}
    for entry in entries:
        file = _point_file(work, entry)
        if file.is_file():
            point = json.loads(file.read_text())
            if _same_settings(point, entry):
                reuse[file] = point
    written = [e.layers for e in entries if _point_file(work, e) not in reuse]
    written = [n for n in written if not (checkpoint is not None and n == total)]
    written = [n for n in written if not (work / f"{settings.shape}-{n}l" / "config.json").is_file()]
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
    for entry in entries:
        file = _point_file(work, entry)
        if file in reuse:
            log(f"layers {entry.layers}, budget {entry.budget}: reusing {file}")
            points.append(reuse[file])
            continue
        log(f"layers {entry.layers}, budget {entry.budget}: running")
        ckpt = checkpoint if checkpoint is not None and entry.layers == total else None
        result = bench_scale(entry, workdir=work, checkpoint=ckpt, keep=keep)
        atomic_write_json(file, result)
        points.append(result)
    out = {"shape": settings.shape, "layers_total": total, "spec": spec, "budget": settings.budget}
    out["points"] = points
    out["accelerate_largest"] = _largest_accelerate(points)
    out["plot"] = str(write_growth_plot(points, plot, budget=settings.budget))
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
        "budget": p["budget"],
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


def write_growth_plot(points: list[dict], path: str | Path, *, budget: str | None = None) -> Path:
    """Seconds per decoded token against bytes missed per token and against model size, atomically.

    Points at ``budget`` (default: the first point's) are joined by a line; points at other budgets
    are marked apart (same model size, other bytes missed).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    rows = sorted((_row(p) for p in points), key=lambda r: r["layers"])
    budget = budget or (rows[0]["budget"] if rows else None)
    main = [r for r in rows if r["budget"] == budget]
    other = [r for r in rows if r["budget"] != budget]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for ax, x_name, label in (
        (axes[0], "missed MB/token", "bytes missed per decoded token (MB)"),
        (axes[1], "model GB", "model size on disk (GB)"),
    ):
        xs = [r[x_name] for r in main]
        ax.plot(xs, [r["s/token"] for r in main], "o-", label=f"measured, budget {budget}")
        ax.plot(
            xs, [r["bound s/token"] for r in main], "s--", mfc="none", label="compute + reads / bandwidth"
        )
        if other:
            ax.plot(
                [r[x_name] for r in other], [r["s/token"] for r in other], "D", label="measured, other budget"
            )
            ax.plot(
                [r[x_name] for r in other], [r["bound s/token"] for r in other], "s", mfc="none", color="C1"
            )
        for r in rows:
            tag = f"{r['layers']} layers" + (f" @ {r['budget']}" if r["budget"] != budget else "")
            ax.annotate(tag, (r[x_name], r["s/token"]), textcoords="offset points", xytext=(4, 4))
        ax.set_xlabel(label)
        ax.set_ylabel("seconds per decoded token")
        top = max((v for r in rows for v in (r["s/token"], r["bound s/token"]) if v), default=1.0)
        right = max((r[x_name] for r in rows), default=1.0)
        ax.set_xlim(0, 1.2 * right)
        ax.set_ylim(0, 1.2 * top)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize="small")
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
