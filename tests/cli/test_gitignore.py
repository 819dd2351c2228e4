"""The demo's default working folder is ignored by git, so running the Quickstart leaves a clean tree."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from moe_runtime.cli import build_parser

ROOT = Path(__file__).parents[2]


@pytest.mark.skipif(
    shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs a git checkout"
)
def test_demo_workdir_is_ignored():
    workdir = build_parser().parse_args(["demo"]).workdir
    probe = f"{workdir}/profile/overlap.png"
    result = subprocess.run(["git", "check-ignore", "-q", probe], cwd=ROOT)
    assert result.returncode == 0, f"{probe} is not ignored"
