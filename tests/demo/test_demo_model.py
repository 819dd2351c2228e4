"""The embedded demo model: shipped checkpoint, export, tokenizer, deterministic build, task sets."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moe_runtime.demo import checkpoint_dir, write_demo_model
from moe_runtime.demo.corpus import DOMAINS, corpus_stream, is_held_out
from moe_runtime.demo.export import CHECKPOINT_FILES
from moe_runtime.demo.tasks import TASKS, domain_texts, task_examples, write_tasks
from moe_runtime.errors import UsageError

TINY_MODEL = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "moe_intermediate_size": 16,
    "shared_expert_intermediate_size": 32,
    "num_experts": 8,
    "num_experts_per_tok": 2,
}

PLAIN_LOAD = r"""
import json, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
path = sys.argv[1]
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path)
enc = tok("plain: gold ring => cipher:", return_tensors="pt")
out = model.generate(**enc, max_new_tokens=6, do_sample=False)
print(json.dumps({
    "imported_moe_runtime": any(m.split(".")[0] == "moe_runtime" for m in sys.modules),
    "model_type": model.config.model_type,
    "num_experts": model.config.num_experts,
    "completion": tok.decode(out[0, enc["input_ids"].shape[1]:]),
}))
"""


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _plain_load(path: Path, cwd: Path) -> dict:
    """Load and generate with plain transformers in a subprocess that cannot import moe_runtime."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    proc = subprocess.run(
        [sys.executable, "-c", PLAIN_LOAD, str(path)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_shipped_checkpoint_is_complete_small_and_matches_its_build_record():
    path = checkpoint_dir()
    for name in CHECKPOINT_FILES:
        assert (path / name).is_file(), name
    assert sum(p.stat().st_size for p in path.iterdir()) <= 25 * 1024 * 1024
    info = json.loads((path / "build_info.json").read_text())
    assert info["model_sha256"] == _sha256(path / "model.safetensors")
    assert set(info["heldout_loss"]) == set(DOMAINS)
    for key in ("seed", "steps"):
        assert key in info["build_config"]
    for key in ("data_sha256", "wall_time_s", "torch_version", "threads"):
        assert key in info


def test_shipped_checkpoint_loads_and_generates_with_plain_transformers(tmp_path):
    result = _plain_load(checkpoint_dir(), tmp_path)
    assert not result["imported_moe_runtime"]
    assert result["model_type"] == "qwen2_moe"
    assert result["num_experts"] >= 32
    assert result["completion"].strip()


def test_write_demo_model_writes_a_loadable_checkpoint_and_tasks(tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    out = write_demo_model(tmp_path / "demo")
    assert out == tmp_path / "demo"
    for name in CHECKPOINT_FILES:
        assert _sha256(out / name) == _sha256(checkpoint_dir() / name)
    names = {p.stem for p in (out / "tasks").glob("*.jsonl")}
    assert {f"{t}_{s}" for t in TASKS for s in ("train", "test")} | set(DOMAINS) | {"general"} <= names
    assert AutoConfig.from_pretrained(out).model_type == "qwen2_moe"
    assert AutoTokenizer.from_pretrained(out).eos_token == "<|endoftext|>"
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]  # no temp dir left behind


def test_write_demo_model_accepts_empty_dir_and_refuses_non_empty(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    write_demo_model(empty)
    assert (empty / "model.safetensors").is_file()
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    with pytest.raises(UsageError, match="not an empty directory") as err:
        write_demo_model(full)
    assert "\n" not in str(err.value)
    assert [p.name for p in full.iterdir()] == ["keep.txt"]


def test_tokenizer_round_trips_and_adds_no_special_tokens():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(checkpoint_dir())
    assert tok.eos_token == tok.pad_token == "<|endoftext|>"
    assert len(tok) == 1024
    for domain in DOMAINS:
        for text in domain_texts(domain, 5, stream="tokenizer-test"):
            ids = tok(text)["input_ids"]
            assert tok.eos_token_id not in ids
            assert tok.decode(ids) == text
    assert tok.convert_ids_to_tokens(tok("123")["input_ids"]) == ["1", "2", "3"]


def test_pretraining_is_deterministic_on_a_tiny_config(tmp_path):
    from moe_runtime.demo.pretrain import BuildConfig, build

    cfg = BuildConfig(
        steps=6,
        batch_size=4,
        seq_len=64,
        warmup_steps=2,
        vocab_size=400,
        tokenizer_docs=800,
        eval_docs=8,
        model_overrides=TINY_MODEL,
    )
    infos = [build(tmp_path / f"run{i}", cfg, progress=False) for i in range(2)]
    assert infos[0]["model_sha256"] == infos[1]["model_sha256"]
    assert infos[0]["data_sha256"] == infos[1]["data_sha256"]
    assert _sha256(tmp_path / "run0" / "model.safetensors") == _sha256(
        tmp_path / "run1" / "model.safetensors"
    )
    assert _sha256(tmp_path / "run0" / "tokenizer.json") == _sha256(tmp_path / "run1" / "tokenizer.json")


def test_task_files_are_deterministic(tmp_path):
    kwargs = {"n_train": 300, "n_test": 50, "n_text": 30, "n_general_per_domain": 5}
    a = write_tasks(tmp_path / "a", **kwargs)
    b = write_tasks(tmp_path / "b", **kwargs)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].read_bytes() == b[key].read_bytes(), key
    rows = [json.loads(line) for line in a["arith_test"].read_text().splitlines()]
    assert len(rows) == 50 and set(rows[0]) == {"prompt", "response"}
    assert len(a["general"].read_text().splitlines()) == 5 * len(DOMAINS)


def test_task_sets_are_held_out_from_the_corpus():
    pairs = list(itertools.islice(corpus_stream(0), 20000))
    docs = [doc for _, doc in pairs]
    corpus_docs = set(docs)
    corpus_lines = {line for doc in docs for line in doc.split("\n")}
    corpus_text = "\x00".join(docs)
    assert sum("+" in line and "=" in line for line in corpus_lines) > 1000  # the check has teeth
    for task in TASKS:
        splits = task_examples(task, n_train=500, n_test=100)
        train = {r["prompt"] + r["response"] for r in splits["train"]}
        test = {r["prompt"] + r["response"] for r in splits["test"]}
        assert len(train) == 500 and len(test) == 100 and not train & test
        for text in train | test:
            # Single-line tasks must not be a corpus line; kv (multi-line) not even a substring.
            assert text not in (corpus_text if task == "kv" else corpus_lines), (task, text)
    for domain in DOMAINS:
        for text in domain_texts(domain, 50):
            assert text not in corpus_docs
            if domain in ("arith", "cipher", "sort"):
                assert not set(text.split("\n")) & corpus_lines
    # The headroom tasks' formats never occur in pretraining: the base model has to learn them.
    for marker in ("cmp ", "max:", "field of ", "# kind:"):
        assert marker not in corpus_text, marker
    arith_keys = [line.split("=")[0] for d, doc in pairs if d == "arith" for line in doc.split("\n")]
    assert arith_keys and not any(is_held_out(f"arith:{key}") for key in arith_keys)


def test_shipped_model_learned_every_domain():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moe_runtime.demo.pretrain import heldout_loss

    path = checkpoint_dir()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    uniform = math.log(len(tok))
    for domain in DOMAINS:
        loss = heldout_loss(model, tok, domain_texts(domain, 24))
        assert loss < uniform - 3.0, (domain, loss, uniform)
