"""The profiler against an independent count, selection rule, merging, traces."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from moe_runtime.models import find_moe_layers
from moe_runtime.profiler import ProfileConfig, load_profile, merge_profiles, select_experts, write_profile
from moe_runtime.profiler.run import profile_sequences, token_budget
from moe_runtime.profiler.select import select_layer
from moe_runtime.testing.random_models import build_random_model

FAMILIES = ["qwen2_moe", "deepseek_v2", "deepseek_v3", "gpt_oss", "mixtral", "olmoe"]


def _sequences(n: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 24, (n,), generator=g)
    return [torch.randint(1, vocab, (int(k),), generator=g).tolist() for k in lengths]


def _reference(model, sequences):
    """Counts, gate sums and ids from plain forward hooks, one unpadded example at a time."""
    info = find_moe_layers(model)
    n_layers, n_experts = len(info.layers), info.layers[0].num_experts
    counts = np.zeros((n_layers, n_experts), dtype=np.int64)
    gates = np.zeros((n_layers, n_experts))
    ids: list[list[np.ndarray]] = [[] for _ in info.layers]
    hooks = []
    for row, layer in enumerate(info.layers):

        def hook(_module, args, _out, row=row):
            index, weights = args[1], args[2]
            ids[row].append(index.numpy().copy())
            for e, w in zip(index.reshape(-1).tolist(), weights.reshape(-1).tolist()):
                counts[row, e] += 1
                gates[row, e] += w

        hooks.append(layer.experts.register_forward_hook(hook))
    with torch.no_grad():
        for seq in sequences:
            model(torch.tensor([seq]))
    for h in hooks:
        h.remove()
    return counts, gates, [np.concatenate(parts) for parts in ids]


def _model(family: str, seed: int = 0):
    model = build_random_model(family, seed=seed, dtype=torch.float64)
    model.set_experts_implementation("eager")
    return model.eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_profile_equals_independent_count(family):
    model = _model(family)
    sequences = _sequences(11, model.config.vocab_size, seed=1)
    ref_counts, ref_gates, ref_ids = _reference(model, sequences)
    meta, profiles = profile_sequences(
        model, {"t": sequences}, ProfileConfig(batch_size=4, trace=True, progress=False)
    )
    got = profiles["t"]
    np.testing.assert_array_equal(got.counts, ref_counts)
    # some routers compute weights in float32 (deepseek), so sums agree to float32 precision
    np.testing.assert_allclose(got.gate_sums, ref_gates, rtol=1e-6, atol=1e-6)
    assert got.tokens == sum(map(len, sequences))
    assert meta.top_k == find_moe_layers(model).layers[0].top_k
    for layer_trace, ref in zip(got.trace, ref_ids):
        assert layer_trace.dtype == np.uint8
        np.testing.assert_array_equal(layer_trace.astype(np.int64), ref)
    np.testing.assert_array_equal(got.seq_lengths, [len(s) for s in sequences])
    # token scores sum to 1 per layer (no sentinel ids in a stock model)
    np.testing.assert_allclose(got.token_scores(meta.top_k).sum(axis=1), 1.0, rtol=1e-12)


def test_token_budget_cuts_and_counts():
    seqs = [[1] * 10, [2] * 10, [3] * 10]
    kept = token_budget(seqs, 25, 8)
    assert sum(map(len, kept)) == 24 and all(len(s) <= 8 for s in kept)
    kept = token_budget(seqs, 13, 100)
    assert [len(s) for s in kept] == [10, 3]
    assert token_budget(seqs, None, 4) == [[1] * 4, [2] * 4, [3] * 4]


def test_max_tokens_is_respected():
    model = _model("qwen2_moe")
    sequences = _sequences(20, model.config.vocab_size, seed=2)
    _, profiles = profile_sequences(model, {"t": sequences}, ProfileConfig(max_tokens=50, progress=False))
    assert profiles["t"].tokens == 50
    top_k = model.config.num_experts_per_tok
    assert profiles["t"].counts.sum(axis=1).tolist() == [50 * top_k] * len(profiles["t"].counts)


def _naive_select(scores: dict[int, float], p: float) -> list[int]:
    order = sorted(scores, key=lambda e: (-scores[e], e))
    out, total = [], 0.0
    for e in order:
        out.append(e)
        total += scores[e]
        if total >= p:
            break
    return out


def test_selection_includes_the_crossing_expert():
    scores = {0: 0.05, 1: 0.4, 2: 0.3, 3: 0.25}
    assert select_layer(scores, 0.2) == [1]  # 0.4 crosses 0.2 at once
    assert select_layer(scores, 0.5) == [1, 2]  # 0.4 < 0.5, 0.7 crosses
    assert select_layer(scores, 0.7) == [1, 2]  # reaching exactly counts as reaching
    assert select_layer(scores, 1.0) == [1, 2, 3, 0]
    assert select_layer({0: 0.1, 1: 0.0}, 0.5) == [0]  # zero-score experts never selected
    assert select_layer({3: 0.2, 1: 0.2, 2: 0.6}, 0.7) == [2, 1]  # ties by expert id


@pytest.mark.parametrize("score", ["token", "gate"])
def test_select_experts_follows_cumulative_rule(tmp_path, score):
    model = _model("deepseek_v2")
    meta, profiles = profile_sequences(
        model, {"t": _sequences(12, model.config.vocab_size, 3)}, ProfileConfig(progress=False)
    )
    write_profile(tmp_path / "p", meta, profiles, plots=False)
    summary = json.loads((tmp_path / "p" / "t" / "summary.json").read_text())
    p = 0.3
    selected = select_experts(summary, score, p)
    assert set(selected) == {str(layer) for layer in meta.layers}
    for layer, chosen in selected.items():
        table = {int(e): v for e, v in summary[f"{score}_scores"][layer].items()}
        assert chosen == _naive_select(table, p)
        assert sum(table[e] for e in chosen) >= p - 1e-12 or len(chosen) == sum(v > 0 for v in table.values())
        assert sum(table[e] for e in chosen[:-1]) < p


def test_summary_scores_match_definitions(tmp_path):
    model = _model("olmoe")
    seqs = _sequences(9, model.config.vocab_size, 4)
    meta, profiles = profile_sequences(model, {"t": seqs}, ProfileConfig(progress=False))
    write_profile(tmp_path / "p", meta, profiles, plots=False)
    summary = json.loads((tmp_path / "p" / "t" / "summary.json").read_text())
    counts, gates, _ = _reference(model, seqs)
    tokens = sum(map(len, seqs))
    for row, layer in enumerate(meta.layers):
        token = np.array([summary["token_scores"][str(layer)][str(e)] for e in range(meta.num_experts)])
        gate = np.array([summary["gate_scores"][str(layer)][str(e)] for e in range(meta.num_experts)])
        np.testing.assert_allclose(token, counts[row] / (tokens * meta.top_k), rtol=1e-12)
        np.testing.assert_allclose(gate, gates[row] / tokens, rtol=1e-6, atol=1e-9)


def test_merge_equals_profile_of_union(tmp_path):
    model = _model("qwen2_moe")
    a, b = _sequences(7, model.config.vocab_size, 5), _sequences(6, model.config.vocab_size, 6)
    config = ProfileConfig(batch_size=3, trace=True, progress=False)
    meta, pa = profile_sequences(model, {"t": a, "only_a": a}, config)
    _, pb = profile_sequences(model, {"t": b}, config)
    _, whole = profile_sequences(model, {"t": a + b}, config)
    write_profile(tmp_path / "a", meta, pa, plots=False)
    write_profile(tmp_path / "b", meta, pb, plots=False)
    merge_profiles([tmp_path / "a", tmp_path / "b"], tmp_path / "m")
    _, merged = load_profile(tmp_path / "m")
    np.testing.assert_array_equal(merged["t"].counts, whole["t"].counts)
    np.testing.assert_allclose(merged["t"].gate_sums, whole["t"].gate_sums, rtol=1e-6)
    assert merged["t"].tokens == whole["t"].tokens
    for x, y in zip(merged["t"].trace, whole["t"].trace):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(merged["only_a"].counts, pa["only_a"].counts)


def test_profile_files_and_plots(tmp_path):
    model = _model("mixtral")
    meta, profiles = profile_sequences(
        model,
        {"x": _sequences(5, model.config.vocab_size, 7), "y": _sequences(5, model.config.vocab_size, 8)},
        ProfileConfig(progress=False),
    )
    report = write_profile(tmp_path / "p", meta, profiles)
    assert "mean pairwise Jaccard" in report
    for name in ("x", "y"):
        for f in ("summary.json", "counts.json", "heatmap.png"):
            assert (tmp_path / "p" / name / f).stat().st_size > 0
    overview = json.loads((tmp_path / "p" / "overview.json").read_text())
    assert len(overview["jaccard"]) == 2 and overview["jaccard"][0][0] == 1.0
    assert (tmp_path / "p" / "overlap.png").read_bytes()[:4] == b"\x89PNG"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers
