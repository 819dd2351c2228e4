"""What the runtime must know about particular transformers families."""

from __future__ import annotations

__all__ = ["UNPADDED_FAMILIES"]

UNPADDED_FAMILIES = frozenset(
    {"deepseek_v32", "deepseek_v4", "dots3_note_text", "glm_moe_dsa", "granitemoe_swa"}
)
"""Families whose transformers code gives left-padded rows other tokens than the prompt alone
(compressed / indexed sparse attention; granitemoe_swa's sliding window turns padded rows into NaN):
their requests are batched with prompts of the same length only."""
