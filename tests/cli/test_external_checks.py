"""External checks through the CLI contract: families, inputs and edge cases the unit tests did not
cover, each a regression test for a bug found by driving ``tune`` / ``eval`` / ``generate`` from
outside. References: transformers' own greedy ``generate`` on a merged copy (ESFT) or on the base
model with the routed-LoRA adapter attached by ``eval``'s path (``apply_adapter``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.checkpoints import save_checkpoint
from helpers.serving import make_adapter

from moe_runtime.cli import main
from moe_runtime.models import find_moe_layers, load_model, load_tokenizer
from moe_runtime.tuning import apply_adapter

PROMPTS = ["the quick brown fox", "seven", "def return for in range print sum of 12 + 35 =", "oslo lima"]


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_usage_error(code: int, err: str, expect: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and expect in lines[0] and "Traceback" not in err, err


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def reference_tokens(model, tokenizer, prompt: str, max_new_tokens: int) -> list[int]:
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False
    )
    return out[0, ids.shape[1] :].tolist()


@pytest.fixture(scope="module")
def f32_checkpoint(tmp_path_factory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("olmoe"), "olmoe", dtype=torch.float32)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    rows = [{"prompt": f"{i} + {i + 1} =", "response": f" {2 * i + 1}"} for i in range(16)]
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", rows)


def _tune(capsys, model, data, out, *extra):
    return run_cli(
        capsys, "tune", "--model", model, "--data", data, "--out", out, "--steps", 2, "--lr", "1e-2",
        "--batch-size", 4, *extra,
    )  # fmt: skip


# tune --method routed-lora --variant esft-lora: refused its own --experts before the fix ---------------


def test_esft_lora_tunes_evaluates_and_serves_through_the_cli(capsys, tmp_path, f32_checkpoint, data):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"experts": {"0": [1, 4], "1": [2]}}))
    code, _, err = _tune(
        capsys, f32_checkpoint, data, tmp_path / "ad", "--method", "routed-lora", "--variant", "esft-lora",
        "--experts", cfg, "--lora-rank", 4,
    )  # fmt: skip
    assert code == 0, err
    meta = json.loads((tmp_path / "ad" / "moe_runtime_adapter.json").read_text())
    assert meta["routed_lora"]["layers"] == {
        "0": {"num_lora": 2, "experts": [1, 4]},
        "1": {"num_lora": 1, "experts": [2]},
    }
    code, out, err = run_cli(
        capsys,
        "eval",
        "--model",
        f32_checkpoint,
        "--adapter",
        tmp_path / "ad",
        "--data",
        data,
        "--no-exact-match",
    )
    assert code == 0, err
    requests = write_jsonl(
        tmp_path / "req.jsonl",
        [
            {"id": i, "prompt": p, "adapter": "rl" if i % 2 else None, "max_new_tokens": 4}
            for i, p in enumerate(PROMPTS)
        ],
    )
    code, _, err = run_cli(
        capsys, "generate", "--model", f32_checkpoint, "--adapter", f"rl={tmp_path / 'ad'}", "--requests", requests,
        "--output", tmp_path / "out.jsonl",
    )  # fmt: skip
    assert code == 0, err
    got = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    tokenizer = load_tokenizer(f32_checkpoint)
    base = load_model(f32_checkpoint)
    tuned = apply_adapter(load_model(f32_checkpoint), tmp_path / "ad")
    for i, line in enumerate(got):
        model = tuned if i % 2 else base
        assert line["token_ids"] == reference_tokens(model, tokenizer, PROMPTS[i], 4), line


# generate on hybrid families: rows leaving the batch crashed on linear-attention / SSM caches (jamba,
# qwen3_next, granitemoehybrid, ...) and MiniMax refused the DynamicCache the loop created -------------


@pytest.mark.parametrize("family", ["jamba", "minimax", "qwen3_next"])
def test_generate_on_hybrid_families_equals_transformers(capsys, tmp_path, family):
    checkpoint = save_checkpoint(tmp_path / "ckpt", family)  # float64
    model = load_model(checkpoint, dtype="float64")
    adapter = make_adapter(
        model, tmp_path / "esft", {find_moe_layers(model).layer_indices[-1]: [1, 3]}, seed=1
    )
    rows = [
        {"id": i, "prompt": p, "adapter": "a" if i % 2 else None, "max_new_tokens": 2 + i}
        for i, p in enumerate(PROMPTS)
    ]  # different limits: rows leave the batch one by one
    code, _, err = run_cli(
        capsys, "generate", "--model", checkpoint, "--adapter", f"a={adapter}", "--requests",
        write_jsonl(tmp_path / "req.jsonl", rows), "--output", tmp_path / "out.jsonl",
    )  # fmt: skip
    assert code == 0, err
    got = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    tokenizer = load_tokenizer(checkpoint)
    base = load_model(checkpoint, dtype="float64")
    merged = apply_adapter(load_model(checkpoint, dtype="float64"), adapter)
    for model in (base, merged):
        model.set_experts_implementation("eager")  # torch's grouped GEMM has no float64
    for row, line in zip(rows, got):
        model = merged if row["adapter"] else base
        assert line["token_ids"] == reference_tokens(
            model, tokenizer, row["prompt"], row["max_new_tokens"]
        ), row


# bad outputs and specs: refused up front with one line, never after the work (or as a traceback) -------


def test_tune_refuses_a_non_empty_out_before_training(capsys, tmp_path, f32_checkpoint, data):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    code, _, err = _tune(capsys, f32_checkpoint, data, user, "--method", "routed-lora")
    assert_usage_error(code, err, "exists and is not empty")  # one line: no progress bar before it
    assert sorted(p.name for p in user.iterdir()) == ["notes.txt"]
    code, _, err = _tune(capsys, f32_checkpoint, data, user / "notes.txt", "--method", "routed-lora")
    assert_usage_error(code, err, "not a directory")


def test_tune_refuses_an_empty_layers_spec(capsys, tmp_path, f32_checkpoint, data):
    code, _, err = _tune(
        capsys, f32_checkpoint, data, tmp_path / "ad", "--method", "routed-lora", "--layers", ""
    )
    assert_usage_error(code, err, "--layers ''")
    assert not (tmp_path / "ad").exists()


def test_outputs_that_are_directories_exit_2(capsys, tmp_path, f32_checkpoint, data):
    (tmp_path / "dir").mkdir()
    requests = write_jsonl(tmp_path / "req.jsonl", [{"prompt": PROMPTS[0], "max_new_tokens": 1}])
    code, _, err = run_cli(
        capsys, "generate", "--model", f32_checkpoint, "--requests", requests, "--output", tmp_path / "dir"
    )
    assert_usage_error(code, err, "is a directory")
    code, _, err = run_cli(
        capsys,
        "eval",
        "--model",
        f32_checkpoint,
        "--data",
        data,
        "--no-exact-match",
        "--json",
        tmp_path / "dir",
    )
    assert_usage_error(code, err, "is a directory")
    (tmp_path / "file").write_text("x")
    code, _, err = run_cli(
        capsys, "generate", "--model", f32_checkpoint, "--requests", requests,
        "--output", tmp_path / "file" / "out.jsonl",
    )  # fmt: skip
    assert_usage_error(code, err, "cannot create its directory")


def test_truncated_checkpoint_exit_2(capsys, tmp_path, f32_checkpoint):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(f32_checkpoint, bad)
    weights = next(bad.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    for extra in ([], ["--offload", "disk"]):
        code, _, err = run_cli(capsys, "generate", "--model", bad, "--prompt", "hi", *extra)
        assert_usage_error(code, err, str(bad))


def test_unwritable_outputs_exit_2_before_any_work(capsys, tmp_path, monkeypatch, f32_checkpoint):
    """A read-only place (EROFS from mkstemp) is refused up front, for every verb that writes a file."""
    import errno
    import tempfile

    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    requests = write_jsonl(tmp_path / "req.jsonl", [{"prompt": PROMPTS[0], "max_new_tokens": 1}])
    missing = tmp_path / "no_model"  # never loaded: the output is refused first
    for argv in [
        ("generate", "--model", missing, "--requests", requests, "--output", tmp_path / "ro" / "out.jsonl"),
        ("bench", "offload", "--offload-size", "smoke", "--json", tmp_path / "b.json"),
        ("simulate", "--trace", tmp_path, "--budget", "25%", "--json", tmp_path / "s.json"),
        ("profile", "--model", missing, "--task", f"t={requests}", "--out", tmp_path / "prof"),
        ("eval", "--model", missing, "--data", requests, "--json", tmp_path / "e.json"),
        ("tune", "--model", missing, "--data", requests, "--method", "full", "--out", tmp_path / "ad"),
    ]:
        code, _, err = run_cli(capsys, *argv)
        assert_usage_error(code, err, "Read-only file system")


# an ESFT adapter of another family whose expert weights happen to be equal (same seed and sizes) ------


def test_esft_adapter_of_another_family_is_refused(capsys, tmp_path, f32_checkpoint, data):
    other = save_checkpoint(tmp_path / "mixtral", "mixtral", dtype=torch.float32)  # same experts as olmoe
    adapter = make_adapter(load_model(other), tmp_path / "ad", {0: [1]}, seed=0)
    code, _, err = run_cli(
        capsys, "eval", "--model", f32_checkpoint, "--adapter", adapter, "--data", data, "--no-exact-match"
    )
    assert_usage_error(code, err, "tuned on model type 'mixtral', the base model is 'olmoe'")
    code, _, err = run_cli(
        capsys, "generate", "--model", f32_checkpoint, "--adapter", f"a={adapter}", "--prompt", "x"
    )
    assert_usage_error(code, err, "tuned on model type 'mixtral'")


# adapters tuned on a bfloat16 / float64 checkpoint: tune trains in float32, eval loads float32 and
# generate the checkpoint's dtype, and the base fingerprint depended on the load dtype ---------------


@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float64])
@pytest.mark.parametrize("method", ["routed-lora", "esft"])
def test_adapters_of_a_non_float32_checkpoint_pass_eval_and_generate(capsys, tmp_path, data, stored, method):
    checkpoint = save_checkpoint(tmp_path / "ckpt", "olmoe", dtype=stored)
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"experts": {"0": [1, 4]}}))
    extra = ["--experts", cfg] if method == "esft" else []
    code, _, err = _tune(capsys, checkpoint, data, tmp_path / "ad", "--method", method, *extra)
    assert code == 0, err
    code, _, err = run_cli(
        capsys,
        "eval",
        "--model",
        checkpoint,
        "--adapter",
        tmp_path / "ad",
        "--data",
        data,
        "--no-exact-match",
    )
    assert code == 0, err
    requests = write_jsonl(
        tmp_path / "req.jsonl", [{"prompt": PROMPTS[0], "adapter": "a", "max_new_tokens": 2}]
    )
    code, _, err = run_cli(
        capsys, "generate", "--model", checkpoint, "--adapter", f"a={tmp_path / 'ad'}", "--requests", requests,
        "--output", tmp_path / "out.jsonl",
    )  # fmt: skip
    assert code == 0, err


def test_fingerprint_ignores_the_load_dtype_not_the_weights():
    from moe_runtime.models import model_fingerprint
    from moe_runtime.testing.random_models import build_random_model

    model = build_random_model("olmoe", seed=0, dtype=torch.bfloat16)
    same = {model_fingerprint(model.to(dtype)) for dtype in (torch.bfloat16, torch.float32, torch.float64)}
    assert len(same) == 1
    other = build_random_model("olmoe", seed=1, dtype=torch.bfloat16)
    assert model_fingerprint(other) not in same


# serving edge cases through the Python API: bfloat16, more requests than a batch, one-token prompts
# and limits, one adapter for every request, unload / reload cycles ----------------------------------


def test_bfloat16_engine_edge_cases_equal_transformers_and_reload_leaks_nothing(tmp_path):
    from helpers.routed_lora import write_random_lora

    from moe_runtime.errors import UsageError
    from moe_runtime.runtime import DecodeConfig, MultiAdapterEngine, Request
    from moe_runtime.testing.random_models import build_random_model
    from moe_runtime.tuning.routed_lora import RoutedLoraSettings

    def build():
        return build_random_model("qwen2_moe", seed=0, dtype=torch.bfloat16, experts_implementation="eager")

    model = build()
    dirs = {
        "esft": make_adapter(model, tmp_path / "esft", {0: [1, 3], 1: [2]}, seed=1, scale=1.0),
        "r": write_random_lora(model, tmp_path / "r", RoutedLoraSettings("perft-r", rank=4), seed=2),
        "s": write_random_lora(model, tmp_path / "s", RoutedLoraSettings("perft-s", rank=4), seed=3),
    }
    engine = MultiAdapterEngine(model)
    for name, path in dirs.items():
        engine.add_adapter(name, path)
    prompts = [[5], [17, 4, 9, 33, 2, 8], [7, 9], [3]]
    names = [None, "esft", "r", "s"]
    mixed = [Request(prompts[i % 4], names[(i + i // 4) % 4], 1 + i % 3, id=i) for i in range(10)]
    one_adapter = [Request(p, "r", 3, id=i) for i, p in enumerate(prompts)]
    references: dict = {}

    def reference(request: Request) -> list[int]:
        if request.adapter not in references:
            base = build()
            references[request.adapter] = (
                apply_adapter(base, dirs[request.adapter]) if request.adapter else base
            )
        ids = torch.tensor([request.prompt])
        out = references[request.adapter].generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=request.max_new_tokens, do_sample=False
        )
        return out[0, ids.shape[1] :].tolist()

    expected = [reference(r) for r in mixed + one_adapter]
    assert [c.token_ids for c in engine.generate(mixed, DecodeConfig(max_batch_size=3))] == expected[:10]
    assert [c.token_ids for c in engine.generate(one_adapter)] == expected[10:]
    memory, rows = engine.memory(), [slots.table.shape for slots in engine.arena.layers.values()]
    for _ in range(4):
        for name in ("r", "esft", "s"):
            engine.remove_adapter(name)
        assert engine.adapters == [] and engine.executor.terms == {}
        for name in ("s", "esft", "r"):
            engine.add_adapter(name, dirs[name])
    assert engine.memory() == memory and [s.table.shape for s in engine.arena.layers.values()] == rows
    assert [c.token_ids for c in engine.generate(mixed, DecodeConfig(max_batch_size=4))] == expected[:10]
    with pytest.raises(UsageError, match=r"token id 100000 is not in \[0, "):
        engine.generate([Request([5, 100000])])
    with pytest.raises(UsageError, match="token id -1"):
        engine.generate([Request([-1])])
    assert engine.pending == 0


def test_full_adapters_are_refused_by_generate_and_lora_adapters_are_served(
    capsys, tmp_path, f32_checkpoint, data
):
    requests = write_jsonl(tmp_path / "req.jsonl", [{"prompt": PROMPTS[0], "adapter": "a"}])
    for method in ("lora", "full"):
        code, _, err = _tune(capsys, f32_checkpoint, data, tmp_path / method, "--method", method)
        assert code == 0, err
        out = tmp_path / f"{method}.jsonl"
        code, _, err = run_cli(
            capsys, "generate", "--model", f32_checkpoint, "--adapter", f"a={tmp_path / method}",
            "--requests", requests, "--output", out,
        )  # fmt: skip
        if method == "lora":  # a peft LoRA directory: served per request
            assert code == 0, err
            assert out.exists()
        else:
            assert_usage_error(code, err, f"a '{method}' adapter changes weights shared by every request")
            assert not out.exists()


def test_refused_resume_leaves_no_checkpoint_directory(capsys, tmp_path, f32_checkpoint, data):
    code, _, err = _tune(capsys, f32_checkpoint, data, tmp_path / "ad", "--method", "routed-lora", "--resume")
    assert_usage_error(code, err, "--resume: no checkpoint")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_checkpoint_without_tokenizer_files_is_refused(capsys, tmp_path, data):
    from moe_runtime.testing.random_models import save_random_checkpoint

    checkpoint = save_random_checkpoint("olmoe", tmp_path / "bare")  # config + weights only
    code, out, err = run_cli(capsys, "generate", "--model", checkpoint, "--prompt", "hi")
    assert_usage_error(code, err, "no usable tokenizer")  # was: exit 0 with an empty completion
    code, _, err = _tune(capsys, checkpoint, data, tmp_path / "ad", "--method", "routed-lora")
    assert_usage_error(code, err, "no usable tokenizer")  # was: 'example 1 has no tokens to learn'


@pytest.mark.parametrize("family", ["granitemoe_swa", "deepseek_v4", "deepseek_v32"])
def test_families_not_left_padding_invariant_are_served_unpadded(capsys, tmp_path, family):
    checkpoint = save_checkpoint(tmp_path / "ckpt", family)  # float64
    model = load_model(checkpoint)
    adapter = make_adapter(
        model, tmp_path / "esft", {find_moe_layers(model).layer_indices[-1]: [0, 2]}, seed=1
    )
    prompts = [*PROMPTS, "seven wizards", "the lazy"]  # some of equal token length
    rows = [
        {"id": i, "prompt": p, "adapter": "a" if i % 2 else None, "max_new_tokens": 3}
        for i, p in enumerate(prompts)
    ]
    code, _, err = run_cli(
        capsys, "generate", "--model", checkpoint, "--adapter", f"a={adapter}", "--requests",
        write_jsonl(tmp_path / "req.jsonl", rows), "--output", tmp_path / "out.jsonl",
    )  # fmt: skip
    assert code == 0, err
    got = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    tokenizer = load_tokenizer(checkpoint)
    references = {None: load_model(checkpoint), "a": apply_adapter(load_model(checkpoint), adapter)}
    for reference in references.values():
        reference.set_experts_implementation("eager")
    for row, line in zip(rows, got):  # before: left-padded rows differed (granitemoe_swa: NaN -> id 0)
        assert line["token_ids"] == reference_tokens(
            references[row["adapter"]], tokenizer, row["prompt"], 3
        ), row


def test_default_top_k_above_the_lora_experts_says_it_is_the_default(capsys, tmp_path, f32_checkpoint, data):
    extra = ["--method", "routed-lora", "--lora-experts", 1]
    code, _, err = _tune(capsys, f32_checkpoint, data, tmp_path / "ad", *extra)
    assert_usage_error(code, err, "--lora-top-k: 2 (the default) exceeds the 1 LoRA experts of layer 0")
    code, _, err = _tune(capsys, f32_checkpoint, data, tmp_path / "ad", *extra, "--lora-top-k", 3)
    assert_usage_error(code, err, "--lora-top-k: 3 exceeds the 1 LoRA experts")
    assert not (tmp_path / "ad").exists()


def test_jsonl_files_with_a_byte_order_mark_are_read(capsys, tmp_path, f32_checkpoint):
    bom = "\ufeff"
    data = tmp_path / "data.jsonl"
    data.write_text(bom + json.dumps({"text": "the quick brown fox"}) + "\r\n", encoding="utf-8")
    code, out, err = run_cli(
        capsys, "eval", "--model", f32_checkpoint, "--data", data, "--json", tmp_path / "e.json"
    )
    assert code == 0 and json.loads((tmp_path / "e.json").read_text())["tokens"] > 0, err
    requests = tmp_path / "req.jsonl"
    requests.write_text(bom + json.dumps({"prompt": "seven", "max_new_tokens": 1}) + "\r\n", encoding="utf-8")
    code, _, err = run_cli(
        capsys,
        "generate",
        "--model",
        f32_checkpoint,
        "--requests",
        requests,
        "--output",
        tmp_path / "o.jsonl",
    )
    assert code == 0, err


def test_eval_names_the_data_file_of_an_example_without_tokens(capsys, tmp_path, f32_checkpoint):
    data = write_jsonl(tmp_path / "empty_text.jsonl", [{"text": "the quick"}, {"text": ""}])
    code, _, err = run_cli(capsys, "eval", "--model", f32_checkpoint, "--data", data)
    assert_usage_error(code, err, f"{data}: example 2 has no tokens to learn")


def test_bad_training_numbers_exit_2(capsys, tmp_path, f32_checkpoint, data):
    common = ["tune", "--model", f32_checkpoint, "--data", data, "--steps", "1", "--out", tmp_path / "ad"]
    for extra, expect in [
        (["--method", "full", "--lr", "inf"], "--lr"),
        (["--method", "full", "--aux-loss-coef", "nan"], "--aux-loss-coef"),
        (["--method", "full", "--aux-loss-coef", "-1"], "--aux-loss-coef"),
        (["--method", "full", "--weight-decay", "-1"], "--weight-decay"),
        (["--method", "lora", "--lora-rank", "0"], "--lora-rank"),
        (["--method", "lora", "--lora-alpha", "-1"], "--lora-alpha"),
    ]:
        code, _, err = run_cli(capsys, *common, *extra)
        assert_usage_error(code, err, expect)
        assert not (tmp_path / "ad").exists()


def test_diverged_training_writes_nothing(capsys, tmp_path, f32_checkpoint, data):
    argv = ["tune", "--model", f32_checkpoint, "--data", data, "--method", "full", "--steps", "3"]
    code, _, err = run_cli(capsys, *argv, "--lr", "1e30", "--batch-size", "4", "--out", tmp_path / "ad")
    last = err.strip().splitlines()[-1]  # after the training progress bar
    assert code == 2 and "diverged" in last and "Traceback" not in err, err
    assert not (tmp_path / "ad").exists()


def test_line_separators_inside_json_strings(capsys, tmp_path, f32_checkpoint):
    """U+2028 / U+2029 / U+0085 are text inside a JSON string, not line breaks."""
    from moe_runtime.data import read_examples
    from moe_runtime.runtime import read_requests

    text = "the quick\u2028brown\u2029fox\u0085jumps"
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": text}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert len(read_examples(path)) == 1
    path.write_text(json.dumps({"prompt": text}, ensure_ascii=False) + "\r\n", encoding="utf-8")
    assert [r.prompt for r in read_requests(path)] == [text]


def test_implicit_request_id_clash(capsys, tmp_path, f32_checkpoint):
    requests = tmp_path / "r.jsonl"
    requests.write_text('{"prompt": "hi"}\n{"id": 1, "prompt": "ho"}\n')
    argv = ["generate", "--model", f32_checkpoint, "--requests", requests, "--output", tmp_path / "o.jsonl"]
    code, _, err = run_cli(capsys, *argv)
    assert_usage_error(code, err, "line number, 1")


def test_integer_adapter_tensors_refused(capsys, tmp_path, f32_checkpoint, data):
    from safetensors.torch import load_file, save_file

    adapter = make_adapter(load_model(f32_checkpoint), tmp_path / "a", {0: [1]}, seed=0)
    weights = next(adapter.glob("*.safetensors"))
    save_file({k: v.to(torch.int32) for k, v in load_file(weights).items()}, str(weights))
    code, _, err = run_cli(capsys, "eval", "--model", f32_checkpoint, "--adapter", adapter, "--data", data)
    assert_usage_error(code, err, "floating-point")


def test_outputs_have_ordinary_permissions_and_no_verb_is_an_error(capsys, tmp_path):
    import os

    from moe_runtime.io import atomic_dir

    with atomic_dir(tmp_path / "out") as tmp:
        path = tmp / "w.safetensors"
        path.write_bytes(b"x")
        os.chmod(path, 0o600)  # as safetensors' save_file leaves its files
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "out" / "w.safetensors").stat().st_mode & 0o777 == 0o666 & ~mask
    code, out, err = run_cli(capsys)
    assert code == 2 and "usage" in out and err.strip().startswith("moe-runtime: error: no command")
