"""Training and evaluation batches from task examples.

``text`` examples are supervised on every token; ``prompt``/``response`` and ``messages`` on the
response only (labels -100 elsewhere). ``text`` and ``prompt``/``response`` examples end with the
EOS token so the model learns to stop. Sequences are cut to ``max_length`` and right-padded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data import Example, encode_example
from ..errors import DataError

__all__ = ["Features", "encode_examples", "collate"]

IGNORE = -100


@dataclass(frozen=True)
class Features:
    """One tokenized example: ``input_ids`` and ``labels`` of equal length."""

    input_ids: list[int]
    labels: list[int]


def encode_examples(
    tokenizer, examples: list[Example], max_length: int, *, where: str = "data"
) -> list[Features]:
    """Tokenize examples with labels; examples left with nothing to learn are an error.

    Raises:
        DataError: an example (1-based index named) has no supervised token after truncation.
    """
    out = []
    for number, example in enumerate(examples, start=1):
        ids, start = encode_example(tokenizer, example)
        if (
            example.messages is None
            and tokenizer.eos_token_id is not None
            and (not ids or ids[-1] != tokenizer.eos_token_id)
        ):
            ids = ids + [tokenizer.eos_token_id]
        ids = ids[:max_length]
        labels = [IGNORE] * min(start, len(ids)) + ids[start:]
        if sum(label != IGNORE for label in labels[1:]) == 0:
            raise DataError(
                f"{where}: example {number} has no tokens to learn (empty response, or cut by the maximum length)"
            )
        out.append(Features(ids, labels))
    return out


def collate(features: list[Features], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: ``input_ids``, ``attention_mask``, ``labels`` all ``[B, S]``."""
    width = max(len(f.input_ids) for f in features)
    ids = torch.full((len(features), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(features), width), dtype=torch.long)
    labels = torch.full((len(features), width), IGNORE, dtype=torch.long)
    for row, f in enumerate(features):
        n = len(f.input_ids)
        ids[row, :n] = torch.tensor(f.input_ids)
        mask[row, :n] = 1
        labels[row, :n] = torch.tensor(f.labels)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
