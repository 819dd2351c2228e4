"""The main job end to end (short settings) and demo-model through the CLI."""

from __future__ import annotations

import json
import re

import pytest

from moe_runtime.cli import main
from moe_runtime.demo.tasks import DEMO_TASKS


@pytest.mark.slow
def test_demo_runs_end_to_end(capsys, tmp_path):
    code = main(["demo", "--workdir", str(tmp_path / "w"), "--max-tokens", "1024", "--tune-steps", "3"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "mean pairwise Jaccard" in out and "exact match" in out
    assert "{'loss'" not in out  # a progress bar, not the Trainer's printed log dicts
    # the offloaded serving step reproduces the resident completions exactly
    served = re.search(r"(\d+)/(\d+) completions identical to the resident run", out)
    assert served and served.group(1) == served.group(2), out[-2000:]
    assert (tmp_path / "w" / "profile" / "overlap.png").exists()
    summary = tmp_path / "w" / "summary.png"
    assert summary.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and str(summary) in out
    for task in DEMO_TASKS:
        cfg = json.loads((tmp_path / "w" / f"{task}_experts.json").read_text())
        assert sum(map(len, cfg["experts"].values())) > 0
        assert (tmp_path / "w" / "adapters" / task / "adapter.safetensors").exists()
        log = [
            json.loads(line) for line in (tmp_path / "w" / "logs" / f"{task}.jsonl").read_text().splitlines()
        ]
        assert [row["step"] for row in log if "loss" in row] == [1, 2, 3]
        assert re.search(rf"{task} exact match\s+\d+%\s+\d+%", out), out[-3000:]


def test_demo_bad_flags_exit_2(capsys, tmp_path):
    assert main(["demo", "--workdir", str(tmp_path), "--tune-steps", "0"]) == 2
    assert "--tune-steps" in capsys.readouterr().err


def test_demo_model_refuses_non_empty_out(capsys, tmp_path):
    (tmp_path / "x").write_text("keep")
    assert main(["demo-model", "--out", str(tmp_path)]) == 2
    assert (tmp_path / "x").read_text() == "keep"
