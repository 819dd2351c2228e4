"""Offloaded serving equals resident serving: tokens exactly, logits within float64 rounding."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.checkpoints import save_checkpoint
from helpers.serving import make_adapter

from moe_runtime.errors import UsageError
from moe_runtime.models import find_moe_layers, load_model, load_tokenizer
from moe_runtime.runtime import DecodeConfig, MultiAdapterEngine, Request
from moe_runtime.runtime.offload import Budget, OffloadConfig, load_offloaded_model, parse_budget

# (family, overrides): qwen2_moe / mixtral / deepseek_v3 save per-expert keys (read as byte ranges), gpt_oss fused ones.
FAMILIES = {
    "qwen2_moe": {},
    "mixtral": {},
    "gpt_oss": {},
    "deepseek_v3": {},
}
PROMPTS = ["the quick brown fox", "def f ( x ) : return", "12 + 35 = 47 key", "seven wizards"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    return {
        family: save_checkpoint(tmp_path_factory.mktemp(family), family, num_hidden_layers=3, **overrides)
        for family, overrides in FAMILIES.items()
    }


def _requests(adapters: list[str | None]) -> list[Request]:
    return [Request(prompt=p, adapter=adapters[i % len(adapters)], id=i) for i, p in enumerate(PROMPTS)]


def _serve(engine: MultiAdapterEngine, requests: list[Request]):
    completions = engine.generate(requests, DecodeConfig(max_new_tokens=6, output_logits=True))
    return [c.token_ids for c in completions], [c.logits for c in completions]


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("budget", ["25%", "50%"])
@pytest.mark.parametrize("tier", ["disk", "cpu"])
def test_offloaded_generate_equals_resident(checkpoints, tmp_path, family, budget, tier):
    path = checkpoints[family]
    resident = MultiAdapterEngine.from_pretrained(path)
    offloaded = MultiAdapterEngine.from_pretrained(
        path, offload=OffloadConfig(tier=tier, budget=budget, cache_dir=str(tmp_path / "cache"))
    )
    requests = _requests([None])
    tokens, logits = _serve(resident, requests)
    got_tokens, got_logits = _serve(offloaded, requests)
    assert got_tokens == tokens
    for a, b in zip(got_logits, logits):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    stats = offloaded.offload.stats
    assert stats.misses > 0 and stats.bytes_read > 0
    info = offloaded.info
    assert all(layer.experts.down_proj.is_meta for layer in info.layers)  # never materialized
    slots = offloaded.offload.num_slots
    assert offloaded.offload.resident_expert_bytes() == slots * sum(
        layer.expert_bytes for layer in info.layers
    )
    assert slots <= parse_budget(budget).share * min(layer.num_experts for layer in info.layers)


@pytest.mark.parametrize("family", ["qwen2_moe", "gpt_oss"])
def test_offloaded_mixed_adapters_equal_resident(checkpoints, tmp_path, family):
    path = checkpoints[family]
    base = load_model(path)
    info = find_moe_layers(base)
    layers = info.layer_indices
    a = make_adapter(base, tmp_path / "a", {layers[0]: [1, 3], layers[-1]: [0]}, seed=1, info=info)
    b = make_adapter(base, tmp_path / "b", {layers[-1]: [2, 5, 6]}, seed=2, info=info)
    engines = [
        MultiAdapterEngine.from_pretrained(path),
        MultiAdapterEngine.from_pretrained(
            path,
            offload=OffloadConfig(
                budget="25%", prefetch=("router", "trajectory"), cache_dir=str(tmp_path / "c")
            ),
        ),
        MultiAdapterEngine.from_pretrained(
            path, offload=OffloadConfig(tier="cpu", budget="25%", prefetch=("router",))
        ),
    ]
    results = []
    for engine in engines:
        engine.add_adapter("a", a)
        engine.add_adapter("b", b)
        results.append(_serve(engine, _requests(["a", None, "b"])))
        results.append(engine.prompt_logits(_requests(["a", "b", None])))
    for served, scored in [(2, 3), (4, 5)]:
        assert results[served][0] == results[0][0]
        for x, y in zip(results[served][1], results[0][1]):
            torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-10)
        for x, y in zip(results[scored], results[1]):
            torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-10)
    assert engines[1].offload.stats.prefetches > 0 and engines[2].offload.stats.prefetches > 0
    assert engines[2].offload.stats.misses > 0


def test_policies_and_prefetch_keep_outputs(checkpoints, tmp_path):
    path = checkpoints["mixtral"]
    reference = _serve(MultiAdapterEngine.from_pretrained(path), _requests([None]))
    scores = {layer: {e: float(e % 3) for e in range(8)} for layer in range(3)}
    for policy, prefetch in [
        ("lfu", ("router",)),
        ("profile", ("trajectory",)),
        ("lru", ("router", "trajectory")),
    ]:
        config = OffloadConfig(
            budget="50%",
            policy=policy,
            prefetch=prefetch,
            profile_scores=scores,
            cache_dir=str(tmp_path / "c"),
        )
        engine = MultiAdapterEngine.from_pretrained(path, offload=config)
        assert _serve(engine, _requests([None]))[0] == reference[0]
        assert engine.offload.stats.hit_rate > 0


@pytest.mark.parametrize("slots", [1, 2, 3])
def test_multi_pass_layers_equal_resident(tmp_path, slots):
    """Prefills need more experts than the slots: passes of half the slots loading ahead (none with one slot)."""
    path = save_checkpoint(tmp_path / "ckpt", "mixtral", num_hidden_layers=2, num_experts_per_tok=1)
    reference = _serve(MultiAdapterEngine.from_pretrained(path), _requests([None]))
    engine = MultiAdapterEngine.from_pretrained(
        path,
        offload=OffloadConfig(budget=f"{slots / 8:.1%}", prefetch=("router",), cache_dir=str(tmp_path / "c")),
    )
    assert engine.offload.num_slots == slots
    tokens, logits = _serve(engine, _requests([None]))
    assert tokens == reference[0]
    for a, b in zip(logits, reference[1]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    stats = engine.offload.stats
    assert stats.passes > 2 * 6  # 2 layers x 6 forwards: layers ran in several passes


def test_generation_config_eos_wins_as_in_transformers(tmp_path):
    """generation_config.json's eos (not config.json's) ends offloaded requests, as resident ones."""
    import json

    path = save_checkpoint(tmp_path / "ckpt", "mixtral", num_hidden_layers=2)
    free = DecodeConfig(max_new_tokens=6, stop_on_eos=False)
    tokens = MultiAdapterEngine.from_pretrained(path).generate(_requests([None]), free)[0].token_ids
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": tokens[2]}))
    served = []
    for offload in (None, OffloadConfig(budget="50%", cache_dir=str(tmp_path / "c"))):
        engine = MultiAdapterEngine.from_pretrained(path, offload=offload)
        served.append(
            [c.token_ids for c in engine.generate(_requests([None]), DecodeConfig(max_new_tokens=6))]
        )
    assert served[0] == served[1]
    assert served[0][0] == tokens[: tokens.index(tokens[2]) + 1]  # stopped at the new eos


def test_adapter_with_bad_expert_ids_is_refused_before_reading(checkpoints, tmp_path):
    import json

    from moe_runtime.errors import AdapterError

    path = checkpoints["mixtral"]
    adapter = make_adapter(load_model(path), tmp_path / "a", {0: [1]}, seed=0)
    cfg = json.loads((adapter / "expert_cfg.json").read_text())
    cfg["experts"]["0"] = [1, 99]
    (adapter / "expert_cfg.json").write_text(json.dumps(cfg))
    engine = MultiAdapterEngine.from_pretrained(path, offload=OffloadConfig(cache_dir=str(tmp_path / "c")))
    with pytest.raises(AdapterError, match="99"):
        engine.add_adapter("a", adapter)


def test_model_loaded_without_experts_matches_checkpoint(checkpoints, tmp_path):
    for family in ("mixtral", "gpt_oss"):
        path = checkpoints[family]
        net, info, store = load_offloaded_model(path, cache_dir=tmp_path)
        full = load_model(path)
        assert store.kind == "checkpoint" and store.packed_path is None  # per-expert keys too: no copy
        assert not any((tmp_path).iterdir())
        for layer, ref in zip(info.layers, find_moe_layers(full).layers):
            for expert in range(layer.num_experts):
                for name, tensor in store.read_expert(layer.index, expert).items():
                    assert torch.equal(tensor, getattr(ref.experts, name)[expert])
        reference = full.state_dict()
        for name, tensor in net.state_dict().items():
            if not tensor.is_meta:
                assert torch.equal(tensor, reference[name]), name
    # an opt-in packed copy is made once, reused, and reads the same bytes
    _, _, packed = load_offloaded_model(checkpoints["mixtral"], cache_dir=tmp_path, pack=True)
    assert packed.kind == "packed" and packed.packed_path.exists()
    made = packed.packed_path.stat().st_mtime_ns
    _, info, again = load_offloaded_model(checkpoints["mixtral"], cache_dir=tmp_path, pack=True)
    assert again.packed_path == packed.packed_path and again.packed_path.stat().st_mtime_ns == made
    direct = load_offloaded_model(checkpoints["mixtral"], cache_dir=tmp_path)[2]
    for layer in info.layers:
        for expert in range(layer.num_experts):
            ours, theirs = again.read_expert(layer.index, expert), direct.read_expert(layer.index, expert)
            assert all(torch.equal(ours[n], theirs[n]) for n in ours)


def test_budget_errors(checkpoints, tmp_path):
    path = checkpoints["qwen2_moe"]
    for bad in ("0%", "150%", "abc", "12XB", "-3GB"):
        with pytest.raises(UsageError):
            parse_budget(bad)
    assert parse_budget("2GB").bytes == 2 * 10**9 and parse_budget("25%").share == 0.25
    assert parse_budget("2TB").bytes == 2 * 10**12 and parse_budget(Budget(share=0.5)).share == 0.5
    for bad in (Budget(), Budget(share=0.0), Budget(bytes=-3), Budget(share=0.5, bytes=9), True):
        with pytest.raises(UsageError):
            parse_budget(bad)
    assert OffloadConfig(prefetch="router").prefetch == ("router",)
    with pytest.raises(UsageError, match="working set"):
        MultiAdapterEngine.from_pretrained(path, offload=OffloadConfig(budget="12%", cache_dir=str(tmp_path)))
    with pytest.raises(UsageError, match="working set"):
        MultiAdapterEngine.from_pretrained(path, offload=OffloadConfig(budget=1000, cache_dir=str(tmp_path)))
    with pytest.raises(UsageError, match="offload tier 'gpu'"):
        OffloadConfig(tier="gpu").validate()
    for scores, message in [
        ({0: {99: 1.0}}, "expert 99"),
        ({57: {0: 1.0}}, "layer 57"),
    ]:  # another model's profile
        config = OffloadConfig(policy="profile", profile_scores=scores, cache_dir=str(tmp_path))
        with pytest.raises(UsageError, match=message):
            MultiAdapterEngine.from_pretrained(path, offload=config)


class FlakyLoader:
    """An ExpertLoader whose reads of one priority fail (on ``wait``), to test the cache's handling."""

    def __init__(self, fail_priority: int) -> None:
        from moe_runtime.ops.loader import ExpertLoader

        self.inner, self.fail_priority, self.failed = ExpertLoader(1), fail_priority, set()
        self._next = -1

    def submit(self, path, ranges, dest, priority=0, **kwargs):
        if priority == self.fail_priority:
            self._next -= 1
            self.failed.add(self._next)
            return self._next
        return self.inner.submit(path, ranges, dest, priority, **kwargs)

    def wait(self, ticket, timeout_s=None):
        if ticket in self.failed:
            raise OSError(f"injected failure of ticket {ticket}")
        self.inner.wait(ticket, timeout_s)

    def promote(self, ticket):
        if ticket not in self.failed:
            self.inner.promote(ticket)

    def cancel(self, ticket):
        return ticket in self.failed or self.inner.cancel(ticket)

    def close(self):
        self.inner.close()


