"""The model-family layer on a tiny random model of every supported MoE family.

Expectations come from each family's config and from the experts modules themselves (the
decorator's flags, the module's own forward), never from the code under test.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from transformers.integrations.moe import _default_apply_gate

from moe_runtime.errors import NotMoEError
from moe_runtime.models import (
    IMPLEMENTATION,
    find_moe_layers,
    install,
    merge_expert,
    model_fingerprint,
    split_expert,
    state_of,
    uninstall,
)
from moe_runtime.models.weights import fuse_slices
from moe_runtime.testing.random_models import (
    FAMILIES,
    build_random_model,
    save_random_checkpoint,
    tiny_config,
)

from .conftest import batch, logits

FAMILY_NAMES = sorted(FAMILIES)
IMPLEMENTATIONS = ["grouped_mm", "eager"]

# --- what each config says -------------------------------------------------------------------

_EXPERT_COUNT = ("n_routed_experts", "num_local_experts", "moe_num_experts", "num_experts")
_TOP_K = ("num_experts_per_tok", "num_experts_per_token", "moe_topk", "moe_k", "top_k_experts")
_SHARED_COUNT = ("n_shared_experts", "num_shared_experts", "moe_num_shared_experts")
_SHARED_WIDTH = (
    "shared_expert_intermediate_size",
    "shared_intermediate_size",
    "moe_shared_expert_intermediate_size",
    "shared_experts_intermediate_size",
)
# Families whose MoE block builds a shared MLP unconditionally (no config field for it).
_ALWAYS_SHARED = {"hunyuan_v1_moe", "granitemoehybrid"}


def _field(config, names: tuple[str, ...]):
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    raise AssertionError(f"{config.model_type}: none of {names} is set")


def config_moe_layers(config) -> list[int]:
    """Decoder layers that the config makes MoE layers, in each family's own convention."""
    n = config.num_hidden_layers
    block_types = getattr(config, "layers_block_type", None) or []
    if "moe" in block_types:  # nemotron_h: one mixer per layer
        return [i for i, kind in enumerate(block_types) if kind == "moe"]
    if hasattr(config, "layers_num_experts"):  # jamba
        return [i for i, count in enumerate(config.layers_num_experts) if count > 1]
    if getattr(config, "mlp_layer_types", None):
        return [i for i, kind in enumerate(config.mlp_layer_types) if kind != "dense"]
    if getattr(config, "enable_moe_block", None) is not None:  # gemma4
        return list(range(n)) if config.enable_moe_block else []
    if hasattr(config, "moe_layer_start_index"):  # ernie4_5_moe
        start, end, every = (
            config.moe_layer_start_index,
            config.moe_layer_end_index,
            config.moe_layer_interval,
        )
        return [i for i in range(n) if (i + 1) % every == 0 and start <= i <= end]
    if hasattr(config, "decoder_sparse_step"):  # qwen2/3 moe style
        step, dense = config.decoder_sparse_step, config.mlp_only_layers
        return [i for i in range(n) if i not in dense and (i + 1) % step == 0]
    for field in ("first_k_dense_replace", "num_dense_layers"):
        if getattr(config, field, None) is not None:
            return list(range(getattr(config, field), n))
    return list(range(n))


def config_has_shared(config) -> bool:
    if config.model_type in _ALWAYS_SHARED:
        return True
    counts = [getattr(config, f) for f in _SHARED_COUNT if getattr(config, f, None) is not None]
    if counts:
        return any(count > 0 for count in counts)
    return any((getattr(config, f, None) or 0) > 0 for f in _SHARED_WIDTH)


def config_expert_width(config) -> int:
    return _field(config, ("moe_intermediate_size", "intermediate_size"))


# --- 1. discovery ----------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_discovery_matches_config(models, family):
    model = models.get(family).model
    config = model.config.get_text_config()
    info = find_moe_layers(model)

    assert info.model_type == model.config.model_type
    assert info.layer_indices == config_moe_layers(config)
    assert 0 < len(info.layers) <= config.num_hidden_layers == info.num_hidden_layers
    for layer in info.layers:
        experts = layer.experts
        assert model.get_submodule(layer.experts_name) is experts
        assert type(experts).__name__.endswith("Experts")
        assert f".{layer.index}." in f".{layer.experts_name}."
        assert layer.top_k == _field(config, _TOP_K)
        assert layer.num_experts == _field(config, _EXPERT_COUNT) == experts.num_experts
        assert layer.intermediate_size == config_expert_width(config)
        assert layer.hidden_size == config.hidden_size
        assert layer.layout.has_gate == experts.has_gate
        assert layer.layout.is_concatenated == experts.is_concatenated
        assert layer.layout.is_transposed == experts.is_transposed
        assert layer.layout.has_bias == experts.has_bias
        assert layer.layout.has_post_expert_norm == experts.has_post_expert_norm
        assert bool(layer.shared) == config_has_shared(config)
        for name, module in zip(layer.shared_names, layer.shared, strict=True):
            assert model.get_submodule(name) is module
        assert layer.router is not None
        assert model.get_submodule(layer.router_name) is layer.router
        assert re.search("Router|Gate", type(layer.router).__name__)


