"""The trace simulator: its LRU equals a straightforward LRU, and the CLI replays a real trace."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moe_runtime.cli import main
from moe_runtime.runtime.offload.simulate import replay


def reference_lru(trace, slots: int, tokens_per_step: int) -> tuple[int, int]:
    """Per layer a recency list; a miss evicts the least recent expert the step does not need."""
    hits = misses = 0
    caches = [[] for _ in trace]
    for start in range(0, len(trace[0]), tokens_per_step):
        for layer, ids in enumerate(trace):
            needed = sorted(set(ids[start : start + tokens_per_step].reshape(-1).tolist()))
            cache = caches[layer]
            for expert in needed:
                if expert in cache:
                    hits += 1
                    cache.remove(expert)
                else:
                    misses += 1
                    if len(cache) == slots:
                        cache.remove(next(e for e in cache if e not in needed))
                cache.append(expert)
    return hits, misses


@pytest.mark.parametrize("seed", range(6))
def test_simulator_lru_matches_reference(seed):
    rng = np.random.default_rng(seed)
    num_experts, top_k, layers = int(rng.integers(6, 20)), int(rng.integers(1, 4)), int(rng.integers(1, 4))
    tokens_per_step = int(rng.integers(1, 3))
    slots = int(rng.integers(top_k * tokens_per_step, num_experts + 1))
    skew = rng.dirichlet(np.full(num_experts, 0.3))  # skewed routing, so that hits happen
    trace = [
        np.stack([rng.choice(num_experts, top_k, replace=False, p=skew) for _ in range(300)])
        for _ in range(layers)
    ]
    stats = replay(trace, list(range(layers)), num_experts, slots, "lru", tokens_per_step=tokens_per_step)
    assert (stats.hits, stats.misses) == reference_lru(trace, slots, tokens_per_step)
    assert stats.hits > 0


def test_simulator_policies_and_passes():
    rng = np.random.default_rng(0)
    trace = [rng.integers(0, 8, size=(200, 2)) for _ in range(3)]
    scores = {layer: {e: float(e) for e in range(8)} for layer in range(3)}
    for policy in ("lfu", "profile", "lru+trajectory", "profile+trajectory"):
        stats = replay(trace, [0, 1, 2], 8, 2, policy, scores=scores, tokens_per_step=4)
        assert stats.hits + stats.misses > 0 and stats.passes >= 3 * 50


def test_simulate_cli(capsys, moe_checkpoint, task_files, tmp_path):
    args = ["profile", "--model", moe_checkpoint, "--out", tmp_path / "prof", "--trace", "--no-plots"]
    for name, path in task_files.items():
        args += ["--task", f"{name}={path}"]
    assert main([str(a) for a in args]) == 0
    code = main(
        ["simulate", "--trace", str(tmp_path / "prof"), "--budget", "50%", "--json", str(tmp_path / "s.json")]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    result = json.loads((tmp_path / "s.json").read_text())
    assert set(result["policies"]) >= {"lru", "lfu", "profile", "lru+trajectory"}
    assert all(0 <= row["hit_rate"] <= 1 for row in result["policies"].values())
    assert "lru" in out
    bad_args = [
        (["--budget", "2GB"], "--budget 2GB"),
        (["--budget", "1%"], "--budget"),
        (["--budget", "150%"], "--budget '150%'"),
        (["--budget", "abc"], "--budget 'abc'"),
        (["--budget", "50%", "--policy", "mru"], "--policy 'mru'"),
        (["--budget", "50%", "--policy", "lru+"], "--policy 'lru+'"),
    ]
    for bad, message in bad_args:
        capsys.readouterr()
        assert main(["simulate", "--trace", str(tmp_path / "prof"), *bad]) == 2
        err = capsys.readouterr().err
        assert message in err and "--expert-budget" not in err, err
    assert main(["simulate", "--trace", str(tmp_path / "prof"), "--budget", "50%", "--policy", "lru"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rate = lines[2].split()[1]
    assert lines[1].index("hit rate") + len("hit rate") == lines[2].index(rate) + len(rate)  # columns aligned
    assert lines[2].split()[-1] == "n/a"  # no prefetcher, no prefetch accuracy
    assert main(["simulate", "--trace", str(tmp_path), "--budget", "50%"]) == 2
    assert "error" in capsys.readouterr().err
    _check_bad_traces(capsys, tmp_path / "prof")


def _check_bad_traces(capsys, profile):
    """Corrupt or inconsistent trace.npz files: exit 2 with one line naming the file and the problem."""
    import shutil

    task = next(p for p in sorted(profile.iterdir()) if (p / "trace.npz").exists())
    with np.load(task / "trace.npz") as data:
        good = {k: data[k] for k in data.files}
    first = next(k for k in good if k.startswith("layer_"))
    cases = {
        "empty file": b"",
        "cut short": (task / "trace.npz").read_bytes()[:100],
        "random bytes": bytes(range(256)) * 4,
        "no array": {k: v for k, v in good.items() if k != first},
        "1-D": {**good, first: good[first].reshape(-1)},
        "shorter layer": {**good, first: good[first][:-1]},
        "expert ids outside": {**good, first: good[first].astype(np.int64) + 1000},
        "seq_lengths": {**good, "seq_lengths": good["seq_lengths"] + 1},
    }
    for name, content in cases.items():
        bad = profile.parent / "bad_prof"
        shutil.rmtree(bad, ignore_errors=True)
        shutil.copytree(profile, bad)
        target = bad / task.name / "trace.npz"
        if isinstance(content, bytes):
            target.write_bytes(content)
        else:
            target.unlink()
            np.savez(target, **content)
        code = main(["simulate", "--trace", str(bad), "--budget", "50%"])
        err = capsys.readouterr().err
        assert code == 2, name
        assert "trace.npz" in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, (
            name,
            err,
        )


@pytest.mark.parametrize("policy", ["lru", "lfu", "lru+trajectory"])
def test_simulator_replays_the_runtime_exactly(tmp_path, policy):
    """Replaying a served run's routing gives the runtime's own hits and misses (same bookkeeping)."""
    import torch
    from helpers.checkpoints import save_checkpoint

    from moe_runtime.models import state_of
    from moe_runtime.runtime import DecodeConfig, MultiAdapterEngine, Request
    from moe_runtime.runtime.generation import left_pad
    from moe_runtime.runtime.offload import OffloadConfig
    from moe_runtime.runtime.offload.simulate import replay_steps

    path = save_checkpoint(tmp_path / "ckpt", "mixtral", dtype=torch.float32, num_hidden_layers=3)
    name, _, prefetch = policy.partition("+")
    config = OffloadConfig(
        budget="25%", policy=name, prefetch=(prefetch,) if prefetch else (), cache_dir=str(tmp_path / "cache")
    )
    engine = MultiAdapterEngine.from_pretrained(path, offload=config)
    steps, first = [], engine.info.layers[0].index

    def record(layer, hidden, top_k_index, top_k_weights):
        if layer.index == first:
            steps.append([])
        steps[-1].append(top_k_index.numpy().copy())

    for layer in engine.info.layers:
        state_of(layer.experts).observers.append(record)
    prompts = ["the quick brown fox jumps", "seven wizards", "def return for in range"]
    engine.generate([Request(prompt=p, id=i) for i, p in enumerate(prompts)], DecodeConfig(max_new_tokens=8))
    served = engine.offload.stats
    valid = left_pad([engine.tokenizer(p)["input_ids"] for p in prompts], 0)[1].reshape(-1).bool().numpy()
    steps[0] = [ids[valid] for ids in steps[0]]  # the prefill's left padding reads no expert
    replayed = replay_steps(steps, engine.info.layer_indices, 8, engine.offload.num_slots, policy)
    counters = ("hits", "misses", "passes", "prefetches", "prefetch_hits")
    assert [getattr(replayed, c) for c in counters] == [getattr(served, c) for c in counters]
    assert served.hits > 0 and served.passes > len(steps) * 3  # prefills needed several passes
