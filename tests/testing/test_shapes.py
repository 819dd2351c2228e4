"""Random checkpoints of real model shapes: the real configs, the hub's layout, streamed and checked writes."""

from __future__ import annotations

import json
from collections import namedtuple

import pytest
import torch

from moe_runtime.errors import UsageError
from moe_runtime.testing import shapes

# Published total parameter counts (billions), from the model cards / papers.
PUBLISHED = {"olmoe-1b-7b": 6.92, "deepseek-v2-lite": 15.7, "qwen3-30b-a3b": 30.5, "mixtral-8x7b": 46.7}

TINY = shapes.TINY_WIDTHS


@pytest.mark.parametrize("shape", sorted(shapes.SHAPES))
def test_real_configs_have_the_published_sizes(shape):
    config = shapes.shape_config(shape)
    params = sum(spec.numel for spec in shapes.checkpoint_plan(config))
    assert abs(params / 1e9 - PUBLISHED[shape]) < 0.05
    expert_keys = [
        s.name
        for s in shapes.checkpoint_plan(shapes.shape_config(shape, layers=2))
        if ".experts.0." in s.name
    ]
    assert expert_keys, "per-expert tensors, as the hub ships them"


def tiny_checkpoint(tmp_path, shape, **kwargs):
    config = shapes.shape_config(shape, layers=2, **TINY[shape])
    return config, shapes.write_checkpoint(config, tmp_path / shape, shard_bytes=200_000, **kwargs)


@pytest.mark.parametrize("shape", sorted(shapes.SHAPES))
def test_written_checkpoint_loads_in_transformers(tmp_path, shape):
    from transformers import AutoModelForCausalLM

    config, path = tiny_checkpoint(tmp_path, shape)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    for key, value in config.items():
        if key not in ("architectures", "torch_dtype", "rope_scaling") and hasattr(model.config, key):
            assert getattr(model.config, key) == value, key
    assert model.config.num_hidden_layers == 2
    # bf16 storage: every weight is a bf16 value; the seed makes it reproducible
    emb = model.get_input_embeddings().weight
    assert torch.equal(emb, emb.to(torch.bfloat16).float()) and emb.std() > 0
    _, again = tiny_checkpoint(tmp_path / "again", shape)
    first = next(iter(index["weight_map"].values()))
    assert (path / first).read_bytes() == (again / first).read_bytes()


def test_not_enough_disk_is_refused_before_writing(tmp_path, monkeypatch, capsys):
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shapes.shutil, "disk_usage", lambda _: Usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(UsageError, match="not enough disk"):
        tiny_checkpoint(tmp_path, "mixtral-8x7b")
    assert list(tmp_path.iterdir()) == []
    assert shapes.main(["--shape", "olmoe-1b-7b", "--layers", "1", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not enough disk" in err[0]
    from moe_runtime.cli import main

    argv = ["bench", "scale", "--shape", "olmoe-1b-7b", "--layers", "1", "--write-only", str(tmp_path / "y")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not enough disk" in err[0]
    assert list(tmp_path.iterdir()) == []


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(shapes, "_tokenizer_files", boom)
    with pytest.raises(KeyboardInterrupt):
        tiny_checkpoint(tmp_path, "olmoe-1b-7b")
    assert list(tmp_path.iterdir()) == []
