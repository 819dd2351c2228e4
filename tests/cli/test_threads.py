"""``--threads``: one thread policy set at the CLI's edge, reaching torch and the offload tier."""

from __future__ import annotations

import pytest
import torch

from moe_runtime.cli import build_parser, main
from moe_runtime.cli._common import physical_cores

VERBS = {
    "generate": ["--model", "demo", "--prompt", "x"],
    "serve": ["--model", "demo"],
    "profile": ["--model", "demo", "--task", "a=a.jsonl", "--out", "o"],
    "tune": ["--model", "demo", "--data", "d.jsonl", "--method", "esft", "--out", "o"],
    "eval": ["--model", "demo", "--data", "d.jsonl"],
    "bench": ["offload"],
}


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_every_compute_verb_takes_threads(verb):
    args = build_parser().parse_args([verb, *VERBS[verb], "--threads", "3"])
    assert args.threads == 3


@pytest.mark.parametrize("value", ["0", "-2", "two"])
def test_bad_thread_counts_exit_2_with_one_line(value, capsys):
    assert main(["generate", "--model", "demo", "--prompt", "x", "--threads", value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--threads" in err[0]


def _record(seen):
    def run(args):
        seen.append((args.threads, torch.get_num_threads()))
        return 0

    return run


def test_threads_reach_torch_and_are_restored(monkeypatch):
    import moe_runtime.cli.generate as generate

    seen: list = []
    monkeypatch.setattr(generate, "run", _record(seen))
    before = torch.get_num_threads()
    target = 1 if before != 1 else 2
    assert main(["generate", "--model", "demo", "--prompt", "x", "--threads", str(target)]) == 0
    assert seen == [(target, target)]
    assert torch.get_num_threads() == before
    # default: the physical cores
    assert main(["generate", "--model", "demo", "--prompt", "x"]) == 0
    assert seen[-1] == (physical_cores(), physical_cores())
    assert torch.get_num_threads() == before


def test_offload_tier_computes_with_the_same_threads():
    from moe_runtime.cli.generate import _offload_config

    args = build_parser().parse_args(
        ["generate", "--model", "demo", "--prompt", "x", "--offload", "disk", "--threads", "1"]
    )
    assert _offload_config(args).resolved_compute_threads() == 1
    args.threads = 2
    assert _offload_config(args).resolved_compute_threads() == 2
