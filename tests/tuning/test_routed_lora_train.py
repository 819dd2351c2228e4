"""Each routed-LoRA variant (the built-in ones and those of variant folders: mola, dynmole) trains on
the embedded demo model: held-out loss goes down, every base
tensor stays bit-identical, and the adapter's own weights (and only those) move."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moe_runtime.data import read_examples
from moe_runtime.demo.tasks import write_tasks
from moe_runtime.models import find_moe_layers, load_model, load_tokenizer, pad_token_id
from moe_runtime.profiler import select_experts
from moe_runtime.tuning import apply_adapter
from moe_runtime.tuning.data import encode_examples
from moe_runtime.tuning.esft import ExpertSelection
from moe_runtime.tuning.evaluate import mean_token_loss
from moe_runtime.tuning.registry import TuneJob
from moe_runtime.tuning.routed_lora import RoutedLora, RoutedLoraSettings, plan_layers, tune_routed_lora
from moe_runtime.tuning.trainer import TrainConfig

PROFILE = Path(__file__).parents[2] / "profiles" / "demo" / "arith" / "summary.json"


def _settings(variant: str) -> RoutedLoraSettings:
    if variant == "esft-lora":
        chosen = select_experts(json.loads(PROFILE.read_text()), "token")
        return RoutedLoraSettings(
            variant=variant, experts=ExpertSelection({int(k): v for k, v in chosen.items() if v})
        )
    if variant == "perft-r":
        return RoutedLoraSettings(variant=variant, layers="all:2,3-5:4")  # more experts in higher layers
    return RoutedLoraSettings(variant=variant)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    files = write_tasks(tmp_path_factory.mktemp("tasks"))
    tokenizer = load_tokenizer("demo")
    train = read_examples(files["arith_train"])[:64]
    test = read_examples(files["arith_test"])[:48]
    return tokenizer, encode_examples(tokenizer, train, 128), test


@pytest.mark.parametrize(
    "variant", ["perft-r", "perft-e", "esft-lora", "perft-s", "perft-d", "mola", "dynmole"]
)
def test_variant_trains_only_its_own_weights(tmp_path, task, variant):
    tokenizer, features, test = task
    model = load_model("demo", dtype="float32")
    info = find_moe_layers(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    base_loss = mean_token_loss(model, tokenizer, test)[0]
    settings = _settings(variant)
    config = TrainConfig(steps=25, lr=3e-3, batch_size=8, seed=0, max_length=128)
    job = TuneJob(
        model, info, features, config, out=tmp_path / "ad", pad_id=pad_token_id(tokenizer), progress=False
    )
    summary = tune_routed_lora(job, settings)
    for key, value in model.state_dict().items():  # the base never moves
        assert torch.equal(value, before[key]), key
    initial = RoutedLora(
        info, settings, plan_layers(settings, info), dtype=torch.float32, seed=config.seed
    ).tensors()
    saved = load_file(tmp_path / "ad" / "adapter.safetensors")
    assert saved.keys() == initial.keys()
    assert summary["trainable_params"] == sum(t.numel() for t in saved.values())
    for key, value in saved.items():
        assert not torch.equal(value, initial[key]), f"{key} did not train"
    tuned_loss = mean_token_loss(apply_adapter(model, tmp_path / "ad"), tokenizer, test)[0]
    assert tuned_loss < base_loss * 0.97, (variant, base_loss, tuned_loss)
