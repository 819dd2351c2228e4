"""``export`` never holds the base model whole: it builds the model on the meta device and reads only
what the adapter changes. Checked by recording which parameters are in memory after every read:

- an ESFT adapter with experts in every MoE layer holds at most one layer's fused experts at a time,
  and writes only the tensors of the experts it tuned (per-expert checkpoint);
- a peft LoRA adapter on attention projections only never reads an expert;
- the exported checkpoints equal those of the same merge into the whole model loaded first.

Peak RSS against the checkpoint's size: ``moe-runtime bench export`` (docs/benchmarks.md).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.serving import make_adapter
from safetensors.torch import load_file

from moe_runtime.interop.export import export_merged
from moe_runtime.interop.lazy import LazyCheckpoint
from moe_runtime.models import find_moe_layers, load_model, model_fingerprint
from moe_runtime.testing import build_random_model
from moe_runtime.tuning.meta import write_meta


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("base")
    build_random_model("mixtral", seed=3, num_hidden_layers=3).save_pretrained(directory)
    return directory


@pytest.fixture
def held(monkeypatch) -> list[set[int]]:
    """After every read of the export's model: the MoE layers whose experts are in memory."""
    snapshots: list[set[int]] = []
    materialize = LazyCheckpoint.materialize

    def recording(self, names):
        materialize(self, names)
        snapshots.append(
            {layer.index for layer in self.info.layers if not next(layer.experts.parameters()).is_meta}
        )

    monkeypatch.setattr(LazyCheckpoint, "materialize", recording)
    return snapshots


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(directory.glob("*.safetensors")) for k, v in load_file(f).items()}


def test_an_esft_export_holds_one_layer_of_experts_at_a_time(tmp_path, base, held):
    model = load_model(base)
    info = find_moe_layers(model)
    experts = {layer: [1, 6] for layer in info.layer_indices}
    adapter = make_adapter(model, tmp_path / "esft", experts, seed=2, info=info)
    summary = export_merged(base, adapter, tmp_path / "out", max_shard_bytes=200_000)
    assert max(len(layers) for layers in held) == 1
    assert {i for layers in held for i in layers} == set(info.layer_indices)  # each merged in turn
    assert summary["changed_tensors"] == 3 * sum(len(ids) for ids in experts.values())  # w1, w2, w3 each
    whole = export_merged(base, adapter, tmp_path / "whole", max_shard_bytes=200_000, load_whole=True)
    streamed, loaded = _tensors(tmp_path / "out"), _tensors(tmp_path / "whole")
    assert streamed.keys() == loaded.keys() and all(torch.equal(streamed[k], loaded[k]) for k in streamed)
    assert whole["changed_tensors"] == summary["changed_tensors"]


def test_an_attention_lora_export_never_reads_an_expert(tmp_path, base, held):
    from peft import LoraConfig, get_peft_model

    model = load_model(base)
    fingerprint = model_fingerprint(model)
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    adapter = tmp_path / "lora"
    peft_model.save_pretrained(adapter)
    write_meta(adapter, method="lora", model_type="mixtral", base_fingerprint=fingerprint, lora={"rank": 2})
    summary = export_merged(base, adapter, tmp_path / "out")
    assert held and all(layers == set() for layers in held)
    assert summary["changed_tensors"] == 2 * 3  # q_proj and v_proj of 3 layers
    out, source = _tensors(tmp_path / "out"), _tensors(base)
    assert [k for k in source if not torch.equal(out[k], source[k])] == sorted(
        f"model.layers.{i}.self_attn.{p}_proj.weight" for i in range(3) for p in "qv"
    )


def test_bench_export_runs_and_both_ways_write_the_same_checkpoint(tmp_path):
    from moe_runtime.bench.export_bench import ADAPTERS, bench_export

    result = bench_export(smoke=True, cache_dir=tmp_path)
    assert set(result["adapters"]) == set(ADAPTERS)
    for run in result["adapters"].values():
        assert run["outputs_identical"]
        assert run["shards"] > 1 and run["changed_tensors"] > 0
        assert set(run["peak_rss_bytes"]) == {"streaming", "loaded"}
        assert all(v > result["floor_peak_rss_bytes"] for v in run["peak_rss_bytes"].values())
