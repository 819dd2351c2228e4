"""One decode step of a decoder-only MoE transformer in one compiled call (CPU, float32).

    ids [B], positions [B], mask [B, T], kv buffers, weights -> decode_step -> logits [B, V]
                                                                (kv column T-1 written per layer)

    a prompt: one row per new token, slots [R, 2] = (cache row, column) per row, a causal mask
    [R, T], logit_rows = each sequence's last row -> logits [N, V]

A decode step streams every weight once for one token per row; run through transformers' modules it
also pays ~40 small ops per layer of Python and dispatcher time. The compiled ``decode_step`` op runs
the whole step (embedding, attention with rotary and the KV cache, router, experts, shared expert,
final norm, LM head) in C++ with the streaming kernels of ``rows_linear``. Its layout contract is at
the top of ``csrc/decode_cpu.cpp``; :func:`decode_step_reference` is the same step in PyTorch.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._extension import extension_available, load_extension

__all__ = ["SLOTS", "StepSettings", "decode_step", "decode_step_reference", "prompt_rows_max"]

SLOTS = (
    "input_norm",
    "q",
    "q_bias",
    "k",
    "k_bias",
    "v",
    "v_bias",
    "o",
    "o_bias",
    "q_norm",
    "k_norm",
    "post_norm",
    "router",
    "gate_up",
    "down",
    "shared_gate",
    "shared_up",
    "shared_down",
    "shared_expert_gate",
)
"""The per-layer weight slots, in the op's order (an absent one is an empty tensor)."""

QK_NORM = {None: 0, "head": 1, "whole": 2}
"""q/k norm kinds: none, per head over ``head_dim`` (Qwen3-MoE), over the whole projection (OLMoE)."""


