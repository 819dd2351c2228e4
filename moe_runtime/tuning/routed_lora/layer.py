"""The routed-LoRA term of one MoE layer, added to the routed experts' output.

    hidden [T, H] (the experts' input) -> delta [T, H];   experts output + delta -> MoE block

For a LoRA pair i the term is ``scale * B_i (A_i x)`` with ``A_i [r, H]``, ``B_i [H, r]``,
``scale = alpha / r`` and ``B`` zero-initialised, so training starts exactly at the base model.

    routed (perft-r):  p = softmax(W_r x) [T, N] -> top-k -> weights renormalised over the k
    expert (perft-e):  the frozen router's entries (t, k) -> expert e -> its pair (or none), weight w[t, k]
    dense (perft-s/d): every pair on every token, weight 1

Routed and expert kinds run grouped: ``reroute_permute`` sorts the (token, k) entries by pair, one
grouped GEMM applies every ``A_i`` and one every ``B_i``, and the weighted rows are summed back per
token with ``index_add``. No dense weight delta is ever built and no loop runs over tokens.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
from torch import nn

from ...ops.experts_mm import grouped_linear
from ...ops.reroute import reroute_permute
from .config import DENSE, EXPERT, ROUTED, LayerPlan

__all__ = ["LoraLayer", "Routing", "TopKRouting", "balance_loss"]


def _grouped(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``grouped_linear`` (``weight [G, out, in]``), or one matmul per group when the dimensions are
    not 16-byte aligned, which torch's CPU grouped GEMM requires (e.g. rank 3 in float32)."""
    if all(d * x.element_size() % 16 == 0 for d in weight.shape[1:]):
        return grouped_linear(x, weight, offsets, False)
    pieces, start = [], 0
    for group, end in enumerate(offsets.tolist()):
        if end > start:
            pieces.append(x[start:end] @ weight[group].T)
        start = end
    return torch.cat(pieces)