@pytest.mark.parametrize("fail_priority", [0, 1])
def test_failed_reads(checkpoints, tmp_path, fail_priority):
    """A failed demand read raises; a failed prefetch is read again on demand (same tokens)."""
    from moe_runtime.runtime import SlotRoutedExecutor
    from moe_runtime.runtime.offload import OffloadTier

    path = checkpoints["mixtral"]
    reference = _serve(MultiAdapterEngine.from_pretrained(path), _requests([None]))
    config = OffloadConfig(budget="25%", prefetch=("router",), cache_dir=str(tmp_path))
    engine = MultiAdapterEngine.from_pretrained(path, offload=config)
    engine.executor.close()
    engine.base = OffloadTier(engine.info, engine.offload.store, config, loader=FlakyLoader(fail_priority))
    engine.executor = SlotRoutedExecutor(engine.arena, engine.base)
    engine.executor.attach()
    if fail_priority == 0:
        with pytest.raises(OSError, match="injected"):
            _serve(engine, _requests([None]))
    else:
        assert _serve(engine, _requests([None]))[0] == reference[0]
        assert engine.offload.stats.prefetches > 0


def test_generate_cli_offload(capsys, checkpoints, tmp_path, monkeypatch):
    import json

    from moe_runtime.cli import main

    monkeypatch.setenv("MOE_RUNTIME_CACHE", str(tmp_path / "cache"))
    path = checkpoints["mixtral"]
    base = load_model(path)
    adapter = make_adapter(base, tmp_path / "a", {0: [1, 2]}, seed=3)
    rows = [{"id": i, "prompt": p, "adapter": "a" if i % 2 else None} for i, p in enumerate(PROMPTS)]
    requests = tmp_path / "req.jsonl"
    requests.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["generate", "--model", path, "--adapter", f"a={adapter}", "--requests", requests]
    outputs = []
    tiers = (["--offload", "disk", "--expert-budget", "25%", "--prefetch", "router"], ["--offload", "cpu"])
    for i, extra in enumerate(([], *tiers)):
        out = tmp_path / f"out{i}.jsonl"
        code = main([str(a) for a in [*common, "--output", out, "--max-new-tokens", 5, *extra]])
        err = capsys.readouterr().err
        assert code == 0, err
        outputs.append(out.read_text())
    assert outputs[0] == outputs[1] == outputs[2]
    assert "hit rate" in err and "no memory saved" in err  # the cpu tier without a GPU says so
    for bad, message in [
        (["--offload", "disk", "--expert-budget", "lots"], "--expert-budget 'lots'"),
        (["--offload", "disk", "--expert-budget", "5%"], "working set"),
        (["--expert-budget", "25%"], "go with --offload disk"),
        (["--offload", "cpu", "--expert-budget", "5%"], "working set"),
        (["--offload", "disk", "--cache-policy", "profile"], "needs --pin-profile"),
        (["--offload", "disk", "--expert-budget", ""], "--expert-budget ''"),
    ]:
        out = tmp_path / "bad.jsonl"
        code = main([str(a) for a in [*common, "--output", out, *bad]])
        err = capsys.readouterr().err
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()
    # refused after the model loaded (an adapter of another model): still one line on the cpu tier
    other = make_adapter(load_model(checkpoints["qwen2_moe"]), tmp_path / "other", {0: [1]}, seed=0)
    for tier in ("disk", "cpu"):
        argv = ["generate", "--model", path, "--adapter", f"o={other}", "--prompt", "x", "--offload", tier]
        code = main([str(a) for a in argv])
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