@dataclass(frozen=True)
class StepSettings:
    """The model-wide settings of a decode step.

    Attributes:
        num_heads, num_kv_heads, head_dim: attention shape (GQA when ``num_kv_heads < num_heads``).
        top_k: experts per token; ``norm_topk_prob`` divides their weights by their sum.
        qk_norm: ``None``, ``"head"`` or ``"whole"`` (see :data:`QK_NORM`).
        eps: every RMSNorm's epsilon.
        scaling: attention score scale.
        rope_scale: the rotary module's ``attention_scaling`` (times cos and sin).
        clip_qkv: clamp q, k, v to ``[-clip_qkv, clip_qkv]`` when positive (OLMoE).
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    top_k: int
    norm_topk_prob: bool
    qk_norm: str | None
    eps: float
    scaling: float
    rope_scale: float = 1.0
    clip_qkv: float = 0.0

    def op_args(self) -> tuple:
        return (
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            self.top_k,
            self.norm_topk_prob,
            QK_NORM[self.qk_norm],
            self.eps,
            self.scaling,
            self.rope_scale,
            self.clip_qkv,
        )


def decode_step(
    ids: torch.Tensor,
    positions: torch.Tensor,
    mask: torch.Tensor,
    kv: list[torch.Tensor],
    weights: list[torch.Tensor],
    embed: torch.Tensor,
    final_norm: torch.Tensor,
    lm_head: torch.Tensor,
    inv_freq: torch.Tensor,
    settings: StepSettings,
    slots: torch.Tensor | None = None,
    logit_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """One decode step through the compiled op (see the module docstring and csrc/decode_cpu.cpp).

    Args:
        ids: ``[B]`` int64, the token each row feeds.
        positions: ``[B]`` int64, its position.
        mask: ``[B, T]`` over the cache columns and the new one (0 on left padding).
        kv: keys and values per layer, ``[B, Hkv, C >= T, D]`` each; column ``T-1`` is written.
        weights: ``len(SLOTS)`` tensors per layer.
        embed, final_norm, lm_head, inv_freq: ``[V, H]``, ``[H]``, ``[V, H]``, ``[D / 2]``.
        settings: model-wide settings.
        slots: ``[B, 2]`` int64, each row's cache row and the column its key and value go to
            (default: row ``b``, column ``T-1``); the kv buffers may then have any number of rows.
        logit_rows: ``[N]`` int64, the rows whose logits are returned (default: all).

    Returns:
        ``logits [N, V]`` (``[B, V]`` by default).
    """
    load_extension()
    return torch.ops.moe_runtime.decode_step.default(
        ids,
        positions,
        mask,
        kv,
        weights,
        embed,
        final_norm,
        lm_head,
        inv_freq,
        *settings.op_args(),
        slots,
        logit_rows,
    )


@functools.cache
def prompt_rows_max() -> int:
    """Prompt tokens (of a whole batch) up to which :func:`decode_step` runs a prompt faster than the
    model's forward on this CPU: 192 with AVX-512, 128 with AVX2, 8 with the plain kernels (0 without
    the extension; ``MOE_RUNTIME_CPU_ISA`` caps the instruction set)."""
    if not extension_available():
        return 0
    load_extension()
    return int(torch.ops.moe_runtime.prompt_rows_max())


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return F.linear(x, weight, bias if bias.numel() else None)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def decode_step_reference(
    ids: torch.Tensor,
    positions: torch.Tensor,
    mask: torch.Tensor,
    kv: list[torch.Tensor],
    weights: list[torch.Tensor],
    embed: torch.Tensor,
    final_norm: torch.Tensor,
    lm_head: torch.Tensor,
    inv_freq: torch.Tensor,
    settings: StepSettings,
    slots: torch.Tensor | None = None,
    logit_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pure-PyTorch :func:`decode_step` (same arguments; writes the same kv columns)."""
    s = settings
    batch, length = mask.shape
    if slots is None:
        row, col = torch.arange(batch), torch.full((batch,), length - 1)
    else:
        row, col = slots[:, 0], slots[:, 1]
    hidden = embed[ids]
    freqs = positions[:, None].float() * inv_freq[None].float()
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = (emb.cos() * s.rope_scale)[:, None], (emb.sin() * s.rope_scale)[:, None]  # [B, 1, D]
    valid = mask.bool()
    slots = len(SLOTS)
    for layer in range(len(weights) // slots):
        w = dict(zip(SLOTS, weights[layer * slots : (layer + 1) * slots]))
        keys, values = kv[2 * layer], kv[2 * layer + 1]
        x = _rms(hidden, w["input_norm"], s.eps)
        q, k, v = (
            _linear(x, w["q"], w["q_bias"]),
            _linear(x, w["k"], w["k_bias"]),
            _linear(x, w["v"], w["v_bias"]),
        )
        if s.qk_norm == "whole":
            q, k = _rms(q, w["q_norm"], s.eps), _rms(k, w["k_norm"], s.eps)
        q = q.view(batch, s.num_heads, s.head_dim)
        k = k.view(batch, s.num_kv_heads, s.head_dim)
        v = v.view(batch, s.num_kv_heads, s.head_dim)
        if s.qk_norm == "head":
            q, k = _rms(q, w["q_norm"], s.eps), _rms(k, w["k_norm"], s.eps)
        if s.clip_qkv > 0:
            q, k, v = (t.clamp(-s.clip_qkv, s.clip_qkv) for t in (q, k, v))
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        keys[row, :, col] = k
        values[row, :, col] = v
        group = s.num_heads // s.num_kv_heads
        kk = keys[row, :, :length].repeat_interleave(group, dim=1)  # [B, Hq, T, D]
        vv = values[row, :, :length].repeat_interleave(group, dim=1)
        scores = torch.einsum("bhd,bhtd->bht", q, kk) * s.scaling
        scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
        attn = torch.einsum("bht,bhtd->bhd", scores.softmax(-1), vv).reshape(batch, -1)
        hidden = hidden + _linear(attn, w["o"], w["o_bias"])
        x = _rms(hidden, w["post_norm"], s.eps)
        y = torch.zeros_like(hidden)
        if w["router"].numel():
            probs = F.linear(x, w["router"]).float().softmax(-1)
            top_w, top_i = probs.topk(s.top_k, dim=-1)
            if s.norm_topk_prob:
                top_w = top_w / top_w.sum(-1, keepdim=True)
            for expert in sorted(set(top_i.flatten().tolist())):
                rows, pick = torch.nonzero(top_i == expert, as_tuple=True)
                gate, up = F.linear(x[rows], w["gate_up"][expert]).chunk(2, dim=-1)
                out = F.linear(F.silu(gate) * up, w["down"][expert])
                y.index_add_(0, rows, out * top_w[rows, pick, None])
        if w["shared_up"].numel():
            shared = F.linear(
                F.silu(F.linear(x, w["shared_gate"])) * F.linear(x, w["shared_up"]), w["shared_down"]
            )
            if w["shared_expert_gate"].numel():
                shared = torch.sigmoid(F.linear(x, w["shared_expert_gate"])) * shared
            y = y + shared
        hidden = hidden + y
    if logit_rows is not None:
        hidden = hidden[logit_rows]
    return F.linear(_rms(hidden, final_norm, s.eps), lm_head)
