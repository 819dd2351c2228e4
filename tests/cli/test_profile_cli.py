"""``profile`` / ``select`` through the CLI contract: outputs, bad input, torchrun."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers.torchrun import run_torchrun

from moe_runtime.cli import main


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _profile_args(checkpoint, task_files, out):
    args = ["profile", "--model", checkpoint, "--out", out, "--batch-size", "4"]
    for name, path in task_files.items():
        args += ["--task", f"{name}={path}"]
    return args


def test_profile_and_select(capsys, tmp_path, moe_checkpoint, task_files):
    code, out, err = run_cli(capsys, *_profile_args(moe_checkpoint, task_files, tmp_path / "prof"), "--trace")
    assert code == 0, err
    assert "mean pairwise Jaccard" in out
    meta = json.loads((tmp_path / "prof" / "meta.json").read_text())
    assert meta["fingerprint"].startswith("sha256:") and set(meta["tasks"]) == {"prose", "qa"}
    summary = json.loads((tmp_path / "prof" / "qa" / "summary.json").read_text())
    assert set(summary) == {"token_scores", "gate_scores"}
    for layer, scores in summary["token_scores"].items():
        assert abs(sum(scores.values()) - 1.0) < 1e-9, layer
    with np.load(tmp_path / "prof" / "qa" / "trace.npz") as trace:
        assert trace["seq_lengths"].sum() == meta["tasks"]["qa"]["tokens"]

    code, out, err = run_cli(
        capsys,
        "select",
        "--profile",
        tmp_path / "prof",
        "--task",
        "qa",
        "--score",
        "gate",
        "--out",
        tmp_path / "cfg.json",
    )
    assert code == 0, err
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["shared_experts"] is False and cfg["non_expert_modules"] is False
    assert set(cfg["experts"]) == set(summary["gate_scores"])
    assert all(isinstance(e, int) for ids in cfg["experts"].values() for e in ids)


def _bad_jsonl(tmp_path: Path) -> Path:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "broken\n')
    return path


@pytest.mark.parametrize(
    "case",
    [
        "malformed",
        "empty",
        "wrong_shape",
        "dense",
        "unreadable_model",
        "missing_model",
        "no_task",
        "bad_max_tokens",
    ],
)
def test_profile_bad_input_exit_2(capsys, tmp_path, moe_checkpoint, dense_checkpoint, task_files, case):
    out = tmp_path / "prof"
    model, tasks = moe_checkpoint, {"prose": task_files["prose"]}
    extra: list[str] = []
    expect = ""
    if case == "malformed":
        tasks = {"bad": _bad_jsonl(tmp_path)}
        expect = "bad.jsonl:2"
    elif case == "empty":
        (tmp_path / "empty.jsonl").write_text("\n")
        tasks, expect = {"e": tmp_path / "empty.jsonl"}, "empty"
    elif case == "wrong_shape":
        (tmp_path / "w.jsonl").write_text('{"txt": 1}\n')
        tasks, expect = {"w": tmp_path / "w.jsonl"}, "w.jsonl:1"
    elif case == "dense":
        model, expect = dense_checkpoint, "llama"
    elif case == "unreadable_model":
        broken = tmp_path / "broken"
        broken.mkdir()
        (broken / "config.json").write_text("{not json")
        model, expect = broken, "config.json"
    elif case == "missing_model":
        model, expect = tmp_path / "nope", "not a directory"
    elif case == "no_task":
        tasks, expect = {}, "--task"
    elif case == "bad_max_tokens":
        extra, expect = ["--max-tokens", "0"], "--max-tokens"
    code, _, err = run_cli(capsys, *_profile_args(model, tasks, out), *extra)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and expect in lines[0], err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".prof")]


def test_select_bad_input_exit_2(capsys, tmp_path, moe_checkpoint, task_files):
    assert (
        run_cli(capsys, *_profile_args(moe_checkpoint, task_files, tmp_path / "prof"), "--no-plots")[0] == 0
    )
    cases = [
        (["--task", "nosuch", "--score", "token"], "nosuch"),
        (["--task", "qa", "--score", "token", "--top-p", "0"], "--top-p"),
        (["--task", "qa", "--score", "token", "--top-p", "1.5"], "--top-p"),
        (["--task", "qa", "--score", "loss"], "--score"),
    ]
    for extra, expect in cases:
        code, _, err = run_cli(
            capsys, "select", "--profile", tmp_path / "prof", "--out", tmp_path / "c.json", *extra
        )
        assert code == 2 and expect in err and len(err.strip().splitlines()) == 1, (extra, err)
        assert not (tmp_path / "c.json").exists()
    code, _, err = run_cli(
        capsys,
        "select",
        "--profile",
        tmp_path,
        "--task",
        "qa",
        "--score",
        "token",
        "--out",
        tmp_path / "c.json",
    )
    assert code == 2 and "meta.json" in err


def test_existing_non_profile_output_is_refused(capsys, tmp_path, moe_checkpoint, task_files):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    code, _, err = run_cli(capsys, *_profile_args(moe_checkpoint, task_files, out))
    assert code == 2 and "not empty" in err
    assert (out / "precious.txt").read_text() == "keep me"


@pytest.mark.slow
@pytest.mark.torchrun
def test_torchrun_two_processes_equal_one(capsys, tmp_path, moe_checkpoint, task_files):
    assert (
        run_cli(
            capsys, *_profile_args(moe_checkpoint, task_files, tmp_path / "one"), "--trace", "--no-plots"
        )[0]
        == 0
    )
    result = run_torchrun(
        [*_profile_args(moe_checkpoint, task_files, tmp_path / "two"), "--trace", "--no-plots"]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for task in task_files:
        one = json.loads((tmp_path / "one" / task / "counts.json").read_text())
        two = json.loads((tmp_path / "two" / task / "counts.json").read_text())
        assert one["counts"] == two["counts"] and one["tokens"] == two["tokens"]
        np.testing.assert_allclose(one["gate_sums"], two["gate_sums"], rtol=1e-6)
        with (
            np.load(tmp_path / "one" / task / "trace.npz") as a,
            np.load(tmp_path / "two" / task / "trace.npz") as b,
        ):
            for key in a.files:
                np.testing.assert_array_equal(a[key], b[key])
