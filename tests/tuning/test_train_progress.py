"""Training shows a progress bar with the loss, never the Trainer's printed log dicts, and can log to a file."""

from __future__ import annotations

import json

import torch

from moe_runtime.data import Example
from moe_runtime.models import find_moe_layers
from moe_runtime.testing.random_models import build_random_model
from moe_runtime.tuning.data import encode_examples
from moe_runtime.tuning.esft import ExpertSelection, tune_esft
from moe_runtime.tuning.registry import TuneJob
from moe_runtime.tuning.trainer import TrainConfig


class _Tok:
    eos_token_id = 1
    pad_token_id = 0

    def __call__(self, text):
        return {"input_ids": [int(t) for t in text.split()]}


def test_progress_bar_and_log_file_instead_of_printed_dicts(capsys, tmp_path):
    g = torch.Generator().manual_seed(0)
    examples = [
        Example(prompt=" ".join(map(str, torch.randint(2, 100, (6,), generator=g).tolist())), response=" 7 8")
        for _ in range(16)
    ]
    model = build_random_model("qwen2_moe", seed=0)
    log = tmp_path / "logs" / "train.jsonl"
    job = TuneJob(
        model,
        find_moe_layers(model),
        encode_examples(_Tok(), examples, 32),
        TrainConfig(steps=4, lr=1e-2, batch_size=8, seed=0),
        out=tmp_path / "adapter",
        pad_id=0,
        work_dir=tmp_path / "work",
        progress=True,
        log_file=log,
    )
    tune_esft(job, ExpertSelection(experts={0: [1]}))
    out, err = capsys.readouterr()
    assert "{'loss'" not in out + err and "'learning_rate'" not in out + err
    assert "train" in err and "4/4" in err  # the bar reached the last step
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [row["step"] for row in rows if "loss" in row] == [1, 2, 3, 4]
    assert any("train_runtime" in row for row in rows)
