"""Read bandwidth of the expert loader: both backends, buffered and O_DIRECT, cold and warm cache.

    file      one file of `size_mb` MiB (a temporary one unless --path names an existing file)
    baseline  one thread reading the file front to back with readinto, same cache state
    loader    the file read as expert-sized chunks (`chunk_mb`), `in_flight` tickets at a time
              into a pool of destination tensors, by each backend x {buffered, O_DIRECT}
    cold      page cache dropped before each run (sync + /proc/sys/vm/drop_caches as root,
              else posix_fadvise(DONTNEED) on the file); warm: the file read once just before

Run (not wired into the CLI):
    PYTHONPATH=. OMP_NUM_THREADS=1 python -m moe_runtime.bench.loader_bench --size-mb 256 --repeats 3
Prints a JSON dict; every GB/s figure comes with its ratio to the baseline of the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ..ops.loader import ExpertLoader, aligned_empty, cpp_loader_available

__all__ = ["bench_loader", "drop_page_cache"]

_MIB = 1 << 20


def drop_page_cache(path: Path) -> str:
    """Evicts the file from the page cache; returns the method used ("drop_caches" or "fadvise")."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return "drop_caches"
    except OSError:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        return "fadvise"


def _warm(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(16 * _MIB):
            pass


def _baseline(path: Path, chunk: int) -> float:
    """Seconds for one thread to read the whole file with readinto."""
    buffer = bytearray(chunk)
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buffer):
            pass
    return time.perf_counter() - start


def _loader_run(loader: ExpertLoader, path: Path, size: int, chunk: int, pool: list[torch.Tensor]) -> float:
    """Seconds to read the file as chunks, len(pool) tickets in flight."""
    tickets: list[int] = []
    start = time.perf_counter()
    for i, offset in enumerate(range(0, size, chunk)):
        if len(tickets) >= len(pool):
            loader.wait(tickets[-len(pool)])  # the buffer about to be reused is free again
        tickets.append(
            loader.submit(path, [(offset, min(chunk, size - offset))], pool[i % len(pool)], priority=1)
        )
    for ticket in tickets[-len(pool) :]:
        loader.wait(ticket)
    return time.perf_counter() - start


def bench_loader(
    *,
    path: Path | None = None,
    size_mb: int = 256,
    chunk_mb: int = 16,
    num_threads: int = 2,
    in_flight: int = 4,
    repeats: int = 3,
    backends: tuple[str, ...] = ("cpp", "python"),
) -> dict:
    """Measures loader bandwidth against a plain sequential read of the same file.

    Args:
        path: Existing file to read (its size is used); None writes a temporary random file.
        size_mb: Size of the temporary file in MiB.
        chunk_mb: Bytes per ticket in MiB (about one expert of a mid-size MoE).
        num_threads: Loader threads.
        in_flight: Tickets in flight (destination buffers in the pool).
        repeats: Runs per configuration; medians are reported.
        backends: Loader backends to measure ("cpp" is skipped when not built).

    Returns:
        {"config": ..., "baseline_gbps": {cold, warm}, "runs": [{backend, direct_io, cache,
        gbps, vs_baseline, staged_bytes (of the last run)}, ...]}.
    """
    chunk = chunk_mb * _MIB
    with tempfile.TemporaryDirectory() as scratch:  # TMPDIR picks the file system
        if path is None:
            path = Path(scratch) / "experts.bin"
            with open(path, "wb") as f:
                for offset in range(0, size_mb * _MIB, 16 * _MIB):
                    f.write(os.urandom(min(16 * _MIB, size_mb * _MIB - offset)))
        size = path.stat().st_size
        pool = [aligned_empty(chunk) for _ in range(in_flight)]  # O_DIRECT reads land in place
        for tensor in pool:
            tensor.fill_(0)  # fault the pages in outside the timed runs
        backends = tuple(b for b in backends if b != "cpp" or cpp_loader_available())
        method = ""
        times: dict[tuple, list[float]] = {}
        staged: dict[tuple, int] = {}
        for _ in range(repeats):
            for cache in ("cold", "warm"):
                configs = [("baseline", False)] + [(b, d) for b in backends for d in (False, True)]
                for backend, direct_io in configs:
                    if cache == "cold":
                        method = drop_page_cache(path)
                    else:
                        _warm(path)
                    if backend == "baseline":
                        seconds = _baseline(path, chunk)
                    else:
                        with ExpertLoader(num_threads, direct_io=direct_io, backend=backend) as loader:
                            seconds = _loader_run(loader, path, size, chunk, pool)
                            staged[(backend, direct_io)] = loader.stats()["staged_bytes"]
                    times.setdefault((backend, direct_io, cache), []).append(seconds)
    gbps = {key: size / statistics.median(values) / 1e9 for key, values in times.items()}
    baseline = {cache: gbps[("baseline", False, cache)] for cache in ("cold", "warm")}
    runs = [
        {
            "backend": backend,
            "direct_io": direct_io,
            "cache": cache,
            "gbps": round(value, 3),
            "vs_baseline": round(value / baseline[cache], 3),
            "staged_bytes": staged[(backend, direct_io)],
        }
        for (backend, direct_io, cache), value in gbps.items()
        if backend != "baseline"
    ]
    return {
        "config": {
            "bytes": size,
            "chunk_bytes": chunk,
            "num_threads": num_threads,
            "in_flight": in_flight,
            "repeats": repeats,
            "cold_cache_method": method,
        },
        "baseline_gbps": {cache: round(value, 3) for cache, value in baseline.items()},
        "runs": runs,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", type=Path, help="existing file to read (default: a temporary random file)")
    parser.add_argument("--size-mb", type=int, default=256)
    parser.add_argument("--chunk-mb", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--in-flight", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backends", default="cpp,python")
    args = parser.parse_args(argv)
    result = bench_loader(
        path=args.path,
        size_mb=args.size_mb,
        chunk_mb=args.chunk_mb,
        num_threads=args.threads,
        in_flight=args.in_flight,
        repeats=args.repeats,
        backends=tuple(args.backends.split(",")),
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
