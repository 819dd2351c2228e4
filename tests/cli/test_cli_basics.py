"""The CLI skeleton: help with examples for every verb, exit codes, verbs not built yet."""

from __future__ import annotations

import subprocess
import sys

import pytest

from moe_runtime.cli import build_parser, main

VERBS = ["demo", "demo-model", "profile", "select", "tune", "eval", "generate", "simulate", "bench"]


@pytest.mark.parametrize("verb", VERBS)
def test_help_has_examples(capsys, verb):
    with pytest.raises(SystemExit) as exc:
        main([verb, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and f"moe-runtime {verb}" in out


def test_every_contract_verb_is_registered():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "verb")
    assert set(VERBS) <= set(sub.choices)


def test_usage_errors_are_one_line_exit_2(capsys):
    assert main(["profile", "--out", "x", "--bogus"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--bogus" in err
    assert main(["nosuchverb"]) == 2


def test_console_script_runs():
    result = subprocess.run(
        [sys.executable, "-m", "moe_runtime", "--version"], capture_output=True, text=True
    )
    assert result.returncode == 0 and result.stdout.startswith("moe-runtime ")
