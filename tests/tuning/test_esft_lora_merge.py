"""``tune --method esft-lora-merge``: low-rank updates of the ESFT-selected experts' own weights.

- Training changes only the factors: the model's weights after training are bit-identical to before,
  and the adapter applied changes exactly the selected experts (router, other experts, every other
  weight bit-identical).
- Served (resident and offloaded, in a mixed batch beside an ESFT adapter and base rows), its rows
  give the greedy tokens of plain transformers on the base with ``W + (alpha / r) B A`` merged by hand
  into the selected experts, logits within atol/rtol 1e-4 (float32; the engine sums experts in
  another order).
- Bad settings exit 2 with one line.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.checkpoints import save_checkpoint
from helpers.serving import greedy_reference, make_adapter, make_esft_lora_adapter
from safetensors.torch import load_file

from moe_runtime.cli import main
from moe_runtime.data import read_examples
from moe_runtime.errors import AdapterError
from moe_runtime.models import find_moe_layers, load_model, load_tokenizer, pad_token_id
from moe_runtime.runtime import DecodeConfig, MultiAdapterEngine, Request
from moe_runtime.runtime.offload import OffloadConfig
from moe_runtime.tuning.data import encode_examples
from moe_runtime.tuning.esft import read_expert_config
from moe_runtime.tuning.registry import TuneJob, get
from moe_runtime.tuning.trainer import TrainConfig

TOL = {"atol": 1e-4, "rtol": 1e-4}
SELECTED = {0: [1, 4], 1: [2]}
RANK, ALPHA = 4, 8.0


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("esft-lora-merge")
    checkpoint = save_checkpoint(root / "base", "qwen2_moe", dtype=torch.float32)
    data = root / "train.jsonl"
    rows = [{"prompt": f"{i} + {i + 1} =", "response": f" {2 * i + 1}"} for i in range(32)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = root / "expert_cfg.json"
    experts = {str(k): v for k, v in SELECTED.items()}
    cfg.write_text(json.dumps({"experts": experts, "shared_experts": False, "non_expert_modules": False}))
    model = load_model(checkpoint)
    before = {name: t.clone() for name, t in model.state_dict().items()}
    tokenizer = load_tokenizer(checkpoint)
    train = TrainConfig(steps=4, lr=1e-2, batch_size=8, max_length=32)
    job = TuneJob(
        model=model,
        info=find_moe_layers(model),
        features=encode_examples(tokenizer, read_examples(data), train.max_length, where=str(data)),
        train=train,
        out=root / "adapter",
        pad_id=pad_token_id(tokenizer),
        progress=False,
    )
    method = get("esft-lora-merge")
    config = method.build_config({"experts": read_expert_config(cfg), "rank": RANK, "alpha": ALPHA})
    summary = method.tune(job, config)
    return root, checkpoint, data, cfg, model, before, summary


def test_training_changes_only_the_factors(setup):
    root, checkpoint, _, _, model, before, summary = setup
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[name], before[name]) for name in before)  # the model itself is untouched
    factors = load_file(root / "adapter" / "adapter.safetensors")
    assert summary["trainable_params"] == sum(t.numel() for t in factors.values())
    assert summary["adapter_bytes"] == sum(t.numel() * t.element_size() for t in factors.values())
    assert all(t.abs().max() > 0 for k, t in factors.items() if "lora_B" in k)  # B left its zero init
    assert {k.split(".lora_")[0].rsplit(".", 1)[0] for k in factors} == {
        f"model.layers.{layer}.mlp.experts.{e}" for layer, ids in SELECTED.items() for e in ids
    }
    merged = get("esft-lora-merge").apply(load_model(checkpoint), _read(root / "adapter"), False)
    base = load_model(checkpoint)
    info = find_moe_layers(base)
    experts = {f"{info.by_index(layer).experts_name}.{p}": layer for layer in info.layer_indices for p in ("gate_up_proj", "down_proj")}  # fmt: skip
    merged_params = dict(merged.named_parameters())
    for name, param in base.named_parameters():
        if name not in experts:  # router, shared expert, attention, norms, embeddings
            assert torch.equal(merged_params[name], param), name
            continue
        chosen = SELECTED.get(experts[name], [])
        for e in range(param.shape[0]):
            assert torch.equal(merged_params[name][e], param[e]) == (e not in chosen), (name, e)


def _read(path: Path):
    from moe_runtime.tuning.registry import read_adapter_dir

    return read_adapter_dir(path)[1]


def _merged_by_hand(checkpoint: Path, adapter: Path) -> torch.nn.Module:
    """The base loaded by transformers with W + (alpha / r) * B @ A written into the selected experts
    (qwen2_moe: gate_up_proj [E, 2I, H] = [gate; up], down_proj [E, H, I])."""
    model = load_model(checkpoint)
    factors = load_file(adapter / "adapter.safetensors")
    meta = json.loads((adapter / "moe_runtime_adapter.json").read_text())
    scale = meta["lora"]["alpha"] / meta["lora"]["rank"]
    with torch.no_grad():
        for layer, ids in SELECTED.items():
            experts = model.model.layers[layer].mlp.experts
            inter = experts.down_proj.shape[-1]
            for e in ids:
                prefix = f"model.layers.{layer}.mlp.experts.{e}"

                def delta(proj, prefix=prefix):
                    a, b = (
                        factors[f"{prefix}.{proj}.lora_A.weight"],
                        factors[f"{prefix}.{proj}.lora_B.weight"],
                    )
                    return scale * (b @ a)

                experts.gate_up_proj[e, :inter] += delta("gate_proj")
                experts.gate_up_proj[e, inter:] += delta("up_proj")
                experts.down_proj[e] += delta("down_proj")
    return model.eval()


@pytest.mark.parametrize("offload", [False, True], ids=["resident", "offloaded"])
def test_served_rows_equal_the_model_merged_by_hand(setup, tmp_path, offload):
    """Rows of the trained adapter and of one with large random factors, beside ESFT and base rows."""
    root, checkpoint, _, _, _, _, _ = setup
    base = load_model(checkpoint).eval()
    adapters = {
        "trained": root / "adapter",
        "random": make_esft_lora_adapter(base, tmp_path / "random", SELECTED, seed=4, rank=RANK, alpha=ALPHA),
    }
    esft = make_adapter(base, tmp_path / "esft", {1: [0, 5]}, seed=3)
    config = OffloadConfig(tier="disk", budget="50%", cache_dir=str(tmp_path / "cache")) if offload else None
    engine = MultiAdapterEngine.from_pretrained(checkpoint, offload=config)
    for name, path in adapters.items():
        engine.add_adapter(name, path)
    engine.add_adapter("esft", esft)
    vocab = engine.model.config.vocab_size
    generator = torch.Generator().manual_seed(5)
    plan = [
        (6, "trained", 5),
        (4, None, 4),
        (16, "random", 5),
        (5, "esft", 4),
        (8, "trained", 6),
        (12, "random", 4),
    ]
    requests = [
        Request(torch.randint(3, vocab, (n,), generator=generator).tolist(), name, limit, id=i)
        for i, (n, name, limit) in enumerate(plan)
    ]
    completions = engine.generate(requests, DecodeConfig(output_logits=True))
    engine.close()
    references = {name: _merged_by_hand(checkpoint, path) for name, path in adapters.items()}
    for request, completion in zip(requests, completions):
        if request.adapter not in adapters:
            continue
        tokens, logits = greedy_reference(references[request.adapter], request)
        assert completion.token_ids == tokens
        torch.testing.assert_close(completion.logits, logits, **TOL)
        if request.adapter == "random":  # the update matters: the base gives other logits
            _, base_logits = greedy_reference(base, request)
            steps = min(len(base_logits), len(logits))
            assert (base_logits[:steps] - logits[:steps]).abs().max() > 1e-2


def test_a_damaged_adapter_is_refused_when_served(setup, tmp_path):
    from safetensors.torch import save_file

    root, checkpoint, _, _, _, _, _ = setup
    bad = tmp_path / "bad"
    bad.mkdir()
    for file in (root / "adapter").iterdir():
        (bad / file.name).write_bytes(file.read_bytes())
    factors = load_file(bad / "adapter.safetensors")
    key = next(k for k in factors if k.endswith("down_proj.lora_A.weight"))
    factors[key] = factors[key][:, :-1].contiguous()
    save_file(factors, str(bad / "adapter.safetensors"))
    engine = MultiAdapterEngine.from_pretrained(checkpoint)
    with pytest.raises(AdapterError, match="down_proj: factors A"):
        engine.add_adapter("bad", bad)
    engine.close()


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--experts", "{cfg}", "--lora-rank", "0"], "--lora-rank: must be positive"),
        (["--experts", "{cfg}", "--lora-rank", "-2"], "--lora-rank: must be positive"),
        (["--experts", "{cfg}", "--lora-alpha", "0"], "--lora-alpha: must be a positive"),
        ([], "--experts: esft-lora-merge needs an expert_cfg.json"),
        (["--experts", "{shared}"], "updates routed experts only"),
        (["--experts", "{cfg}", "--variant", "perft-r"], "--variant goes with --method routed-lora"),
    ],
    ids=["rank-0", "rank-negative", "alpha-0", "no-selection", "shared-experts", "other-method-flag"],
)
def test_bad_settings_exit_2_with_one_line(setup, capsys, tmp_path, extra, expected):
    _, checkpoint, data, cfg, _, _, _ = setup
    shared = tmp_path / "shared.json"
    shared.write_text(
        json.dumps({"experts": {"0": [1]}, "shared_experts": True, "non_expert_modules": False})
    )
    out = tmp_path / "out"
    argv = ["tune", "--model", checkpoint, "--data", data, "--out", out, "--method", "esft-lora-merge", "--steps", "1"]  # fmt: skip
    argv += [a.format(cfg=cfg, shared=shared) for a in extra]
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and expected in err, err
    assert not out.exists()
