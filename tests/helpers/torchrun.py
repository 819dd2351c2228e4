"""Launch the CLI under torchrun from a test."""

from __future__ import annotations

import os


def run_torchrun(args: list, nproc: int = 2, timeout: int = 900):
    """Run ``moe-runtime ARGS`` under torchrun with ``nproc`` CPU processes (one thread each)."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    cmd += ["-m", "moe_runtime", *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