# --- 2. the plugged-in implementation is exact, 6. and uninstall restores the stock one ------


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_install_is_exact_and_uninstall_restores(models, family, impl):
    built = models.get(family, None if impl == "grouped_mm" else impl)
    model = built.model
    assert model.config._experts_implementation == impl

    info = install(model)
    try:
        assert model.config._experts_implementation == IMPLEMENTATION
        assert {state_of(layer.experts).stock_name for layer in info.layers} == {impl}
        state_of(info.layers[0].experts).observers.append(lambda *args: None)
        installed = logits(model, built.inputs)
    finally:
        uninstall(model)
    torch.testing.assert_close(installed, built.stock_logits, rtol=0, atol=0)

    assert model.config._experts_implementation == impl
    for layer in info.layers:
        with pytest.raises(RuntimeError, match="not installed"):
            state_of(layer.experts)
    torch.testing.assert_close(logits(model, built.inputs), built.stock_logits, rtol=0, atol=0)


# --- 3. an observer sees exactly the routing -------------------------------------------------


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_observer_sees_the_routing(models, family):
    built = models.get(family)
    model = built.model
    info = install(model)
    observed: dict[int, torch.Tensor] = {}
    hooked: dict[int, torch.Tensor] = {}

    def add(counts, layer, top_k_index):
        counts[layer.index] = counts.get(layer.index, 0) + torch.bincount(
            top_k_index.flatten(), minlength=layer.num_experts
        )

    def observer(layer, hidden, top_k_index, top_k_weights):
        assert top_k_index.shape == top_k_weights.shape == (hidden.shape[0], layer.top_k)
        add(observed, layer, top_k_index)

    def hook_for(layer):
        def hook(module, args, kwargs, output):
            top_k_index = args[1] if len(args) > 1 else kwargs["top_k_index"]
            add(hooked, layer, top_k_index)

        return hook

    handles = []
    try:
        for layer in info.layers:
            state_of(layer.experts).observers.append(observer)
            handles.append(layer.experts.register_forward_hook(hook_for(layer), with_kwargs=True))
        logits(model, built.inputs)
    finally:
        for handle in handles:
            handle.remove()
        uninstall(model)

    assert set(observed) == set(info.layer_indices)
    tokens = built.inputs["input_ids"].numel()
    for layer in info.layers:
        torch.testing.assert_close(observed[layer.index], hooked[layer.index], rtol=0, atol=0)
        assert int(observed[layer.index].sum()) == tokens * layer.top_k
        assert int((observed[layer.index] > 0).sum()) > 1  # routing is not trivial


# --- 4. per-expert weights -------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_split_merge_round_trip_is_bit_exact(models, family):
    info = find_moe_layers(models.get(family).model)
    for layer in info.layers:
        names = layer.layout.param_names()
        before = {name: getattr(layer.experts, name).detach().clone() for name in names}
        for expert in range(layer.num_experts):
            merge_expert(layer, expert, split_expert(layer, expert))
        for name in names:
            assert torch.equal(getattr(layer.experts, name), before[name]), name

        last = layer.num_experts - 1
        original = split_expert(layer, last)
        changed = {key: value + 1 for key, value in original.items()}
        merge_expert(layer, last, changed)
        try:
            for key, value in split_expert(layer, last).items():
                assert torch.equal(value, changed[key]), key
            for name in names:
                after = getattr(layer.experts, name)
                assert torch.equal(after[:last], before[name][:last]), name
                assert not torch.equal(after[last], before[name][last]), name
        finally:
            merge_expert(layer, last, original)
        for name in names:
            assert torch.equal(getattr(layer.experts, name), before[name]), name


