"""Shared fixtures: small random MoE checkpoints with a tokenizer, built here (no hub)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers.checkpoints import WORDS, make_tokenizer, save_checkpoint

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def moe_checkpoint(tmp_path_factory) -> Path:
    """A float64 random qwen2_moe checkpoint (exact routing regardless of batching) + tokenizer."""
    return save_checkpoint(tmp_path_factory.mktemp("qwen2_moe"), "qwen2_moe")


@pytest.fixture(scope="session")
def dense_checkpoint(tmp_path_factory) -> Path:
    """A tiny dense llama checkpoint + tokenizer."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    directory = tmp_path_factory.mktemp("dense")
    tokenizer = make_tokenizer(directory)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    return directory


@pytest.fixture
def task_files(tmp_path) -> dict[str, Path]:
    """Two small JSONL tasks of different shapes."""
    import json

    files = {}
    rows = {
        "prose": [{"text": " ".join(WORDS[i : i + 3 + i % 7])} for i in range(0, 30)],
        "qa": [{"prompt": f"{i} + {i + 1} =", "response": f" {2 * i + 1}"} for i in range(20)],
    }
    for name, lines in rows.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in lines))
        files[name] = path
    return files
