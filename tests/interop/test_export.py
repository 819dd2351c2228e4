"""``moe-runtime export``: the merged checkpoint, loaded by plain transformers in a process that never
imports moe_runtime, gives the logits and greedy tokens of the adapter served by our engine (ESFT)
or applied to the base (LoRA, merged by peft).

Families: mixtral, qwen2_moe, deepseek_v2, olmoe, qwen3_moe (per-expert tensors on disk,
``experts.<e>.w1`` or ``experts.<e>.gate_proj``), gpt_oss (fused ``experts.gate_up_proj`` with
biases on disk) and granitemoe (fused, stored as ``input_linear`` / ``output_linear``), each in
float32 and bfloat16. Tolerances on logits: float32 atol/rtol 1e-4; bfloat16 atol/rtol 1e-2 (a
few bf16 ulps: the engine and transformers sum the experts in different orders).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers.checkpoints import make_tokenizer
from helpers.peft_adapters import write_peft_adapter
from helpers.serving import make_adapter, make_esft_lora_adapter
from safetensors import safe_open

from moe_runtime.cli import main
from moe_runtime.models import find_moe_layers, load_model
from moe_runtime.runtime import DecodeConfig, MultiAdapterEngine, Request
from moe_runtime.testing import build_random_model
from moe_runtime.tuning.adapters import apply_adapter

TOL = {torch.float32: {"atol": 1e-4, "rtol": 1e-4}, torch.bfloat16: {"atol": 1e-2, "rtol": 1e-2}}
# (family, adapter kind): esft and esft-lora-merge (served by the engine), lora (ours, peft files +
# metadata), peft (peft's only)
CASES = [
    ("mixtral", "esft"),
    ("qwen2_moe", "esft"),
    ("gpt_oss", "esft"),
    ("deepseek_v2", "esft"),
    ("granitemoe", "esft"),
    ("olmoe", "lora"),
    ("qwen3_moe", "peft"),
    ("mixtral", "esft-lora-merge"),
    ("gpt_oss", "esft-lora-merge"),
]
SERVED = ("esft", "esft-lora-merge")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
NEW_TOKENS = 5
PROMPTS = [[5, 17, 40, 99, 23, 8, 61], [12, 3, 77]]

# Runs in a fresh interpreter without moe_runtime on the path: plain transformers only.
PLAIN = textwrap.dedent(
    """
    import json, sys, torch
    from transformers import AutoModelForCausalLM
    jobs = json.loads(open(sys.argv[1]).read())
    results = {}
    for job in jobs:
        model = AutoModelForCausalLM.from_pretrained(job["dir"], local_files_only=True).eval()
        rows = []
        for prompt in job["prompts"]:
            ids = torch.tensor([prompt])
            with torch.no_grad():
                logits = model(ids).logits[0].float()
                out = model.generate(ids, max_new_tokens=job["new"], do_sample=False, min_new_tokens=job["new"])
            rows.append({"logits": logits, "tokens": out[0, len(prompt):].tolist(), "dtype": str(model.dtype)})
        results[job["dir"]] = rows
    assert "moe_runtime" not in sys.modules
    torch.save(results, sys.argv[2])
    """
)


def _key_dtypes(directory: Path) -> dict[str, str]:
    found = {}
    for file in directory.glob("*.safetensors"):
        with safe_open(str(file), "pt") as handle:
            names = handle.keys()
            found.update({key: handle.get_slice(key).get_dtype() for key in names})
    return found


def _reference(base: Path, adapter: Path, kind: str) -> list[dict]:
    """Per prompt: logits and greedy tokens from our engine (esft) or the peft-merged model (lora)."""
    model = load_model(base)
    if kind in SERVED:
        engine = MultiAdapterEngine(model)
        engine.add_adapter("a", adapter)
        requests = [Request(p, "a") for p in PROMPTS]
        logits = engine.prompt_logits(requests)
        done = engine.generate(requests, DecodeConfig(max_new_tokens=NEW_TOKENS))
        engine.close()
        return [{"logits": lg.float(), "tokens": c.token_ids} for lg, c in zip(logits, done)]
    merged = apply_adapter(model, adapter)
    rows = []
    for prompt in PROMPTS:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            logits = merged(ids).logits[0].float()
            out = merged.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, min_new_tokens=NEW_TOKENS)
        rows.append({"logits": logits, "tokens": out[0, len(prompt) :].tolist()})
    return rows


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Every (family, dtype) exported through the CLI, then loaded by one plain-transformers process."""
    root = tmp_path_factory.mktemp("export")
    tokenizer_dir = root / "tokenizer"
    tokenizer = make_tokenizer(tokenizer_dir)
    cases = {}
    for family, kind in CASES:
        for dtype_name, dtype in DTYPES.items():
            case = root / f"{family}-{kind}-{dtype_name}"
            base = case / "base"

            def build(family=family, dtype=dtype):
                return build_random_model(family, seed=1, dtype=dtype, vocab_size=len(tokenizer))

            model = build()
            model.config.eos_token_id = model.config.pad_token_id = tokenizer.eos_token_id
            model.save_pretrained(base)
            for file in tokenizer_dir.iterdir():
                shutil.copy(file, base / file.name)
            if kind in SERVED:
                info = find_moe_layers(model)
                layers = info.layer_indices
                experts = {layers[0]: [0, 2, 5], layers[-1]: [1, 6]}
                make = make_adapter if kind == "esft" else make_esft_lora_adapter
                extra = {"scale": 1.0} if kind == "esft" else {}
                seed = 3 if kind == "esft" else 5
                adapter = make(model, case / "adapter", experts, seed=seed, info=info, **extra)
            else:
                adapter = write_peft_adapter(
                    lambda base=base: load_model(base),
                    case / "adapter",
                    seed=3,
                    ours=kind == "lora",
                    rank_pattern={"layers.1.mlp.experts.down_proj": 2},
                )
            out = case / "merged"
            assert main(["export", "--model", str(base), "--adapter", str(adapter), "--out", str(out),
                         "--max-shard-size", "150KB"]) == 0  # fmt: skip
            cases[(family, kind, dtype_name)] = (base, adapter, out, kind)
    jobs = [{"dir": str(out), "prompts": PROMPTS, "new": NEW_TOKENS} for _, _, out, _ in cases.values()]
    (root / "jobs.json").write_text(json.dumps(jobs))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run(
        [sys.executable, "-c", PLAIN, str(root / "jobs.json"), str(root / "plain.pt")],
        cwd=root, env=env, check=True, timeout=600,
    )  # fmt: skip
    return cases, torch.load(root / "plain.pt")


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize(("family", "kind"), CASES, ids=[f"{f}-{k}" for f, k in CASES])
def test_exported_checkpoint_equals_the_served_adapter(exported, family, kind, dtype_name):
    cases, plain = exported
    base, adapter, out, kind = cases[(family, kind, dtype_name)]
    # the family's own layout and the stored dtype, several shards and an index, tokenizer and configs
    assert _key_dtypes(out) == _key_dtypes(base)
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    assert set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]) == set(
        _key_dtypes(base)
    )
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).is_file(), name
    rows = plain[str(out)]
    reference = _reference(base, adapter, kind)
    base_model = load_model(base)
    for row, ref, prompt in zip(rows, reference, PROMPTS):
        assert row["dtype"] == f"torch.{dtype_name}"
        torch.testing.assert_close(row["logits"], ref["logits"], **TOL[DTYPES[dtype_name]])
        assert row["tokens"] == ref["tokens"]
        with torch.no_grad():  # the adapter matters: the base model's logits are far from these
            base_logits = base_model(torch.tensor([prompt])).logits[0].float()
        error = (row["logits"] - ref["logits"]).abs().max()
        assert (base_logits - ref["logits"]).abs().max() > max(10 * error, 1e-2)
