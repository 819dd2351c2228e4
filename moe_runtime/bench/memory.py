"""Process memory figures for benchmarks that run each configuration in its own child process."""

from __future__ import annotations

import resource
from pathlib import Path

__all__ = ["peak_rss_bytes"]


def peak_rss_bytes() -> int:
    """Peak resident set size of this process image, in bytes.

    Reads ``VmHWM`` from ``/proc/self/status``: the high-water mark of this address space, which
    starts afresh at ``exec``. ``getrusage().ru_maxrss`` does not: a child started by fork + exec
    keeps the parent's high-water mark, so a benchmark child of a large process (pytest, the CLI
    after other work) would report at least the parent's size. Falls back to ``ru_maxrss`` where
    ``/proc`` is missing.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
