"""The batched generation loop: left-padded prefill, then decode steps over a shared KV cache.

    prompts -> left-pad [B, L] (+ attention mask, position ids from the mask's cumsum)
            -> prefill (one forward, the model's own cache) -> choose next token per row
            -> loop: forward 1 token per live row   -> choose -> finished rows leave the batch
                     (their rows are cut from the cache, mask and positions; the others go on)

The loop knows nothing about adapters: before every forward it calls ``before_forward(rows,
seq_len)`` with the original indices of the live rows, which is where the serving engine sets
the owner (adapter) of every token. It works with any transformers causal LM, so the benchmark's
baselines (the stock base model, swapped-in adapters) run exactly the same loop.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import Cache

from .fast_decode import FastDecode
from .requests import DecodeConfig

__all__ = ["Generated", "generate_batch", "left_pad"]

BeforeForward = Callable[[torch.Tensor, int], None]
"""Called as ``before_forward(rows [B_live] int64, seq_len)`` before every forward."""


@dataclass
class Generated:
    """One row's output: generated ids and, if kept, ``logits [len(token_ids), V]``."""

    token_ids: list[int]
    logits: torch.Tensor | None = None


def left_pad(
    prompts: list[list[int]], pad_id: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded batch of token ids.

    Returns:
        ``input_ids [B, L]``, ``attention_mask [B, L]`` (0 on padding) and ``position_ids [B, L]``
        (each row counts from 0 at its first real token; padding positions are 0).
    """
    length = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if prompt:
            input_ids[row, length - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            mask[row, length - len(prompt) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return input_ids.to(device), mask.to(device), positions.to(device)


def _keep_rows(cache: Cache, index: torch.Tensor) -> None:
    """Keep only the batch rows ``index`` of every state in ``cache``.

    A family's own cache class that overrides ``batch_select_indices`` (MiniMax) knows all its
    states; otherwise ``reorder_cache`` does, for every layer kind (the linear-attention / SSM layers
    of hybrid families have no ``batch_select_indices``, or inherit one that keeps only their keys).
    """
    if type(cache).batch_select_indices is not Cache.batch_select_indices:
        cache.batch_select_indices(index)
    else:
        cache.reorder_cache(index)


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def _cache_argument(model: nn.Module) -> str:
    """The forward's name for the KV cache: ``cache`` (transformers >= 5.24) or ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _output_cache(outputs) -> Cache | None:
    """The cache a forward returned, under either name (without touching a deprecated alias)."""
    return outputs["cache"] if "cache" in outputs else outputs.get("past_key_values")


def _sample(
    logits: torch.Tensor, generators: list[torch.Generator], temperature: float, top_p: float
) -> torch.Tensor:
    """``logits [B, V]`` -> ``[B]`` ids drawn from the temperature / nucleus distribution."""
    probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p  # the token crossing top_p stays
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
    picks = [torch.multinomial(row, 1, generator=g) for row, g in zip(probs, generators)]
    return torch.cat(picks).to(logits.device)


@torch.no_grad()
def generate_batch(
    model: nn.Module,
    prompts: list[list[int]],
    max_new_tokens: list[int],
    *,
    config: DecodeConfig,
    eos_ids: set[int],
    pad_id: int,
    before_forward: BeforeForward | None = None,
    seeds: list[int] | None = None,
    fast_decode: FastDecode | None = None,
) -> list[Generated]:
    """Generate for a batch of prompts together, each up to its own token limit.

    Args:
        model: a causal LM (any transformers family that returns its cache).
        prompts: token ids per row (non-empty).
        max_new_tokens: per row, at least 1.
        config: decoding settings (``do_sample``, ``temperature``, ``top_p``, ``stop_on_eos``,
            ``output_logits``).
        eos_ids: ids that finish a row (when ``config.stop_on_eos``).
        pad_id: id written into left padding (masked out).
        before_forward: hook run before every forward with the live rows' original indices.
        seeds: per-row sampling seeds (default ``config.seed + row``).
        fast_decode: the model's compiled decode step (:meth:`FastDecode.of`): the prompt and the
            decode steps it can serve run through it (never with ``before_forward``: it knows no
            owners).

    Returns:
        One :class:`Generated` per prompt, in order.
    """
    device = next(model.parameters()).device
    input_ids, mask, positions = left_pad(prompts, pad_id, device)
    rows = torch.arange(len(prompts), device=device)
    generators = []
    if config.do_sample:
        seeds = seeds if seeds is not None else [config.seed + i for i in range(len(prompts))]
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    cache = None  # the model makes its own cache type at the prefill (MiniMax refuses a DynamicCache)
    keep_kwargs = {"logits_to_keep": 1} if _accepts_logits_to_keep(model) else {}
    cache_name = _cache_argument(model)
    out_ids: list[list[int]] = [[] for _ in prompts]
    out_logits: list[list[torch.Tensor]] = [[] for _ in prompts]
    last_position = positions[:, -1]
    kv = None  # the compiled step's buffers, viewed by the cache's layers while it serves
    while True:
        compiled = fast_decode is not None and before_forward is None
        fresh = fast_decode.prompt_cache(mask) if compiled and cache is None else None  # the op fills it
        if fresh is not None:
            cache = fresh
            reserve = max(max_new_tokens)
            kv, logits = fast_decode.prompt_forward(cache, input_ids, mask, positions, reserve)
        elif compiled and cache is not None and fast_decode.serves(cache, rows.shape[0], mask.shape[1]):
            reserve = max(max_new_tokens[r] - len(out_ids[r]) for r in rows.tolist())
            kv, logits = fast_decode.forward(kv, cache, input_ids[:, 0], positions[:, 0], mask, reserve)
        else:
            kv = None
            if before_forward is not None:
                before_forward(rows, input_ids.shape[1])
            outputs = model(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                **{cache_name: cache},
                **keep_kwargs,
            )
            cache, logits = _output_cache(outputs), outputs.logits[:, -1, :]
        if config.do_sample:
            live_generators = [generators[r] for r in rows.tolist()]
            chosen = _sample(logits, live_generators, config.temperature, config.top_p)
        else:
            chosen = logits.argmax(dim=-1)
        keep = []
        for i, (row, token) in enumerate(zip(rows.tolist(), chosen.tolist())):
            out_ids[row].append(token)
            if config.output_logits:
                out_logits[row].append(logits[i].detach().clone())
            done = len(out_ids[row]) >= max_new_tokens[row] or (config.stop_on_eos and token in eos_ids)
            if not done:
                keep.append(i)
        if not keep:
            break
        if len(keep) < rows.shape[0]:
            index = torch.tensor(keep, device=device)
            _keep_rows(cache, index)
            rows, mask, chosen, last_position = rows[index], mask[index], chosen[index], last_position[index]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        last_position = last_position + 1
        positions = last_position[:, None]
        input_ids = chosen[:, None]
    return [
        Generated(ids, torch.stack(logs) if config.output_logits else None)
        for ids, logs in zip(out_ids, out_logits)
    ]