def balance_loss(probs: torch.Tensor, chosen: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Switch-style load-balancing loss ``N * sum_i f_i * P_i`` (1 when perfectly balanced).

    Args:
        probs: ``[T, N]`` router probabilities.
        chosen: ``[T, k]`` chosen LoRA experts.
        mask: ``[T]`` bool, tokens that count (padding excluded), or None for all.

    Returns:
        A scalar: ``f_i`` = share of the ``T*k`` selections that went to i, ``P_i`` = mean probability of i.
    """
    num = probs.shape[1]
    if mask is not None:
        probs, chosen = probs[mask], chosen[mask]
    if probs.shape[0] == 0:
        return probs.new_zeros(())
    counts = torch.bincount(chosen.reshape(-1), minlength=num).to(probs.dtype)
    return num * torch.sum(counts / chosen.numel() * probs.mean(dim=0))


class Routing(Protocol):
    """How a routed layer's LoRA router picks and weights LoRA experts.

    ``routing(probs [T, N], token_mask [T] or None, with_aux) -> (weights [T, M], chosen [T, M], aux)``:
    ``chosen`` holds LoRA expert ids (an id >= N is no expert, its weight is ignored) and ``aux``
    the weighted auxiliary loss (a scalar) when ``with_aux``, else None.
    """

    def __call__(
        self, probs: torch.Tensor, token_mask: torch.Tensor | None, with_aux: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]: ...


class TopKRouting:
    """perft-r: the k most probable LoRA experts, weights renormalised over them; the auxiliary
    loss is ``aux_loss_coef`` x the Switch-style balance loss.

    Args:
        top_k: LoRA experts per token.
        aux_loss_coef: weight of the balance loss.
    """

    def __init__(self, top_k: int, aux_loss_coef: float = 1.0) -> None:
        self.top_k, self.aux_loss_coef = int(top_k), float(aux_loss_coef)

    def __call__(self, probs, token_mask, with_aux):
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        aux = None
        if with_aux and self.aux_loss_coef:
            aux = self.aux_loss_coef * balance_loss(probs, chosen, token_mask)
        return weights, chosen, aux


class LoraLayer(nn.Module):
    """LoRA pairs (and, for perft-r, a router) of one MoE layer.

    Args:
        kind: ``routed``, ``expert`` or ``dense`` (see :mod:`.config`).
        plan: the layer's index, pair count and (expert kind) routed expert ids.
        hidden_size: H.
        num_experts: routed experts E of the layer (expert kind: the pair table's width).
        rank: r.
        scale: ``alpha / r``.
        top_k: LoRA experts per token (routed kind, with the default routing).
        routing: how the routed kind picks LoRA experts (default :class:`TopKRouting` with ``top_k``).
        dtype, device: of the parameters (the model's).
        generator: initialises ``A`` (uniform in +-1/sqrt(H)) and the router (normal, std 0.02);
            ``B`` is zero. None leaves every parameter uninitialised (to be loaded).
    """

    def __init__(
        self,
        *,
        kind: str,
        plan: LayerPlan,
        hidden_size: int,
        num_experts: int,
        rank: int,
        scale: float,
        top_k: int = 0,
        routing: Routing | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.kind, self.layer_index, self.scale, self.top_k = kind, plan.layer, float(scale), int(top_k)
        self.routing = routing if routing is not None or kind != ROUTED else TopKRouting(top_k)
        self.expert_ids = list(plan.expert_ids)
        n, h = plan.num_lora, hidden_size
        self.lora_A = nn.Parameter(torch.empty(n, rank, h, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(n, h, rank, dtype=dtype, device=device))
        self.router = nn.Parameter(torch.empty(n, h, dtype=dtype, device=device)) if kind == ROUTED else None
        if generator is not None:
            with torch.no_grad():
                bound = 1.0 / math.sqrt(h)
                self.lora_A.copy_((torch.rand(self.lora_A.shape, generator=generator) * 2 - 1) * bound)
                if self.router is not None:
                    self.router.copy_(torch.randn(self.router.shape, generator=generator) * 0.02)
        if kind == EXPERT:
            table = torch.full((num_experts,), -1, dtype=torch.int32)
            table[torch.tensor(self.expert_ids, dtype=torch.long)] = torch.arange(n, dtype=torch.int32)
        else:
            table = torch.arange(n, dtype=torch.int32)
        self.register_buffer("pair_table", table[None].to(device), persistent=False)

    @property
    def num_lora(self) -> int:
        return self.lora_A.shape[0]

    def forward(
        self,
        hidden: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
        *,
        token_mask: torch.Tensor | None = None,
        with_aux: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The LoRA term of ``hidden [T, H]`` given the frozen routing ``[T, K]``.

        Returns:
            ``(delta [T, H], auxiliary loss or None)``; the loss only for the routed kind with ``with_aux``.
        """
        if self.kind == DENSE:
            a = self.lora_A.reshape(-1, self.lora_A.shape[-1])  # [N*r, H]
            b = self.lora_B.permute(1, 0, 2).reshape(self.lora_B.shape[1], -1)  # [H, N*r]
            return (hidden @ a.T) @ b.T * self.scale, None
        aux = None
        if self.kind == ROUTED:
            logits = hidden @ self.router.T
            probs = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
            weights, chosen, aux = self.routing(probs, token_mask, with_aux)
            weights = weights.to(hidden.dtype)
        else:
            weights, chosen = top_k_weights.to(hidden.dtype), top_k_index
        return self._pairs(hidden, chosen, weights), aux

    def _pairs(self, hidden: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``sum_k weights[t, k] * scale * B_p A_p hidden[t]`` over entries whose pair p exists."""
        num_tokens, k = chosen.shape
        owners = torch.zeros(num_tokens, dtype=torch.int64, device=hidden.device)
        routed = reroute_permute(chosen.to(torch.int64), owners, self.pair_table, self.num_lora)
        kept = int(routed.offsets[-1]) if routed.offsets.numel() else 0
        out = hidden.new_zeros(hidden.shape)
        if kept == 0:
            return out
        entries = routed.perm[:kept]
        tokens = torch.div(entries, k, rounding_mode="floor")
        h = _grouped(hidden.index_select(0, tokens), self.lora_A, routed.offsets)  # [kept, r]
        y = _grouped(h, self.lora_B, routed.offsets)  # [kept, H]
        y = y * (weights.reshape(-1)[entries] * self.scale).unsqueeze(-1)
        return out.index_add(0, tokens, y)
