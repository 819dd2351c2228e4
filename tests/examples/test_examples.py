"""Every script in examples/ runs to completion with small settings (as a user would run it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moe_runtime.demo import checkpoint_dir

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


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> Path:
    """Three tiny demo adapters (2 ESFT steps each) with routing profiles, shared by the serving examples."""
    out = tmp_path_factory.mktemp("example-adapters")
    printed = run_example("demo_adapters.py", "--out", str(out), "--steps", "2")
    assert printed.splitlines()[-3:] == [f"{t}={out / t}" for t in ("compare", "field", "kind")]
    return out


def test_offload_budget():
    out = run_example("offload_budget.py", "--budget", "25%", "--tokens", "3", "--requests", "3")
    assert "same tokens as resident  yes" in out
    num_experts = json.loads((checkpoint_dir() / "config.json").read_text())["num_experts"]
    assert f"expert slots per layer   {num_experts // 4}" in out  # 25% of the demo model's experts


@pytest.mark.slow
def test_profile_select_tune_serve(tmp_path):
    out = run_example(
        "profile_select_tune_serve.py", "--workdir", str(tmp_path), "--steps", "2", "--max-tokens", "256",
        "--prompts", "2",
    )  # fmt: skip
    assert "4. served 4 requests" in out
    assert (tmp_path / "adapters" / "compare" / "expert_cfg.json").is_file()
    assert (tmp_path / "profile" / "compare" / "summary.json").is_file()


@pytest.mark.slow
def test_stream_many_adapters(adapters):
    out = run_example(
        "stream_many_adapters.py", "--workdir", str(adapters), "--requests", "6", "--tokens", "4"
    )
    assert "2. 6 concurrent streams over 3 adapters + base" in out
    assert "3. streamed tokens equal engine.generate's: yes" in out


@pytest.mark.slow
def test_openai_client(adapters):
    out = run_example("openai_client.py", "--workdir", str(adapters), "--tokens", "4")
    assert "models: base, compare, field, kind, auto" in out
    assert "served by '" in out and "bad request -> HTTP 400" in out


@pytest.mark.slow
def test_serve_load_test(adapters, tmp_path):
    result = tmp_path / "load.json"
    run_example(
        "serve_load_test.py", "--workdir", str(adapters), "--requests", "20", "--clients", "4", "--warmup", "4",
        "--tokens", "6", "--rss-tolerance", "0.25", "--json", str(result),
    )  # fmt: skip
    data = json.loads(result.read_text())
    assert (data["requests"], data["errors"], data["mismatches"]) == (20, 0, 0)
