"""Tiny random-weight models of every text MoE family in transformers v5.

Nothing is downloaded: each family is a dict of config overrides on top of its transformers
defaults, small enough to build and run in well under a second on CPU while keeping the family's
MoE features (shared experts, group-limited or biased routers, dense first layers, hybrid
attention). ``build_random_model`` randomizes every weight deterministically by seed, including
router weights and biases that transformers initializes to zero, so routing is non-trivial.
``save_random_checkpoint`` writes a loadable safetensors checkpoint; its overrides set any size.

Per-layer lists (``layer_types`` ...) are given as functions of the layer count so a caller can
override ``num_hidden_layers`` and still get a valid config.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "EXPERT_COUNT_FIELDS",
    "FAMILIES",
    "TOP_K_FIELDS",
    "UNSUPPORTED",
    "build_random_model",
    "save_random_checkpoint",
    "tiny_config",
]

# Config fields that hold the routed-expert count / experts per token, across families.
EXPERT_COUNT_FIELDS = ("n_routed_experts", "num_local_experts", "moe_num_experts", "num_experts")
TOP_K_FIELDS = ("num_experts_per_tok", "num_experts_per_token", "moe_topk", "moe_k", "top_k_experts")

# Applied when the family's config has the field; family overrides win.
_BASE: dict[str, object] = {
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 64,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "sliding_window": 4,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
_MOE = {"num_experts": 8, "top_k": 2}  # resolved to the family's own field names
# Multi-head latent attention (DeepSeek-V2 style) dimensions.
_MLA = {
    "kv_lora_rank": 16,
    "q_lora_rank": 32,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 16,
    "head_dim": 8,
    "num_key_value_heads": 4,
}
_INDEXER = {"index_topk": 4, "index_head_dim": 16, "index_n_heads": 2}
_LINEAR_ATTN = {
    "linear_key_head_dim": 8,
    "linear_value_head_dim": 8,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
}

PerLayer = Callable[[int], list]


def _dense_first(k: int, dense: str = "dense", sparse: str = "sparse") -> PerLayer:
    """``k`` dense layers, then sparse ones."""
    return lambda n: [dense] * k + [sparse] * (n - k)


def _cycle(*kinds: str) -> PerLayer:
    """Repeat ``kinds`` over the layers, so every kind occurs once ``n >= len(kinds)``."""
    return lambda n: [kinds[i % len(kinds)] for i in range(n)]


_SWA = {"layer_types": _cycle("sliding_attention", "full_attention")}  # both attention kinds present
_DENSE_FIRST = {"num_hidden_layers": 3, "mlp_layer_types": _dense_first(1)}  # one dense layer, then MoE
_GROUPED = {"n_group": 2, "topk_group": 1}  # group-limited routing: 2 groups of 4 experts, pick 1 group

# model_type -> config overrides. ``num_experts`` / ``top_k`` are aliases resolved to the family's own
# fields (8 experts, top-2 unless set here); per-layer lists are functions of the layer count.
# fmt: off
FAMILIES: dict[str, dict] = {
    "afmoe": {"num_dense_layers": 1, "num_hidden_layers": 3, "num_shared_experts": 1,
              "global_attn_every_n_layers": 2},
    "aria_text": {"moe_num_shared_experts": 1},
    "axk1": {**_MLA, **_GROUPED, **_DENSE_FIRST, "n_shared_experts": 1},
    "axk2": {**_MLA, **_INDEXER, **_DENSE_FIRST, "n_shared_experts": 1, "gated_norm_rank": 4},
    "bailing_hybrid": {**_MLA, "num_shared_experts": 1, "num_expert_group": 2, "topk_group": 1,
                       "first_k_dense_replace": 1, "num_hidden_layers": 3, "layer_group_size": 2,
                       "linear_head_dim": 8, "linear_num_heads": 4},
    "beam": {**_GROUPED, **_DENSE_FIRST, **_SWA},
    "cohere2_moe": {**_SWA, "num_shared_experts": 1, "sliding_window_pattern": 2},
    "deepseek_v2": {**_MLA, **_GROUPED, "topk_method": "group_limited_greedy", "n_shared_experts": 1,
                    "first_k_dense_replace": 1, "num_hidden_layers": 3},
    "deepseek_v3": {**_MLA, **_GROUPED, "n_shared_experts": 1, "first_k_dense_replace": 1, "num_hidden_layers": 3},
    "deepseek_v32": {**_MLA, **_INDEXER, **_GROUPED, **_DENSE_FIRST, "n_shared_experts": 1,
                     "first_k_dense_replace": 1},
    "deepseek_v4": {**_INDEXER, "head_dim": 16, "q_lora_rank": 32, "qk_rope_head_dim": 8, "num_key_value_heads": 1,
                    "o_groups": 2, "o_lora_rank": 16, "hc_mult": 2, "hc_sinkhorn_iters": 3, "num_hidden_layers": 3,
                    "mlp_layer_types": _dense_first(1, "hash_moe", "moe"),  # first layer hash-routed
                    "layer_types": _cycle("compressed_sparse_attention", "heavily_compressed_attention"),
                    "compress_rates": {"compressed_sparse_attention": 2, "heavily_compressed_attention": 4}},
    "dots1": {"n_shared_experts": 1, "first_k_dense_replace": 1, "num_hidden_layers": 3},
    "dots3_note_text": {**_MLA, **_INDEXER, **_GROUPED, **_DENSE_FIRST, "head_dim": 16, "n_shared_experts": 1,
                        "shared_experts_intermediate_size": 32,
                        "layer_types": _cycle("indexed_attention", "sliding_attention"),
                        "swa_num_attention_heads": 4, "swa_num_key_value_heads": 4, "swa_q_lora_rank": 32,
                        "swa_kv_lora_rank": 16, "swa_head_dim": 16, "swa_qk_nope_head_dim": 8,
                        "swa_v_head_dim": 16},
    "ernie4_5_moe": {"moe_num_shared_experts": 1, "moe_layer_start_index": 1, "moe_layer_end_index": 2,
                     "num_hidden_layers": 3},
    "exaone_moe": {**_DENSE_FIRST, **_SWA, "num_shared_experts": 1, "first_k_dense_replace": 1},
    "flex_olmo": {},
    "flint": {**_SWA, "mlp_only_layers": [0], "num_hidden_layers": 3},
    "gemma4_text": {**_SWA, "enable_moe_block": True, "hidden_size_per_layer_input": 8,
                    "vocab_size_per_layer_input": 128, "per_layer_config": {}},
    "glm4_moe": {"n_shared_experts": 1, "first_k_dense_replace": 1, "num_hidden_layers": 3},
    "glm4_moe_lite": {**_MLA, **_DENSE_FIRST, "n_shared_experts": 1},
    "glm_moe_dsa": {**_MLA, **_INDEXER, **_DENSE_FIRST, "n_shared_experts": 1, "first_k_dense_replace": 1},
    "gpt_oss": {**_SWA},
    "granitemoe": {},
    "granitemoe_swa": {**_SWA},
    "granitemoehybrid": {"shared_intermediate_size": 32, "layer_types": _cycle("linear_attention", "full_attention"),
                         "mamba_n_heads": 8, "mamba_d_state": 8, "mamba_d_head": 16, "mamba_chunk_size": 8},
    "granitemoeshared": {"shared_intermediate_size": 32},
    "hunyuan_v1_moe": {},
    "hy_v3": {**_DENSE_FIRST, "num_shared_experts": 1},
    "hy_v4": {**_MLA, **_INDEXER, **_DENSE_FIRST, "n_shared_experts": 1, "hc_mult": 2,
              "indexer_types": _cycle("full", "shared")},
    "inkling_text": {"n_shared_experts": 1, "swa_num_attention_heads": 4, "swa_num_key_value_heads": 2,
                     "swa_head_dim": 16, "sliding_window_size": 8, "d_rel": 4, "rel_extent": 16,
                     "layer_types": _cycle("hybrid_sliding", "hybrid")},
    "inkling2_text": {"swa_num_attention_heads": 4, "swa_num_key_value_heads": 2, "swa_head_dim": 16,
                      "sliding_window_size": 8, "d_rel": 4, "rel_extent": 16, "unpadded_vocab_size": 128,
                      "n_layers_per_attn_res_block": 1, "layer_types": _cycle("hybrid_sliding", "hybrid")},
    "jamba": {"num_hidden_layers": 3, "attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2,
              "expert_layer_offset": 0, "mamba_d_state": 8, "mamba_dt_rank": 8},
    "kimi_linear": {**_MLA, **_DENSE_FIRST, "num_shared_experts": 1, "linear_head_dim": 8, "linear_num_heads": 4,
                    "layer_types": _cycle("linear_attention", "full_attention")},
    "kolibri1": {**_SWA},
    "laguna": {**_DENSE_FIRST, "num_attention_heads_per_layer": None},
    "lfm2_moe": {"num_dense_layers": 1, "num_hidden_layers": 3, "layer_types": _cycle("conv", "full_attention")},
    "mellum": {},
    "mimo_v2_flash": {**_DENSE_FIRST, **_SWA, "v_head_dim": 16},
    "minimax": {"block_size": 4},
    "minimax_m2": {},
    "minimax_m3_vl_text": {**_DENSE_FIRST, "dense_intermediate_size": 64, "shared_intermediate_size": 32,
                           "rotary_dim": 8, "index_n_heads": 2, "index_head_dim": 16, "index_block_size": 4,
                           "index_topk_blocks": 2},
    "mixtral": {},
    "nemotron_h": {"num_hidden_layers": 3,
                   "layers_block_type": _cycle("linear_attention", "moe", "full_attention", "mlp"),
                   "moe_shared_expert_intermediate_size": 32, "mamba_num_heads": 4, "mamba_head_dim": 16,
                   "ssm_state_size": 8, "n_groups": 1, "chunk_size": 8},
    "olmoe": {},
    "phimoe": {},
    "qwen2_moe": {},
    "qwen3_5_moe_text": {**_LINEAR_ATTN, "full_attention_interval": 2},
    "qwen3_moe": {},
    "qwen3_next": {**_LINEAR_ATTN, "full_attention_interval": 2},
    "qwen4_exp_text": {**_LINEAR_ATTN, "full_attention_interval": 2, "hc_count": 2, "hc_lowrank": 8,
                       "ple_embed_dim": 16, "heads_per_ngram": 2, "ngram_vocab_size_base": 256,
                       "split_ngram_parts": 4, "indexer_n_heads": 2, "indexer_kv_heads": 1,
                       "indexer_head_dim": 16, "indexer_budget": 8, "indexer_compress_ratio": 4},
    "solar_open": {"n_shared_experts": 1},
    "zaya": {"router_hidden_size": 16, "top_k": 1},  # ZAYA supports top-1 routing only
}
# fmt: on

# Directories using ``@use_experts_implementation`` that this registry cannot build, and why.
_VISION_ONLY = "vision-language model: only a *ForConditionalGeneration class, no causal LM for its text part"
UNSUPPORTED: dict[str, str] = {
    "deepseek_ocr2": _VISION_ONLY,
    "diffusion_gemma": "block-diffusion model (DiffusionGemmaForBlockDiffusion), not a causal LM",
    "ernie4_5_vl_moe": _VISION_ONLY,
    "glm4v_moe": _VISION_ONLY,
    "glm5_next": _VISION_ONLY,
    "mistral4": "Mistral4ForCausalLM exists but is not registered with AutoModelForCausalLM",
    "mistral_large4": _VISION_ONLY,
    "muse_spark": "vision/audio-language model: only MuseSparkForConditionalGeneration, no causal LM",
    "openai_privacy_filter": "bidirectional encoder for token classification, not a causal LM",
    "qwen3_omni_moe": "omni (thinker/talker) model: only *ForConditionalGeneration classes, no causal LM",
    "qwen3_vl_moe": _VISION_ONLY,
    "unlimited_ocr": _VISION_ONLY,
}


def _resolve(model_type: str, overrides: dict) -> dict:
    """Config kwargs: base sizes (fields the family has) < family overrides < caller overrides."""
    from transformers import AutoConfig

    defaults = AutoConfig.for_model(model_type).to_dict()
    values = {k: v for k, v in _BASE.items() if k in defaults}
    values.update(_MOE)
    values.update(FAMILIES[model_type])
    values.update(overrides)
    num_experts, top_k = values.pop("num_experts"), values.pop("top_k")
    explicit = set(FAMILIES[model_type]) | set(overrides)  # fields spelled out by name win over the aliases
    explicit -= set(_MOE)
    for fields, value in ((EXPERT_COUNT_FIELDS, num_experts), (TOP_K_FIELDS, top_k)):
        for field in fields:
            if field in defaults and field not in explicit:
                values[field] = value
    # per-layer input embeddings (gemma4) index the same token ids as the main embedding
    if (
        "vocab_size" in overrides
        and "vocab_size_per_layer_input" in values
        and "vocab_size_per_layer_input" not in overrides
    ):
        values["vocab_size_per_layer_input"] = overrides["vocab_size"]
    n = values["num_hidden_layers"]
    return {k: v(n) if callable(v) else v for k, v in values.items()}


def tiny_config(model_type: str, **overrides):
    """A tiny config of ``model_type`` with its MoE features kept on.

    Args:
        model_type: a key of :data:`FAMILIES`.
        **overrides: config fields to set on top; ``num_experts`` and ``top_k`` set the family's own
            expert-count / experts-per-token fields, per-layer lists may be ``f(num_layers)``.

    Returns:
        A ``PretrainedConfig``.
    """
    from transformers import AutoConfig

    if model_type not in FAMILIES:
        reason = UNSUPPORTED.get(model_type, "not an MoE family known to this registry")
        raise KeyError(f"model type '{model_type}': {reason}")
    return AutoConfig.for_model(model_type, **_resolve(model_type, overrides))


def _randomize_routing(model: nn.Module, generator: torch.Generator) -> None:
    """Make routing input-dependent and let every routing bias matter.

    transformers initializes router weights with std 0.02 (near-uniform routing at random init) and
    routing biases, expert biases and hash-routing tables with zeros. Router matrices get std
    ``fan_in ** -0.5`` (logits of order 1, as in trained routers); zero tensors of the MoE block get
    small random values, and hash tables random distinct experts per token.
    """
    from ..models.discovery import find_moe_layers

    def normal(shape: torch.Size, std: float) -> torch.Tensor:
        return torch.randn(shape, generator=generator) * std

    with torch.no_grad():
        for layer in find_moe_layers(model).layers:
            if layer.router is not None:
                for name, param in layer.router.named_parameters():
                    if param.is_floating_point() and param.dim() >= 2 and "bias" not in name:
                        param.copy_(normal(param.shape, param.shape[-1] ** -0.5).to(param.dtype))
            block = model.get_submodule(layer.block_name) if layer.block_name else layer.experts
            for name, tensor in list(block.named_parameters()) + list(block.named_buffers()):
                if tensor.numel() == 0 or bool(tensor.count_nonzero()):
                    continue
                if tensor.is_floating_point():
                    tensor.copy_(normal(tensor.shape, 0.1).to(tensor.dtype))
                elif name.endswith("tid2eid"):  # token id -> expert ids, distinct per token
                    order = torch.rand(tensor.shape[0], layer.num_experts, generator=generator).argsort(
                        dim=-1
                    )
                    tensor.copy_(order[:, : tensor.shape[1]].to(tensor.dtype))


def build_random_model(
    model_type: str,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    experts_implementation: str | None = None,
    **overrides,
) -> nn.Module:
    """A randomly initialized causal LM of ``model_type``, in eval mode.

    Args:
        model_type: a key of :data:`FAMILIES`.
        seed: makes every weight reproducible.
        dtype: parameter dtype.
        experts_implementation: e.g. ``"eager"``; default keeps transformers' choice (``grouped_mm``).
        **overrides: forwarded to :func:`tiny_config`.
    """
    from transformers import AutoModelForCausalLM

    load_kwargs = {"experts_implementation": experts_implementation} if experts_implementation else {}
    config = tiny_config(model_type, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, **load_kwargs)
    _randomize_routing(model, torch.Generator().manual_seed(seed))
    return model.eval()


def save_random_checkpoint(
    model_type: str, out_dir: str | Path, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides
) -> Path:
    """Build a random model (see :func:`build_random_model`) and save it as safetensors.

    Args:
        model_type: a key of :data:`FAMILIES`.
        out_dir: checkpoint directory (created).
        seed: weight seed.
        dtype: stored parameter dtype.
        **overrides: sizes and other config fields, e.g. ``hidden_size=1024, moe_intermediate_size=512,
            num_hidden_layers=16, num_experts=64, top_k=4`` (see :func:`tiny_config`).

    Returns:
        The checkpoint directory, loadable with ``AutoModelForCausalLM.from_pretrained``.
    """
    model = build_random_model(model_type, seed=seed, dtype=dtype, **overrides)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    return out
