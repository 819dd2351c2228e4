"""``moe-runtime generate`` through the CLI contract: outputs per request, and bad input -> exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.serving import make_adapter, merged_copy

from moe_runtime.cli import main
from moe_runtime.models import load_model, load_tokenizer
from moe_runtime.testing.random_models import build_random_model

PROMPTS = ["the quick brown fox", "seven wizards", "def return for in range print sum of 12 + 35 =", "oslo"]


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from helpers.checkpoints import save_checkpoint

    return save_checkpoint(tmp_path_factory.mktemp("ckpt"), "qwen2_moe", dtype=torch.float32)


@pytest.fixture(scope="module")
def adapters(checkpoint, tmp_path_factory) -> dict[str, Path]:
    model = load_model(checkpoint)
    root = tmp_path_factory.mktemp("adapters")
    return {
        "a": make_adapter(model, root / "a", {0: [1, 3]}, seed=1, scale=1.0),
        "b": make_adapter(model, root / "b", {0: [2], 1: [0, 5]}, seed=2, scale=1.0),
    }


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_requests_to_output(capsys, tmp_path, checkpoint, adapters):
    rows = [
        {"id": "q0", "prompt": PROMPTS[0], "adapter": "a", "max_new_tokens": 5},
        {"id": 1, "prompt": PROMPTS[1], "adapter": None, "max_new_tokens": 3},
        {"id": "q2", "prompt": PROMPTS[2], "adapter": "b"},
        {"prompt": PROMPTS[3], "adapter": "a", "max_new_tokens": 1},
    ]
    requests, output = _write(tmp_path / "req.jsonl", rows), tmp_path / "out" / "out.jsonl"
    code, _, err = run_cli(
        capsys, "generate", "--model", checkpoint, "--adapter", f"a={adapters['a']}",
        "--adapter", f"b={adapters['b']}", "--requests", requests, "--output", output, "--max-new-tokens", 4,
    )  # fmt: skip
    assert code == 0, err
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    assert [line["id"] for line in lines] == ["q0", 1, "q2", 4]  # input order; a missing id is the line
    tokenizer = load_tokenizer(checkpoint)
    for row, line in zip(rows, lines):
        assert set(line) == {"id", "adapter", "completion", "token_ids"}
        assert line["adapter"] == row["adapter"]
        assert len(line["token_ids"]) <= row.get("max_new_tokens", 4)
        model = merged_copy(
            lambda: load_model(checkpoint), adapters[row["adapter"]] if row["adapter"] else None
        )
        prompt = tokenizer(row["prompt"], return_tensors="pt")["input_ids"]
        expected = model.generate(prompt, max_new_tokens=row.get("max_new_tokens", 4), do_sample=False)
        assert line["token_ids"] == expected[0, prompt.shape[1] :].tolist(), row
        assert line["completion"] == tokenizer.decode(line["token_ids"], skip_special_tokens=True)


def test_prompt_and_use(capsys, tmp_path, checkpoint, adapters):
    common = ["generate", "--model", checkpoint, "--adapter", f"a={adapters['a']}", "--max-new-tokens", 6]
    code, out, err = run_cli(capsys, *common, "--prompt", PROMPTS[0], "--use", "a")
    assert code == 0, err
    rows = [{"id": 0, "prompt": PROMPTS[0], "adapter": "a"}]
    output = tmp_path / "o.jsonl"
    assert (
        run_cli(capsys, *common, "--requests", _write(tmp_path / "r.jsonl", rows), "--output", output)[0] == 0
    )
    assert out == json.loads(output.read_text())["completion"] + "\n"
    streamed = run_cli(capsys, *common, "--prompt", PROMPTS[0], "--use", "a", "--stream")
    assert streamed[0] == 0 and streamed[1] == out  # the deltas add up to the same text, one final newline


@pytest.mark.parametrize(
    "case,expect",
    [
        ("unknown_adapter", "req.jsonl:2: adapter 'zzz' is not loaded"),
        ("not_json", "req.jsonl:2: not valid JSON"),
        ("no_prompt", "req.jsonl:1: 'prompt' must be a string"),
        ("bad_limit", "req.jsonl:1: 'max_new_tokens' must be a positive integer"),
        ("unknown_key", "req.jsonl:1: unknown key 'adaptor'"),
        ("missing_dir", "not a directory"),
        ("no_cfg", "no expert_cfg.json"),
        ("other_base", "tuned on different base weights"),
        ("no_output", "--requests needs --output"),
        ("use_unknown", "--use 'zzz': no such --adapter"),
        ("bad_spec", "expected NAME=DIR"),
        ("offload", "working set"),
        ("stream_requests", "--stream goes with --prompt"),
        ("auto_without_profiles", "routing profile"),
    ],
)
def test_bad_input_exit_2_without_output(capsys, tmp_path, checkpoint, adapters, case, expect):
    good = {"id": 0, "prompt": PROMPTS[0], "adapter": "a"}
    rows: list = [good, {"id": 1, "prompt": PROMPTS[1], "adapter": None}]
    spec = f"a={adapters['a']}"
    tail: list = []
    if case == "unknown_adapter":
        rows[1]["adapter"] = "zzz"
    elif case == "not_json":
        rows[1] = '{"prompt": "x",'
    elif case == "no_prompt":
        rows[0] = {"id": 0, "adapter": "a"}
    elif case == "bad_limit":
        rows[0] = {**good, "max_new_tokens": 0}
    elif case == "unknown_key":
        rows[0] = {"prompt": "x", "adaptor": "a"}
    elif case == "missing_dir":
        spec = f"a={tmp_path / 'nowhere'}"
    elif case == "no_cfg":
        (tmp_path / "empty_adapter").mkdir()
        spec = f"a={tmp_path / 'empty_adapter'}"
    elif case == "other_base":
        config = load_model(checkpoint).config
        other = build_random_model("qwen2_moe", seed=7, vocab_size=config.vocab_size)
        spec = f"a={make_adapter(other, tmp_path / 'other', {0: [1]}, seed=0)}"
    elif case == "bad_spec":
        spec = str(adapters["a"])
    elif case == "offload":
        tail = ["--offload", "cpu", "--expert-budget", "1%"]
    elif case == "stream_requests":
        tail = ["--stream"]
    elif case == "auto_without_profiles":
        rows[1]["adapter"] = "auto"
    requests, output = _write(tmp_path / "req.jsonl", rows), tmp_path / "out.jsonl"
    argv = ["generate", "--model", checkpoint, "--adapter", spec, "--requests", requests, "--output", output]
    if case == "no_output":
        argv = argv[:-2]
    elif case == "use_unknown":
        argv = ["generate", "--model", checkpoint, "--adapter", spec, "--prompt", "x", "--use", "zzz"]
    code, out, err = run_cli(capsys, *argv, *tail)
    assert code == 2, err
    assert expect in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not output.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.jsonl")]