@pytest.mark.parametrize("pack", [False, True])
def test_short_read_names_the_file(checkpoints, tmp_path, pack):
    import shutil

    path = tmp_path / "ckpt"
    shutil.copytree(checkpoints["mixtral"], path)
    engine = MultiAdapterEngine.from_pretrained(
        path,
        offload=OffloadConfig(budget="50%", prefetch=("router",), cache_dir=str(tmp_path / "c"), pack=pack),
    )
    target = engine.offload.store.packed_path if pack else path / "model.safetensors"
    data = target.read_bytes()
    target.unlink()  # a new, shorter file under the name (resident weights may map the old one)
    target.write_bytes(data[: len(data) // 4])
    with pytest.raises(OSError) as raised:  # the loader's LoaderError, naming the file
        _serve(engine, _requests([None]))
    assert target.name in str(raised.value)
    assert engine.offload.loader.stats()["failed"] > 0


@pytest.mark.parametrize("family", ["gpt_oss", "qwen2_moe"])
def test_sharded_checkpoint(checkpoints, tmp_path, family):
    """Experts spread over several safetensors shards (index.json) are found and read exactly."""
    import shutil

    full = load_model(checkpoints[family])
    sharded = tmp_path / "sharded"
    full.save_pretrained(sharded, max_shard_size="20KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(checkpoints[family] / name, sharded / name)
    assert (sharded / "model.safetensors.index.json").exists()
    net, info, store = load_offloaded_model(sharded, cache_dir=tmp_path / "cache")
    assert len(store.files()) > 1 and store.kind == "checkpoint"
    for layer, ref in zip(info.layers, find_moe_layers(full).layers):
        for expert in range(layer.num_experts):
            for name, tensor in store.read_expert(layer.index, expert).items():
                assert torch.equal(tensor, getattr(ref.experts, name)[expert])
    resident = _serve(MultiAdapterEngine.from_pretrained(checkpoints[family]), _requests([None]))
    config = OffloadConfig(budget="25%", cache_dir=str(tmp_path / "cache"))
    assert (
        _serve(MultiAdapterEngine.from_pretrained(sharded, offload=config), _requests([None]))[0]
        == resident[0]
    )


@pytest.mark.parametrize("tier", [None, "disk", "cpu"])
def test_closed_engine_refuses_work(checkpoints, tmp_path, tier):
    offload = None if tier is None else OffloadConfig(tier=tier, cache_dir=str(tmp_path))
    engine = MultiAdapterEngine.from_pretrained(checkpoints["mixtral"], offload=offload)
    engine.close()
    engine.close()  # again: nothing
    with pytest.raises(UsageError, match="closed"):
        engine.generate(_requests([None]))
    with pytest.raises(UsageError, match="closed"):
        engine.prompt_logits(_requests([None]))


def test_unusable_cache_dir_names_the_cache(checkpoints, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="offload cache .*MOE_RUNTIME_CACHE"):
        load_offloaded_model(checkpoints["qwen2_moe"], cache_dir=tmp_path / "file" / "sub", pack=True)


def test_corrupt_checkpoint_is_a_usage_error(checkpoints, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(checkpoints["qwen2_moe"], bad)
    with open(bad / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(UsageError, match="shard 'model.safetensors' is truncated"):
        load_offloaded_model(bad, cache_dir=tmp_path / "cache")


def test_truncated_packed_file_is_made_again(checkpoints, tmp_path):
    path, cache = checkpoints["qwen2_moe"], tmp_path / "cache"
    _, info, store = load_offloaded_model(path, cache_dir=cache, pack=True)
    last = info.layers[-1]
    before = store.read_expert(last.index, last.num_experts - 1)  # in the half cut off below
    size = store.packed_path.stat().st_size
    with open(store.packed_path, "r+b") as f:
        f.truncate(size // 2)
    _, _, again = load_offloaded_model(path, cache_dir=cache, pack=True)
    assert again.packed_path == store.packed_path and store.packed_path.stat().st_size == size
    after = again.read_expert(last.index, last.num_experts - 1)
    assert all(torch.equal(after[name], tensor) for name, tensor in before.items())


@pytest.mark.parametrize("family", ["qwen2_moe", "gpt_oss"])
def test_offloaded_routed_lora_and_esft_equal_resident(checkpoints, tmp_path, family):
    """Routed-LoRA adapters (checked against the whole base, experts read from disk) with ESFT ones."""

    from helpers.routed_lora import write_random_lora

    from moe_runtime.models import model_fingerprint
    from moe_runtime.tuning.routed_lora import RoutedLoraSettings

    path = checkpoints[family]
    base = load_model(path)
    info = find_moe_layers(base)
    esft = make_adapter(base, tmp_path / "esft", {info.layer_indices[-1]: [0, 2]}, seed=3, info=info)
    r = write_random_lora(
        base, tmp_path / "r", RoutedLoraSettings(variant="perft-r", num_experts=3, top_k=2), seed=4
    )
    e = write_random_lora(base, tmp_path / "e", RoutedLoraSettings(variant="perft-e"), seed=5)
    offload = OffloadConfig(budget="25%", cache_dir=str(tmp_path / "c"))
    engines = [
        MultiAdapterEngine.from_pretrained(path),
        MultiAdapterEngine.from_pretrained(path, offload=offload),
    ]
    results = []
    for engine in engines:
        for name, adapter in (("esft", esft), ("r", r), ("e", e)):
            engine.add_adapter(name, adapter)
        results.append(_serve(engine, _requests(["r", "esft", None, "e"])))
    # the offloaded engine fingerprinted the base with its experts read from disk: same as in memory
    assert engines[1]._base_fingerprint == model_fingerprint(base)
    assert results[1][0] == results[0][0]
    for x, y in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-10)
    assert all(layer.experts.down_proj.is_meta for layer in engines[1].info.layers)


@pytest.mark.parametrize("family", ["qwen2_moe", "gpt_oss"])
def test_cpu_tier_on_device_equals_resident(checkpoints, tmp_path, family, device):
    """The ``cpu`` tier computing on ``device`` (a GPU: pinned host store, copy stream, events) gives
    the resident model's tokens on that device, and its logits within float64 rounding."""
    path = checkpoints[family]
    resident = MultiAdapterEngine(load_model(path).to(device), load_tokenizer(path))
    config = OffloadConfig(
        tier="cpu",
        budget="25%",
        prefetch=("router", "trajectory"),
        compute_device=device,
        cache_dir=str(tmp_path / "cache"),
    )
    offloaded = MultiAdapterEngine.from_pretrained(path, offload=config)
    executor = offloaded.offload
    assert executor.device.type == device
    assert all(t.device.type == device for c in executor.caches.values() for t in c.tensors.values())
    host = [t for layer in executor.store.tensors.values() for t in layer.values()]
    assert all(t.device.type == "cpu" and t.is_pinned() == (device == "cuda") for t in host)
    requests = _requests([None])
    tokens, logits = _serve(resident, requests)
    got_tokens, got_logits = _serve(offloaded, requests)
    assert got_tokens == tokens
    for a, b in zip(got_logits, logits):
        assert a.device.type == device
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert executor.stats.misses > 0 and executor.stats.passes > 0
    offloaded.close()


def test_host_copier_orders_copies_between_streams(device):
    """A copy starts after the compute work queued before it and the compute stream reads it only after
    it lands (on a GPU: a side stream waiting on the compute stream, an event the compute stream waits on)."""
    from moe_runtime.runtime.offload.host import HostCopier

    cuda = device == "cuda"
    copier = HostCopier(device)
    source = torch.arange(1 << 22, dtype=torch.float32)
    source = source.pin_memory() if cuda else source
    dest = torch.zeros(source.shape, device=device)
    for _ in range(3):
        if cuda:
            torch.cuda._sleep(20_000_000)  # keeps the compute stream busy while the copy is queued
        dest.fill_(-1.0)  # queued before the copy: must not overwrite it
        ticket = copier.submit(source, dest)
        copier.wait(ticket)
        assert torch.equal((dest * 1).cpu(), source)  # read on the compute stream after the wait
        source += 1  # the host side changes only after the copy was read
    copier.close()
