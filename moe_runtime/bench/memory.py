"""Process memory figures for benchmarks that run each configuration in its own child process."""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = ["peak_rss_bytes", "run_child"]


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


def run_child(
    module: str, bench: str, mode: str, ckpt: Path, settings, cache_dir: Path, env: dict | None = None
) -> dict:
    """Run ``python -m module mode ckpt SETTINGS_JSON cache_dir OUT`` and return the JSON it wrote to OUT.

    Each configuration of a memory benchmark runs in a fresh process so its peak RSS is its own.

    Raises:
        RuntimeError: naming ``bench`` and ``mode``, with the end of the child's stderr.
    """
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        args = [sys.executable, "-m", module, mode, str(ckpt),
                json.dumps(dataclasses.asdict(settings)), str(cache_dir), str(out)]  # fmt: skip
        proc = subprocess.run(args, capture_output=True, text=True, env={**os.environ, **(env or {})})
        if proc.returncode != 0:
            raise RuntimeError(f"bench {bench}: the {mode} run failed:\n{proc.stderr[-4000:]}")
        return json.loads(out.read_text())
