"""Decode- and prompt-sized calls of a served model's linear layers through the ``rows_linear`` op.

    nn.Linear(x [B, S, in]) --(B * S <= rows_mm_max(), CPU float32, no grad)--> rows_linear
                            --(otherwise)---------------------------------------> F.linear (unchanged)

Attached while an engine serves on the CPU: each plain ``nn.Linear`` (exact type: subclasses and
wrapped layers keep their own forward) gets an instance ``forward`` that picks the op per call;
forward hooks (per-adapter LoRA terms) run around it as before. Detaching restores the class forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import extension_available
from ..ops.rows_linear import rows_linear_op, rows_mm_max

__all__ = ["StreamedLinears"]


def _forward(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``F.linear`` semantics; the checks of :func:`~moe_runtime.ops.streams_rows`, cheapest first
    (this runs for every linear layer of every step)."""
    w = module.weight
    if (
        x.numel() <= rows_mm_max() * w.shape[-1]
        and x.dtype is torch.float32
        and w.dtype is torch.float32
        and x.device.type == "cpu"
        and w.is_contiguous()
        and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
    ):
        return rows_linear_op()(x, w, module.bias)
    return F.linear(x, w, module.bias)


class StreamedLinears:
    """The plain linear layers of ``model`` that hold float32 CPU weights.

    Args:
        model: the served model.
    """

    def __init__(self, model: nn.Module) -> None:
        self.modules = [
            m
            for m in model.modules()
            if type(m) is nn.Linear and m.weight.device.type == "cpu" and m.weight.dtype == torch.float32
        ]
        self.attached = False

    def attach(self) -> None:
        """Route the layers' few-row calls through ``rows_linear`` (nothing without the extension)."""
        if not extension_available():
            return
        for module in self.modules:
            module.forward = _forward.__get__(module)
        self.attached = True

    def detach(self) -> None:
        """Give the layers back their class forward."""
        for module in self.modules:
            module.__dict__.pop("forward", None)
        self.attached = False
