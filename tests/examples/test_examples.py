"""Every script in examples/ runs to completion with small settings (as a user would run it)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


def run_example(name: str, *args: str, timeout: float = 300) -> str:
    env = dict(
        os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")
    )
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_every_example_is_listed_and_tested():
    scripts = sorted(p.name for p in EXAMPLES.glob("*.py"))
    readme = (EXAMPLES / "README.md").read_text()
    source = Path(__file__).read_text()
    for script in scripts:
        assert script in readme, f"{script} is not in examples/README.md"
        assert f'"{script}"' in source, f"{script} has no test here"


def test_offload_budget():
    out = run_example("offload_budget.py", "--budget", "25%", "--tokens", "3", "--requests", "3")
    assert "same tokens as resident  yes" in out
    assert "expert slots per layer   8" in out  # 25% of the demo model's 32 experts


def test_profile_select_tune_serve(tmp_path):
    out = run_example(
        "profile_select_tune_serve.py", "--workdir", str(tmp_path), "--steps", "2", "--max-tokens", "256",
        "--prompts", "2",
    )  # fmt: skip
    assert "4. served 4 requests" in out
    assert (tmp_path / "adapters" / "compare" / "expert_cfg.json").is_file()
    assert (tmp_path / "profile" / "compare" / "summary.json").is_file()
