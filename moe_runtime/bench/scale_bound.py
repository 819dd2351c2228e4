"""The analytic bound of ``bench scale``: cold read bandwidth and resident compute time per token.

bandwidth    the checkpoint's shards read in order from a cold page cache, twice: through the
             loader (reader threads, 16 MiB requests) and dd-like (one thread, 16 MiB reads)
compute fit  resident decode seconds per token on reduced-layer copies of the same shape (same
             widths), a least-squares line in the layer count, read at the full layer count
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from ..io import atomic_write_json
from .offload_bench import drop_page_cache

__all__ = ["cold_bandwidth", "compute_fit", "fits_resident"]

_CHUNK = 16 << 20
_LOAD_OVERHEAD = 1.15  # resident load peak / weights (#19), plus the runtime below
_RUNTIME_BYTES = 6 * 10**8


def _read_loader(files: list[Path], limit: int) -> float:
    """Seconds to read ``limit`` bytes of ``files`` in order through the loader (16 MiB requests)."""
    import torch

    from ..ops.loader import ExpertLoader

    buffers = [torch.empty(_CHUNK, dtype=torch.uint8) for _ in range(4)]
    total, start = 0, time.perf_counter()
    with ExpertLoader(2) as loader:
        pending = []
        for file in files:
            size = file.stat().st_size
            for offset in range(0, size, _CHUNK):
                if total >= limit:
                    break
                nbytes = min(_CHUNK, size - offset)
                if len(pending) == len(buffers):
                    loader.wait(pending.pop(0))
                buffer = buffers[(total // _CHUNK) % len(buffers)]
                pending.append(loader.submit(file, [(offset, nbytes)], buffer, 0))
                total += nbytes
        for ticket in pending:
            loader.wait(ticket)
    return time.perf_counter() - start


def _read_plain(files: list[Path], limit: int) -> float:
    """Seconds to read ``limit`` bytes of ``files`` in order, dd-like: one thread, 16 MiB reads."""
    buffer = memoryview(bytearray(_CHUNK))
    total, start = 0, time.perf_counter()
    for file in files:
        with open(file, "rb", buffering=0) as f:
            while total < limit:
                n = f.readinto(buffer[: min(_CHUNK, limit - total)])
                if not n:
                    break
                total += n
    return time.perf_counter() - start


def cold_bandwidth(ckpt: Path, nbytes: int) -> dict:
    """Cold sequential reads of the shards (``nbytes`` each way), page cache dropped before each."""
    from ..models.checkpoint_files import safetensors_files

    files = safetensors_files(ckpt)
    total = min(nbytes, sum(f.stat().st_size for f in files))
    drop_page_cache(files)
    loader_s = _read_loader(files, total)
    drop_page_cache(files)
    plain_s = _read_plain(files, total)
    drop_page_cache(files)
    return {
        "bytes": total,
        "loader_bytes_per_s": total / loader_s,
        "dd_bytes_per_s": total / plain_s,
        "bandwidth_bytes_per_s": max(total / loader_s, total / plain_s),
    }


def _resident_bytes(config: dict, compute_dtype: str) -> int:
    """Weights of ``config`` in the compute dtype ("auto": float32, the CPU's choice for bf16 storage)."""
    import torch

    from ..testing.shapes import checkpoint_bytes

    dtype = torch.float32 if compute_dtype == "auto" else getattr(torch, compute_dtype)
    return checkpoint_bytes(config, dtype)


def fits_resident(weights: int, settings) -> bool:
    """A resident run of ``weights`` bytes (compute dtype) fits the RSS limit and the available memory."""
    import psutil

    need = _LOAD_OVERHEAD * weights + _RUNTIME_BYTES
    return need <= min(settings.rss_limit, 0.8 * psutil.virtual_memory().available)


def _line(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares ``(a, b)`` of seconds = a + b * layers."""
    if len(points) == 1:
        layers, seconds = points[0]
        return 0.0, seconds / layers
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    b = sum((x - mean_x) * (y - mean_y) for x, y in points) / sum((x - mean_x) ** 2 for x, _ in points)
    return mean_y - b * mean_x, b


def compute_fit(
    settings, work: Path, threads: int, run_resident: Callable[[Path], dict], *, keep: bool = False
) -> dict | None:
    """Resident decode seconds per token on reduced copies of the shape, as a line in the layer count.

    Copies of ``settings.compute_layers`` layers (same widths) are written into ``work`` (reused if
    there) and served resident by ``run_resident(copy)`` (a child process with ``threads`` compute
    threads, one request at a time: ``decode_forward_s`` per decoded token); the median
    decode forward of each is a point. A copy whose resident run would not fit is skipped. Cached in
    ``work/compute_fit.json`` for the same shape, workload and threads.

    Returns:
        ``{"points": [[layers, s/token], ...], "intercept_s", "per_layer_s", "skipped"}``, or None
        when no copy fits.
    """
    from ..testing.shapes import shape_config, write_checkpoint

    key = {
        "shape": settings.shape,
        "widths": settings.widths,
        "compute_layers": list(settings.compute_layers),
        "compute_dtype": settings.compute_dtype,
        "threads": threads,
        "workload": [settings.prompts, settings.prompt_len, settings.new_tokens, settings.seed],
    }
    cache_file = work / "compute_fit.json"
    if cache_file.is_file():
        cached = json.loads(cache_file.read_text())
        if cached.get("key") == key:
            return cached
    points, skipped = [], []
    for layers in sorted(set(settings.compute_layers)):
        config = shape_config(settings.shape, layers=layers, **(settings.widths or {}))
        weights = _resident_bytes(config, settings.compute_dtype)
        if not fits_resident(weights, settings):
            skipped.append([layers, f"{weights / 1e9:.2f} GB of weights do not fit"])
            continue
        ckpt = work / f"{settings.shape}-{layers}l"
        wrote = not (ckpt / "config.json").exists()
        if wrote:
            write_checkpoint(config, ckpt, seed=settings.seed, progress=True)
        try:
            result = run_resident(ckpt)
            points.append([layers, statistics.median(result["decode_forward_s"])])
        finally:
            if wrote and not keep:
                shutil.rmtree(ckpt, ignore_errors=True)
    if not points:
        return None
    intercept, slope = _line([tuple(p) for p in points])
    fit = {"key": key, "points": points, "intercept_s": intercept, "per_layer_s": slope, "skipped": skipped}
    atomic_write_json(cache_file, fit)
    return fit
