"""Shared fixtures: small random MoE checkpoints with a tokenizer, built here (no hub), and the device.

Device: a test that takes the argument ``device`` runs once per device that ``--device`` selects:
``auto`` (the default) runs ``cpu`` and ``cuda``, the CUDA case skipped with a reason where no CUDA
device is usable; ``--device cpu`` runs the cpu cases (and every other test); ``--device cuda`` runs
the cuda cases and deselects the tests without a device, and without a usable CUDA device it is a
usage error (a GPU check never passes by skipping everything). The other tests assume no GPU: on a
GPU machine run them with ``CUDA_VISIBLE_DEVICES=`` (the ``cpu`` offload tier picks a GPU by itself).
A test module that needs a device for its module-scoped fixtures takes ``device`` in them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from helpers.checkpoints import WORDS, make_tokenizer, save_checkpoint

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

DEVICES = ("cpu", "cuda")


def pytest_addoption(parser) -> None:
    parser.addoption(
        "--device",
        choices=("auto", *DEVICES),
        default="auto",
        help="device of the device-parametrized tests: auto (cpu, and cuda where usable), cpu or cuda",
    )


def cuda_usable() -> bool:
    """Whether a CUDA device can run tests (a CUDA build of torch and a visible device)."""
    return torch.cuda.is_available() and torch.cuda.device_count() > 0


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "device: takes the device argument (added by conftest; -m device)")
    if config.getoption("--device") == "cuda" and not cuda_usable():
        raise pytest.UsageError(
            f"--device cuda: no usable CUDA device (torch {torch.__version__}, CUDA {torch.version.cuda})"
        )


def pytest_generate_tests(metafunc) -> None:
    """Parametrizes ``device`` (session scope, so module- and session-scoped fixtures may take it)."""
    if "device" not in metafunc.fixturenames:
        return
    chosen = metafunc.config.getoption("--device")
    names = DEVICES if chosen == "auto" else (chosen,)
    params = []
    for name in names:
        marks = []
        if name == "cuda" and not cuda_usable():
            marks.append(pytest.mark.skip(reason="no usable CUDA device (run with --device cuda on a GPU)"))
        params.append(pytest.param(name, id=name, marks=marks))
    metafunc.parametrize("device", params, scope="session")


def pytest_collection_modifyitems(config, items) -> None:
    """Marks the device-parametrized tests ``device`` (``-m device`` selects them); ``--device cuda``
    runs only those (the GPU check): the others are CPU tests."""
    for item in items:
        if "device" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.device)
    if config.getoption("--device") != "cuda":
        return
    kept = [item for item in items if "device" in getattr(item, "fixturenames", ())]
    deselected = [item for item in items if "device" not in getattr(item, "fixturenames", ())]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = kept


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
