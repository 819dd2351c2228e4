"""Prompts and decode steps of recognised MoE families through the compiled ``decode_step`` op (CPU,
float32).

    prefill: one op call, one row per real prompt token (causal mask, each sequence's last logits)
             -> KV buffers [B, Hkv, capacity, D] per layer and a new DynamicCache viewing them;
             prompts of more tokens than ``prompt_rows_max()`` (192 with AVX-512): the model's forward
    decode:  cache layers --copied once (unless the prefill made them views)--> KV buffers
             every step: decode_step(ids, positions, mask, buffers, weights) -> logits [B, V]
             the cache's layers stay views buffers[:, :, :T] of the buffers, so everything that cuts,
             merges or trims the cache (and a plain forward, if one runs) still sees a normal cache;
             a cache whose tensors are no longer those views is copied into fresh buffers.

A decode step through transformers' modules costs ~5 ms of Python and dispatch per forward beside the
weight reads (docs/benchmarks.md, #19); this runs it in one op call. :meth:`FastDecode.of` recognises
a family by its exact module classes (Mixtral, Qwen3-MoE, OLMoE, Qwen2-MoE) and checks every setting
the op assumes (SiLU experts in the fused ``[E, 2I, H]`` / ``[E, H, I]`` layout, a static rotary type,
RMSNorms of one epsilon, no biases it does not carry, no softcapping, no module it does not know);
anything else gets None and the model's forward runs as before. :meth:`FastDecode.blocked` says per
step why the fast step cannot serve (hooks or observers that must see the modules run, sliding
windows shorter than the cache, more rows than the streaming kernels take).

``MOE_RUNTIME_FAST_DECODE=0`` turns it off.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..models.hook import _STATE_ATTR, state_generation
from ..ops import extension_available
from ..ops.decode_step import SLOTS, StepSettings, decode_step, prompt_rows_max

__all__ = ["FAMILIES", "FastDecode", "KVBuffers", "fast_decode_enabled"]

MAX_ROWS = 16
"""Rows per step at most (the streaming kernels' limit; bigger batches keep the model's forward)."""

STATIC_ROPE = ("default", "linear", "yarn", "llama3")
"""Rotary types whose ``inv_freq`` and ``attention_scaling`` do not change with the sequence."""


@dataclass(frozen=True)
class _Family:
    prefix: str  # class-name prefix in the family's modeling module
    qk_norm: str | None
    attention_children: frozenset[str]
    shared_expert: bool


FAMILIES = {
    "mixtral": _Family("Mixtral", None, frozenset({"q_proj", "k_proj", "v_proj", "o_proj"}), False),
    "qwen3_moe": _Family(
        "Qwen3Moe",
        "head",
        frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"}),
        False,
    ),
    "olmoe": _Family(
        "Olmoe", "whole", frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"}), False
    ),
    "qwen2_moe": _Family("Qwen2Moe", None, frozenset({"q_proj", "k_proj", "v_proj", "o_proj"}), True),
}
"""The families the op serves, by ``config.model_type``."""


def fast_decode_enabled() -> bool:
    """False when ``MOE_RUNTIME_FAST_DECODE`` is 0/false/no/off."""
    return os.environ.get("MOE_RUNTIME_FAST_DECODE", "1").lower() not in {"0", "false", "no", "off"}


class _Unsupported(Exception):
    pass


def _require(ok: bool, why: str) -> None:
    if not ok:
        raise _Unsupported(why)


def _exact(module: object, cls: type | None, what: str) -> None:
    _require(
        cls is not None and type(module) is cls, f"{what} is {type(module).__name__}, not the family's own"
    )


def _children(module: nn.Module) -> set[str]:
    return {name for name, _ in module.named_children()}


def _params(module: nn.Module) -> set[str]:
    return {name for name, _ in module.named_parameters(recurse=False)}


class KVBuffers:
    """Per-layer key and value buffers ``[B, Hkv, capacity, D]`` of one batch of rows: the slices of
    one ``[2L, B, Hkv, capacity, D]`` store (keys, values, keys, ... by layer), so that a step's new
    cache views are one ``narrow`` and one ``unbind`` instead of a call per tensor."""

    def __init__(self, store: torch.Tensor) -> None:
        self.store = store
        self.tensors = list(store.unbind(0))
        self.views: tuple[torch.Tensor, ...] = ()  # the views last handed to the cache's layers
        self.view_length = -1

    def views_of(self, length: int) -> tuple[torch.Tensor, ...]:
        """``buffer[:, :, :length]`` of every buffer, in order."""
        return self.store.narrow(3, 0, length).unbind(0)

    @property
    def capacity(self) -> int:
        return self.tensors[0].shape[2]

    def viewed_by(self, layers: list[DynamicLayer], length: int) -> bool:
        """Whether every cache layer holds exactly ``buffer[:, :, :length]`` views of these buffers."""
        if length == self.view_length and len(self.views) == 2 * len(layers):
            views = iter(self.views)  # still the very views the last step handed out: nothing else to check
            if all(layer.keys is next(views) and layer.values is next(views) for layer in layers):
                return True
        for i, layer in enumerate(layers):
            for held, buf in ((layer.keys, self.tensors[2 * i]), (layer.values, self.tensors[2 * i + 1])):
                if (
                    held.data_ptr() != buf.data_ptr()
                    or held.shape[0] != buf.shape[0]
                    or held.shape[2] != length
                    or held.stride() != buf.stride()
                ):
                    return False
        return True


class FastDecode:
    """The compiled decode step of one recognised model (see the module docstring).

    Build with :meth:`of`; weights are read from the model's modules at every step, so replaced
    parameters are always the ones used.
    """

    def __init__(self, model: nn.Module, family: _Family, settings: StepSettings, entries, window) -> None:
        self.model, self.family, self.settings = model, family, settings
        self._entries = entries  # (parameter dict, name) or None per weight slot, then the model-wide ones
        self.window = window  # the smallest sliding window of any layer (None: full attention)
        self.modules = [m for m in model.modules() if m is not model]
        self._scanned: tuple[int, int] | None = None  # (hook id, state generation) of the last clean scan
        self._states: list = []  # the experts states found then
        self._empty = torch.empty(0)

    # recognition --------------------------------------------------------------------------------

    @classmethod
    def of(cls, model: nn.Module) -> FastDecode | None:
        """The fast step of ``model``, or None where it is off, not built or not recognised."""
        if not fast_decode_enabled() or not extension_available():
            return None
        return cls.recognise(model)[0]

    @classmethod
    def recognise(cls, model: nn.Module) -> tuple[FastDecode | None, str]:
        """``(fast step, "")``, or ``(None, why not)``."""
        try:
            return cls._recognise(model), ""
        except _Unsupported as why:
            return None, str(why)

    @classmethod
    def _recognise(cls, model: nn.Module) -> FastDecode:
        import importlib

        config = getattr(model, "config", None)
        model_type = getattr(config, "model_type", None)
        _require(model_type in FAMILIES, f"family {model_type!r} has no compiled decode step")
        family = FAMILIES[model_type]
        modeling = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")

        def own(name: str) -> type | None:
            return getattr(modeling, family.prefix + name, None)

        _exact(model, own("ForCausalLM"), "the model")
        _require(not model.training, "the model is in training mode")
        _require(_children(model) == {"model", "lm_head"}, "the causal LM has modules the step does not know")
        base = model.model
        _exact(base, own("Model"), "the base model")
        _require(
            _children(base) == {"embed_tokens", "layers", "norm", "rotary_emb"},
            "the base model has modules the step does not know",
        )
        _require(type(base.embed_tokens) is nn.Embedding, "the embedding is not a plain nn.Embedding")
        _require(
            type(model.lm_head) is nn.Linear and model.lm_head.bias is None,
            "the LM head is not a plain linear",
        )
        for field in (
            "final_logit_softcapping",
            "attn_logit_softcapping",
            "logits_scaling",
            "embedding_multiplier",
        ):
            _require(getattr(config, field, None) in (None, 1.0), f"config.{field} is set")
        _require(getattr(config, "hidden_act", "silu") == "silu", f"hidden_act is {config.hidden_act}")
        rotary = base.rotary_emb
        _exact(rotary, own("RotaryEmbedding"), "the rotary module")
        _require(rotary.rope_type in STATIC_ROPE, f"rope type {rotary.rope_type!r} is not supported")
        norm_cls = own("RMSNorm")
        _exact(base.norm, norm_cls, "the final norm")
        eps = base.norm.variance_epsilon

        def norm(module: nn.Module, size: int, what: str) -> tuple:
            _exact(module, norm_cls, what)
            _require(module.variance_epsilon == eps, f"{what} has another epsilon")
            _require(
                _params(module) == {"weight"} and module.weight.shape == (size,), f"{what} is not [{size}]"
            )
            return (module._parameters, "weight")

        def linear(module: nn.Module, out_f: int, in_f: int, what: str, bias_ok: bool) -> tuple:
            _require(type(module) is nn.Linear, f"{what} is not a plain nn.Linear")
            _require(tuple(module.weight.shape) == (out_f, in_f), f"{what} is not [{out_f}, {in_f}]")
            _require(bias_ok or module.bias is None, f"{what} has a bias")
            return (module._parameters, "weight"), (
                module._parameters,
                "bias",
            ) if module.bias is not None else None

        hidden = config.hidden_size
        heads, kv_heads, head_dim = None, None, None
        top_k, norm_topk = None, None
        scaling = None
        window = None
        entries: list = []
        decoder_cls, attn_cls = own("DecoderLayer"), own("Attention")
        for i, layer in enumerate(base.layers):
            _exact(layer, decoder_cls, f"layer {i}")
            _require(
                _children(layer) == {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"},
                f"layer {i} has modules the step does not know",
            )
            attn = layer.self_attn
            _exact(attn, attn_cls, f"layer {i} attention")
            _require(_children(attn) == family.attention_children, f"layer {i} attention has other modules")
            d = attn.head_dim
            h = attn.q_proj.weight.shape[0] // d
            hk = attn.k_proj.weight.shape[0] // d
            if heads is None:
                heads, kv_heads, head_dim, scaling = h, hk, d, float(attn.scaling)
            _require(
                (h, hk, d, float(attn.scaling)) == (heads, kv_heads, head_dim, scaling),
                "layers differ in attention shape",
            )
            _require(h % hk == 0 and h * d == attn.o_proj.weight.shape[1], f"layer {i}: odd attention shape")
            layer_window = getattr(attn, "sliding_window", None)
            if model_type == "mixtral":  # Mixtral's attention reads the window from the config
                layer_window = getattr(config, "sliding_window", None)
            if layer_window is not None:
                window = layer_window if window is None else min(window, layer_window)
            slot: dict[str, object] = dict.fromkeys(SLOTS)
            slot["input_norm"] = norm(layer.input_layernorm, hidden, f"layer {i} input norm")
            slot["post_norm"] = norm(layer.post_attention_layernorm, hidden, f"layer {i} post-attention norm")
            slot["q"], slot["q_bias"] = linear(attn.q_proj, h * d, hidden, f"layer {i} q_proj", True)
            slot["k"], slot["k_bias"] = linear(attn.k_proj, hk * d, hidden, f"layer {i} k_proj", True)
            slot["v"], slot["v_bias"] = linear(attn.v_proj, hk * d, hidden, f"layer {i} v_proj", True)
            slot["o"], slot["o_bias"] = linear(attn.o_proj, hidden, h * d, f"layer {i} o_proj", True)
            if family.qk_norm == "head":
                slot["q_norm"] = norm(attn.q_norm, d, f"layer {i} q_norm")
                slot["k_norm"] = norm(attn.k_norm, d, f"layer {i} k_norm")
            elif family.qk_norm == "whole":
                slot["q_norm"] = norm(attn.q_norm, h * d, f"layer {i} q_norm")
                slot["k_norm"] = norm(attn.k_norm, hk * d, f"layer {i} k_norm")
            mlp = layer.mlp
            if type(mlp) is own("SparseMoeBlock"):
                expected = {"gate", "experts"} | (
                    {"shared_expert", "shared_expert_gate"} if family.shared_expert else set()
                )
                _require(
                    _children(mlp) == expected and not _params(mlp), f"layer {i} MoE block has other modules"
                )
                router, experts = mlp.gate, mlp.experts
                _exact(router, own("TopKRouter"), f"layer {i} router")
                _require(
                    _params(router) == {"weight"} and not _children(router),
                    f"layer {i} router has other weights",
                )
                e = router.weight.shape[0]
                _require(tuple(router.weight.shape) == (e, hidden), f"layer {i} router is not [E, {hidden}]")
                k = router.top_k
                # Mixtral always renormalises the top-k weights; the others follow norm_topk_prob.
                norm_k = True if model_type == "mixtral" else bool(router.norm_topk_prob)
                if top_k is None:
                    top_k, norm_topk = k, norm_k
                _require((k, norm_k) == (top_k, norm_topk), "layers differ in top-k routing")
                _exact(experts, own("Experts"), f"layer {i} experts")
                _require(
                    _params(experts) == {"gate_up_proj", "down_proj"}, f"layer {i} experts have other weights"
                )
                _require(_is_silu(experts.act_fn), f"layer {i} experts' activation is not SiLU")
                gu, dn = experts.gate_up_proj, experts.down_proj
                inter = dn.shape[-1]
                _require(
                    tuple(gu.shape) == (e, 2 * inter, hidden) and tuple(dn.shape) == (e, hidden, inter),
                    f"layer {i} experts are not [E, 2I, H] / [E, H, I]",
                )
                _require(not getattr(experts, "is_transposed", False), f"layer {i} experts are transposed")
                slot["router"] = (router._parameters, "weight")
                slot["gate_up"] = (experts._parameters, "gate_up_proj")
                slot["down"] = (experts._parameters, "down_proj")
                if family.shared_expert:
                    slot.update(
                        _mlp(mlp.shared_expert, own("MLP"), hidden, f"layer {i} shared expert", linear)
                    )
                    slot["shared_expert_gate"] = linear(
                        mlp.shared_expert_gate, 1, hidden, f"layer {i} shared gate", False
                    )[0]
            elif own("MLP") is not None and type(mlp) is own("MLP"):
                slot.update(_mlp(mlp, own("MLP"), hidden, f"layer {i} dense MLP", linear))
            else:
                raise _Unsupported(f"layer {i} MLP is {type(mlp).__name__}")
            entries.extend(slot[name] for name in SLOTS)
        _require(heads is not None, "the model has no layers")
        inv_freq = rotary.inv_freq
        _require(
            inv_freq.dtype == torch.float32 and tuple(inv_freq.shape) == (head_dim // 2,),
            "the rotary frequencies do not cover the whole head (partial rotary)",
        )
        entries.extend(
            [
                (base.embed_tokens._parameters, "weight"),
                (base.norm._parameters, "weight"),
                (model.lm_head._parameters, "weight"),
                (rotary._buffers, "inv_freq"),
            ]
        )
        settings = StepSettings(
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            top_k=top_k or 1,
            norm_topk_prob=bool(norm_topk),
            qk_norm=family.qk_norm,
            eps=float(eps),
            scaling=scaling,
            rope_scale=float(rotary.attention_scaling),
            clip_qkv=float(getattr(config, "clip_qkv", None) or 0.0),
        )
        fast = cls(model, family, settings, entries, window)
        _require(
            all(t.dtype == torch.float32 and t.device.type == "cpu" for t in fast._tensors()),
            "the weights are not float32 on the CPU",
        )
        return fast

    # per step -----------------------------------------------------------------------------------

    def _tensors(self) -> list[torch.Tensor]:
        empty = self._empty
        return [empty if e is None else e[0][e[1]] for e in self._entries]

    def blocked(self, rows: int, length: int, limit: int = MAX_ROWS) -> str | None:
        """Why a step of ``rows`` rows (at most ``limit``) over ``length`` cache columns (the new ones
        included) cannot run here, or None. Hooks on any module but the model itself (whose hooks
        :meth:`forward` calls) must see the modules run; the engine's linear-term hooks add nothing
        to base rows."""
        if rows > limit:
            return f"{rows} rows (at most {limit})"
        if self.window is not None and length >= self.window:
            return "the cache reaches the sliding window"
        if torch.is_grad_enabled():
            return "gradients are on"
        if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
            return "global module hooks"
        # Before every step: the modules are scanned again only when a hook or an experts state may
        # have been added since the last scan that found nothing (every hook registration draws a new
        # RemovableHandle id; a removal can only unblock). The few states found are checked each time.
        key = (RemovableHandle.next_id, state_generation())
        if key != self._scanned:
            reason = self._scan_hooks()
            if reason is not None:
                return reason
            self._states = [m.__dict__[_STATE_ATTR] for m in self.modules if _STATE_ATTR in m.__dict__]
            self._scanned = key
        for state in self._states:
            if state.observers:
                return "routing observers"
        return None

    def _scan_hooks(self) -> str | None:
        """Why hooks on the inner modules block the step (a hook the engine's base rows pass through
        does not), or None."""
        for module in self.modules:
            if module._forward_pre_hooks:
                return f"a forward pre-hook on {type(module).__name__}"
            for hook in module._forward_hooks.values():
                if not getattr(hook, "_moe_runtime_base_passthrough", False):
                    return f"a forward hook on {type(module).__name__}"
        return None

    def step(
        self,
        buffers: KVBuffers | None,
        cache: DynamicCache,
        ids: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor,
        reserve: int,
    ) -> tuple[KVBuffers, torch.Tensor]:
        """One decode step: ``ids [B]`` at ``positions [B]``, ``mask [B, T]`` (the cache's ``T - 1``
        columns and the new one). Copies the cache into buffers (with room for ``reserve`` more
        columns, at most doubling its length: a copy per doubling) unless it already is a view of
        ``buffers``; afterwards its layers are views of the returned buffers, one column longer.
        Returns the buffers and ``logits [B, V]``."""
        length = mask.shape[1]
        layers = list(cache.layers)
        if buffers is None or buffers.capacity < length or not buffers.viewed_by(layers, length - 1):
            buffers = self._copy(layers, length - 1, length + min(max(reserve, 0), max(length, 32)))
        tensors = self._tensors()
        per_layer = len(SLOTS) * len(layers)
        logits = decode_step(
            ids,
            positions,
            mask,
            buffers.tensors,
            tensors[:per_layer],
            *tensors[per_layer:],
            self.settings,
        )
        views = buffers.views_of(length)
        for i, layer in enumerate(layers):
            layer.keys, layer.values = views[2 * i], views[2 * i + 1]
        buffers.views, buffers.view_length = views, length
        return buffers, logits

    def prompt_blocked(self, mask: torch.Tensor) -> str | None:
        """Why a left-padded prompt batch (``mask [B, S]``) cannot run through :meth:`prompt`, or None."""
        if not bool(mask[:, -1].all()):
            return "a row's last column is padding"
        return self.blocked(int(mask.sum()), mask.shape[1], limit=prompt_rows_max())

    def prompt_cache(self, mask: torch.Tensor | None = None) -> DynamicCache | None:
        """The empty cache the model's forward would start, if it is one plain layer per model layer
        (what :meth:`prompt` fills) and nothing :meth:`prompt_blocked` names stands in the way of the
        prompt batch ``mask`` (when given), else None."""
        if mask is not None and self.prompt_blocked(mask) is not None:
            return None
        cache = DynamicCache(config=self.model.config)
        layers = cache.layers
        if len(layers) * len(SLOTS) + 4 != len(self._entries) or any(
            type(layer) is not DynamicLayer for layer in layers
        ):
            return None
        return cache

    def prompt(
        self,
        cache: DynamicCache,
        ids: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        reserve: int,
    ) -> tuple[KVBuffers, torch.Tensor]:
        """A prefill of the left-padded ``ids [B, S]`` (``mask``, ``positions`` alike) in one op call,
        one row per real token, each attending to its sequence's real tokens up to itself, into the
        empty ``cache`` of :meth:`prompt_cache`. Returns the buffers (room for ``reserve`` more
        columns, at most doubling), whose first ``S`` columns the cache's layers now view (padding
        columns hold zeros), and each row's next-token ``logits [B, V]``."""
        layers = cache.layers
        s = self.settings
        batch, length = ids.shape
        valid = mask.bool()
        seq, col = valid.nonzero(as_tuple=True)  # one row per real token, sequence by sequence
        rows_mask = valid[seq] & torch.ones(length, length, dtype=torch.bool).tril_()[col]
        last = valid.sum(1).cumsum(0) - 1  # each sequence's last row
        capacity = length + min(max(reserve, 0), max(length, 32))
        store = torch.empty(2 * len(layers), batch, s.num_kv_heads, capacity, s.head_dim, dtype=torch.float32)
        if not bool(valid.all()):
            store.narrow(3, 0, length).zero_()  # padding columns: never attended, but finite
        buffers = KVBuffers(store)
        tensors = self._tensors()
        per_layer = len(SLOTS) * len(layers)
        logits = decode_step(
            ids[seq, col],
            positions[seq, col],
            rows_mask,
            buffers.tensors,
            tensors[:per_layer],
            *tensors[per_layer:],
            self.settings,
            slots=torch.stack((seq, col), dim=1),
            logit_rows=last,
        )
        views = buffers.views_of(length)
        for i, layer in enumerate(layers):
            layer.lazy_initialization(views[2 * i], views[2 * i + 1])
            layer.keys, layer.values = views[2 * i], views[2 * i + 1]
        buffers.views, buffers.view_length = views, length
        return buffers, logits

    def _copy(self, layers: list[DynamicLayer], cached: int, capacity: int) -> KVBuffers:
        s = self.settings
        rows = layers[0].keys.shape[0]
        store = torch.empty(2 * len(layers), rows, s.num_kv_heads, capacity, s.head_dim, dtype=torch.float32)
        for i, layer in enumerate(layers):
            store[2 * i, :, :, :cached] = layer.keys
            store[2 * i + 1, :, :, :cached] = layer.values
        return KVBuffers(store)

    def cache_fits(self, cache, length: int) -> bool:
        """Whether ``cache`` is a plain DynamicCache of one layer per model layer, ``length`` columns."""
        if type(cache) is not DynamicCache:
            return False
        layers = cache.layers
        if len(layers) * len(SLOTS) + 4 != len(self._entries):
            return False
        s = self.settings
        for layer in layers:
            if type(layer) is not DynamicLayer or not layer.is_initialized:
                return False
            keys = layer.keys
            if (
                keys.dtype != torch.float32
                or keys.dim() != 4
                or keys.shape[1:] != (s.num_kv_heads, length, s.head_dim)
            ):
                return False
        return True

    def serves(self, cache, rows: int, length: int) -> bool:
        """Whether the next step of ``rows`` rows over ``length`` columns (the new one included) can
        run here: ``cache`` fits (:meth:`cache_fits`) and nothing :meth:`blocked` names stands in the way."""
        return self.cache_fits(cache, length - 1) and self.blocked(rows, length) is None

    def forward(self, buffers, cache, ids, positions, mask, reserve):
        """:meth:`step` with the model's own forward hooks called around it, as around a forward of
        ``input_ids [B, 1]`` (the benches time forwards with them); returns the buffers and the
        next-token ``logits [B, V]`` (from the hook-visible output where hooks ran)."""
        if not self._model_hooked():
            return self.step(buffers, cache, ids, positions, mask, reserve)
        kwargs = {"input_ids": ids[:, None], "attention_mask": mask, "position_ids": positions[:, None]}
        self._pre_hooks(kwargs)
        buffers, logits = self.step(buffers, cache, ids, positions, mask, reserve)
        return buffers, self._post_hooks(kwargs, logits, cache)

    def prompt_forward(self, cache, ids, mask, positions, reserve):
        """:meth:`prompt` with the model's own forward hooks called around it, as around a forward of
        ``ids [B, S]``; returns the buffers and the next-token ``logits [B, V]``."""
        if not self._model_hooked():
            return self.prompt(cache, ids, mask, positions, reserve)
        kwargs = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
        self._pre_hooks(kwargs)
        buffers, logits = self.prompt(cache, ids, mask, positions, reserve)
        return buffers, self._post_hooks(kwargs, logits, cache)

    def _model_hooked(self) -> bool:
        return bool(self.model._forward_pre_hooks or self.model._forward_hooks)

    def _pre_hooks(self, kwargs: dict) -> None:
        model = self.model
        for hook_id, hook in list(model._forward_pre_hooks.items()):
            if hook_id in model._forward_pre_hooks_with_kwargs:
                hook(model, (), kwargs)
            else:
                hook(model, ())

    def _post_hooks(self, kwargs: dict, logits: torch.Tensor, cache) -> torch.Tensor:
        """The model's forward hooks on an output of ``logits [B, V]`` (as the last position's);
        returns the last position's logits of the output they leave."""
        model = self.model
        output = CausalLMOutputWithPast(logits=logits[:, None], past_key_values=cache)
        for hook_id, hook in list(model._forward_hooks.items()):
            if hook_id in model._forward_hooks_with_kwargs:
                result = hook(model, (), kwargs, output)
            else:
                result = hook(model, (), output)
            if result is not None:
                output = result
        return output.logits[:, -1, :]


def _is_silu(module: nn.Module) -> bool:
    """``nn.SiLU`` or transformers' ``SiLUActivation`` (exact types: a subclass may compute otherwise)."""
    from transformers.activations import SiLUActivation

    return type(module) in (nn.SiLU, SiLUActivation) and "forward" not in module.__dict__


def _mlp(module: nn.Module, cls: type | None, hidden: int, what: str, linear) -> dict:
    """Slots of a SiLU gate/up/down MLP (Qwen2-MoE's shared expert, dense layers)."""
    _exact(module, cls, what)
    _require(
        _children(module) == {"gate_proj", "up_proj", "down_proj", "act_fn"}, f"{what} has other modules"
    )
    _require(_is_silu(module.act_fn), f"{what}'s activation is not SiLU")
    inter = module.up_proj.weight.shape[0]
    return {
        "shared_gate": linear(module.gate_proj, inter, hidden, f"{what} gate_proj", False)[0],
        "shared_up": linear(module.up_proj, inter, hidden, f"{what} up_proj", False)[0],
        "shared_down": linear(module.down_proj, hidden, inter, f"{what} down_proj", False)[0],
    }