def _linear(x, tensors, name):
    return F.linear(x, tensors[f"{name}.weight"], tensors.get(f"{name}.bias"))


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_split_expert_is_the_expert(models, family):
    """Routing every token to one expert with weight 1 computes that expert's classic MLP."""
    info = find_moe_layers(models.get(family).model)
    generator = torch.Generator().manual_seed(2)
    for layer in (info.layers[0], info.layers[-1]):
        experts, layout = layer.experts, layer.layout
        assert not layout.has_post_expert_norm, "no supported family has one; add its norm here"
        default_gate = type(experts)._apply_gate is _default_apply_gate
        x = torch.randn(6, layer.hidden_size, generator=generator)
        for expert in range(layer.num_experts):
            tensors = split_expert(layer, expert)
            with torch.no_grad():
                routed = experts(x, torch.full((6, 1), expert), torch.ones(6, 1))
                if not layout.has_gate:
                    expected = _linear(experts.act_fn(_linear(x, tensors, "up_proj")), tensors, "down_proj")
                elif default_gate:
                    hidden = experts.act_fn(_linear(x, tensors, "gate_proj")) * _linear(x, tensors, "up_proj")
                    expected = _linear(hidden, tensors, "down_proj")
                else:  # a custom gate (gpt_oss, ...) reads the fused layout: check its re-assembly
                    fused = fuse_slices(layout, tensors)
                    for name, value in fused.items():
                        assert torch.equal(value, getattr(experts, name)[expert]), name
                    up = fused[layout.up_name]
                    up = x @ up if layout.is_transposed else F.linear(x, up)
                    up = up + fused.get(f"{layout.up_name}_bias", 0)
                    expected = _linear(experts._apply_gate(up), tensors, "down_proj")
            torch.testing.assert_close(routed, expected, rtol=1e-5, atol=1e-5)


# --- 5. dense models -------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_dense_model_is_not_moe(model_type):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        model_type,
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(NotMoEError, match=model_type):
        find_moe_layers(model)
    with pytest.raises(NotMoEError, match=model_type):
        install(model)


# --- the registry itself ---------------------------------------------------------------------


@pytest.mark.parametrize("family", ["deepseek_v2", "gpt_oss", "qwen2_moe"])
def test_checkpoint_sizes_are_settable_and_round_trip(tmp_path, family):
    from transformers import AutoModelForCausalLM

    sizes = {"num_hidden_layers": 4, "hidden_size": 96, "num_experts": 16, "top_k": 4}
    path = save_random_checkpoint(family, tmp_path / family, seed=3, **sizes)
    loaded = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    info = find_moe_layers(loaded)
    config = tiny_config(family, **sizes)
    assert info.num_hidden_layers == 4 and info.layer_indices == config_moe_layers(config)
    assert {(layer.num_experts, layer.top_k, layer.hidden_size) for layer in info.layers} == {(16, 4, 96)}
    assert model_fingerprint(loaded) == model_fingerprint(build_random_model(family, seed=3, **sizes))
    assert model_fingerprint(loaded) != model_fingerprint(build_random_model(family, seed=4, **sizes))


def test_feature_flags_are_kept():
    v2 = tiny_config("deepseek_v2")
    assert (v2.topk_method, v2.first_k_dense_replace, v2.n_shared_experts) == ("group_limited_greedy", 1, 1)
    assert v2.n_routed_experts % v2.n_group == 0 and v2.topk_group < v2.n_group
    v3 = build_random_model("deepseek_v3")
    bias = find_moe_layers(v3).layers[0].router.e_score_correction_bias
    assert bias.count_nonzero() == bias.numel()
    gpt_oss = find_moe_layers(build_random_model("gpt_oss")).layers[0]
    assert gpt_oss.layout.has_bias and gpt_oss.layout.is_transposed and not gpt_oss.layout.is_concatenated
    assert gpt_oss.experts.down_proj_bias.count_nonzero() > 0
    qwen2 = build_random_model("qwen2_moe")
    layer = find_moe_layers(qwen2).layers[0]
    assert layer.shared and hasattr(qwen2.get_submodule(layer.block_name), "shared_expert_gate")
    probe = batch(128)
    assert not torch.equal(logits(v3, probe), logits(build_random_model("deepseek_v3", seed=1), probe))


@pytest.mark.parametrize("family", ["deepseek_v2", "deepseek_v3", "axk1", "beam"])
def test_group_limited_routing_is_on(models, family):
    """With 2 expert groups and ``topk_group=1``, each token's experts all come from one group."""
    built = models.get(family)
    config = built.model.config
    group_size = _field(config, _EXPERT_COUNT) // config.n_group
    info = install(built.model)
    groups = []
    for layer in info.layers:
        state_of(layer.experts).observers.append(
            lambda layer, hidden, index, weights: groups.append(index // group_size)
        )
    try:
        logits(built.model, built.inputs)
    finally:
        uninstall(built.model)
    assert config.topk_group == 1 and groups
    for group in groups:
        assert torch.equal(group.min(dim=-1).values, group.max(dim=-1).values)
    assert len(torch.cat(groups).unique()) == config.n_group  # both groups are used
