"""scripts/gpu_check.sh: its usage errors, and its list of test files against the device-marked tests."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


@pytest.mark.parametrize(
    "args, env, message",
    [
        (["--device", "tpu"], {"OUT": "/tmp/x"}, "usage"),
        (["--bogus"], {"OUT": "/tmp/x"}, "usage"),
        (["--device", "cpu"], {"OUT": ""}, "set OUT"),
    ],
)
def test_usage_errors_exit_2(args, env, message):
    done = subprocess.run(
        ["bash", str(SCRIPT), *args], env={**os.environ, **env}, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 2 and message in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_runs_every_file_with_device_tests():
    listed = re.search(r"DEVICE_TESTS=\(([^)]*)\)", SCRIPT.read_text())
    assert listed is not None
    files = set(listed.group(1).split())
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "--collect-only", "-m", "device", "--device", "cpu", "tests"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:]
    collected = {line.split("::")[0] for line in done.stdout.splitlines() if "::" in line}
    assert collected and collected == files
