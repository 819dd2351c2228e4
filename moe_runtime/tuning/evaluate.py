"""Evaluation: mean token loss, and exact-match accuracy of greedy answers for prompt/response data."""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from ..data import Example
from ..models import pad_token_id
from .data import IGNORE, collate, encode_examples

__all__ = ["answer_matches", "mean_token_loss", "exact_match"]


@torch.inference_mode()
def mean_token_loss(
    model: nn.Module,
    tokenizer,
    examples: list[Example],
    *,
    max_length: int = 512,
    batch_size: int = 16,
    progress: bool = False,
    where: str = "data",
) -> tuple[float, int]:
    """Mean next-token cross-entropy over supervised tokens (responses only for prompt/response).

    Args:
        where: the data file, named in errors.

    Returns:
        ``(loss, tokens)``.
    """
    features = encode_examples(tokenizer, examples, max_length, where=where)
    pad = pad_token_id(tokenizer)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in tqdm(
        range(0, len(features), batch_size), desc="eval loss", disable=not progress, leave=False
    ):
        batch = collate(features[start : start + batch_size], pad)
        logits = model(
            input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
        ).logits
        targets = batch["labels"][:, 1:].to(device)
        losses = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]),
            targets.reshape(-1),
            ignore_index=IGNORE,
            reduction="sum",
        )
        total += float(losses)
        count += int((targets != IGNORE).sum())
    return total / max(count, 1), count


def answer_matches(completion: str, response: str) -> bool:
    """Exact match of a greedy completion: a one-line response is compared with the completion's
    first line (the model may go on with a next record), a multi-line one with its prefix; both stripped."""
    expected = response.strip()
    if "\n" in expected:
        return completion.strip().startswith(expected)
    return completion.strip().split("\n", 1)[0].strip() == expected


@torch.inference_mode()
def exact_match(
    model: nn.Module, tokenizer, examples: list[Example], *, batch_size: int = 16, progress: bool = False
) -> tuple[float, int]:
    """Share of prompt/response examples whose greedy completion matches the response (``answer_matches``).

    Returns:
        ``(accuracy, examples scored)``; ``(nan, 0)`` when no example has a prompt.
    """
    scored = [ex for ex in examples if ex.prompt is not None]
    if not scored:
        return float("nan"), 0
    device = next(model.parameters()).device
    pad = pad_token_id(tokenizer)
    hits = 0
    for start in tqdm(
        range(0, len(scored), batch_size), desc="exact match", disable=not progress, leave=False
    ):
        batch = scored[start : start + batch_size]
        prompts = [list(tokenizer(ex.prompt)["input_ids"]) for ex in batch]
        width = max(map(len, prompts))
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, p in enumerate(prompts):  # left padding for generation
            ids[row, width - len(p) :] = torch.tensor(p)
            mask[row, width - len(p) :] = 1
        budget = max(len(tokenizer(ex.response)["input_ids"]) for ex in batch) + 2
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=budget,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
        )
        for row, ex in enumerate(batch):
            text = tokenizer.decode(out[row, width:], skip_special_tokens=True)
            hits += int(answer_matches(text, ex.response))
    return hits / len(scored), len(scored)
