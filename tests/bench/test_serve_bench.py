"""``bench auto-adapter`` and ``bench serve`` end to end on the demo model, tiny sizes.

The six domain adapters are written straight into the bench's ``--work-dir`` (which it reuses): a
random perturbation of a few experts each (the choice of "auto" depends on the routing profile, not on
the adapter's weights) and the base model's real routing profile of the domain's training data, as
``tune`` stores it. So the accuracy checked here is that of the real mechanism: profiles measured by
the profiler, prompts measured during their prefill.
"""

from __future__ import annotations

import json

import pytest
from helpers.serving import make_adapter

from moe_runtime.bench.serve_bench import _domain_data
from moe_runtime.cli import main
from moe_runtime.demo.corpus import DOMAINS
from moe_runtime.demo.tasks import write_tasks
from moe_runtime.models import find_moe_layers, load_model, load_tokenizer
from moe_runtime.profiler import ProfileConfig, profile_model
from moe_runtime.runtime.profiles import RoutingProfile, write_routing_profile


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_bench")
    files = write_tasks(root / "tasks", n_train=64, n_test=8, n_text=64, n_general_per_domain=1)
    model, tokenizer = load_model("demo", dtype="float32"), load_tokenizer("demo")
    info = find_moe_layers(model)
    meta, profiles = profile_model(
        model, tokenizer, _domain_data(files), ProfileConfig(max_tokens=2048, progress=False)
    )
    for i, domain in enumerate(DOMAINS):
        experts = {
            layer: [(i + j) % info.layers[0].num_experts for j in range(2)] for layer in info.layer_indices
        }
        path = make_adapter(model, root / "adapters" / domain, experts, seed=i, scale=0.1, info=info)
        profile = profiles[domain]
        write_routing_profile(
            path, RoutingProfile.from_counts(meta.layers, profile.counts, profile.tokens, domain)
        )
    return root


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_auto_adapter_accuracy(capsys, work, tmp_path):
    out = tmp_path / "auto.json"
    code, text, err = _run(
        capsys, "bench", "auto-adapter", "--work-dir", work, "--auto-prompts", 4, "--json", out
    )
    assert code == 0, err
    result = json.loads(out.read_text())
    assert result["prompts"] == 32 and set(result["per_task"]) == set(result["chosen"])
    # random choice among six adapters scores ~17%; the full bench (25 prompts per task) reaches >= 90%
    assert result["accuracy"] >= 0.75, result["chosen"]
    assert "accuracy" in text


def test_bench_serve_end_to_end(capsys, work, tmp_path):
    out = tmp_path / "serve.json"
    argv = ["bench", "serve", "--work-dir", work, "--requests", 6, "--loads", "1,4", "--serve-tokens", "2,4"]
    code, text, err = _run(capsys, *argv, "--json", out)
    assert code == 0, err
    result = json.loads(out.read_text())
    assert [r["load"] for r in result["rates"]] == [1.0, 4.0]
    for rate in result["rates"]:
        for side in (rate, rate["static"]):
            assert 0 <= side["p50_ttft_s"] <= side["p99_ttft_s"]
            assert side["tokens_per_s"] > 0 and side["tokens_per_s_per_request"] > 0
        assert rate["rate_rps"] > 0 and rate["p99_ttft_speedup"] > 0
    assert result["service_time_s"] > 0 and "moderate" in result and "p99 TTFT" in text
    bad = _run(capsys, "bench", "serve", "--loads", "0,1")
    assert bad[0] == 2 and "--loads" in bad[2]
