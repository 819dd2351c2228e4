"""``bench esft-quality`` at a tiny size: every method and seed runs, and the summary is consistent."""

from __future__ import annotations

import json
import statistics

import pytest

from moe_runtime.bench.quality_bench import METHODS, QualitySettings, bench_esft_quality, format_table
from moe_runtime.demo.tasks import write_tasks


@pytest.mark.slow
def test_every_method_and_seed_is_run_and_summarized(tmp_path):
    files = write_tasks(tmp_path / "tasks", n_train=16, n_test=2, n_text=2, n_general_per_domain=1)
    settings = QualitySettings(
        steps=1, batch_size=4, seeds=(0, 1), eval_examples=2, other_examples=2, profile_tokens=128
    )
    result = bench_esft_quality(
        "demo",
        {"compare": (files["compare_train"], files["compare_test"])},
        files["general"],
        settings,
        other_tasks={"compare": {"cipher": files["cipher_test"], "kv": files["kv_test"]}},
    )
    json.dumps(result)  # the bench writes it as JSON
    assert {(r["method"], r["seed"]) for r in result["runs"]} == {(m, s) for m in METHODS for s in (0, 1)}
    for method in METHODS:
        entry = result[method]
        runs = [r for r in result["runs"] if r["method"] == method]
        assert entry["task_score"] == pytest.approx(statistics.mean(r["task_score"] for r in runs))
        lo, hi = entry["general_loss_increase_spread"]
        assert lo <= entry["general_loss_increase"] <= hi
        assert entry["other_task_drop"] is not None
    assert (
        result["esft_token"]["trainable_params"]
        < result["lora"]["trainable_params"]
        < result["full"]["trainable_params"]
    )
    assert set(result["base"]["other_tasks"]) == {"cipher", "kv"}
    table = format_table(result)
    assert all(method in table for method in METHODS)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--methods", "full,nope"], "--methods: unknown method 'nope'"),
        (["--lr", "esft_token"], "--lr 'esft_token': expected METHOD=X"),
        (["--lr", "esft_token=fast"], "'fast' is not a number"),
        (["--lr", "full=-1"], "must be positive"),
    ],
)
def test_bad_method_flags_are_refused_before_training(flags, message, capsys):
    from moe_runtime.cli import main

    assert main(["bench", "esft-quality", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_a_method_subset_runs_in_the_canonical_order():
    settings = QualitySettings(methods=("esft_token", "full"))
    assert settings.chosen() == ("full", "esft_token")
    assert QualitySettings().chosen() == METHODS
