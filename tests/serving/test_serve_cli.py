"""``moe-runtime serve`` refuses bad flags with exit 2 and one line, before loading the model."""

from __future__ import annotations

import socket

import pytest

from moe_runtime.cli import main


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--adapter", "auto=x"], "--adapter 'auto': the name 'auto' is reserved"),
        (["--adapter", "base=x"], "--adapter 'base': the name is reserved"),
        (["--adapter", "noequals"], "expected NAME=DIR"),
        (["--port", "70000"], "--port 70000: not a port number"),
        (["--api-key", ""], "--api-key must not be empty"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be positive"),
        (["--expert-budget", "10%"], "go with --offload disk or cpu"),
        (["--allow-base-mismatch"], "--allow-base-mismatch goes with --adapter"),
    ],
)
def test_bad_flags_exit_2(capsys, argv, message):
    assert main(["serve", "--model", "demo", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_a_busy_port_exits_2_before_the_model_loads(capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--model", "/nonexistent/model", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and err.count("\n") == 1, err


def test_the_api_key_comes_from_the_flag_or_the_environment(monkeypatch):
    from moe_runtime.cli import build_parser
    from moe_runtime.cli.serve import API_KEY_ENV, _check_args

    parse = build_parser().parse_args
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    args = parse(["serve", "--model", "demo"])
    _check_args(args)
    assert args.api_key is None
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    args = parse(["serve", "--model", "demo"])
    _check_args(args)
    assert args.api_key == "from-env"
    args = parse(["serve", "--model", "demo", "--api-key", "from-flag"])
    _check_args(args)
    assert args.api_key == "from-flag"
