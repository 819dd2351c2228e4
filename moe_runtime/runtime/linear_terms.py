"""Per-adapter low-rank terms on ordinary linear layers (peft LoRA on attention projections).

    x [B, S, in] -> linear -> y [B, S, out]
                      forward hook: for each owner a with a term on this module and tokens here,
                      y[tokens of a] += term_a(x[tokens of a])        (tokens row-major, b * S + s)

The owners are the executor's (set by the engine before every forward); a forward without owners
(a plain model call) adds nothing. One hook per module serves every adapter.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["LinearTerms", "LowRank"]


class LowRank(nn.Module):
    """``x [N, in] -> scale * (x @ A.T) @ B.T [N, out]`` (a LoRA pair: ``A [r, in]``, ``B [out, r]``)."""

    def __init__(self, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> None:
        super().__init__()
        self.register_buffer("lora_a", lora_a)
        self.register_buffer("lora_b", lora_b)
        self.scale = float(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.to(self.lora_a.dtype) @ self.lora_a.T) @ self.lora_b.T * self.scale


class LinearTerms:
    """The low-rank terms of every loaded adapter, hooked into the model's linear layers.

    Args:
        model: the served model.
        token_owner: returns the ``[T]`` owner of each token of the current forward, or None.
    """

    def __init__(self, model: nn.Module, token_owner: Callable[[], torch.Tensor | None]) -> None:
        self.model, self.token_owner = model, token_owner
        self.terms: dict[int, dict[str, nn.Module]] = {}  # owner -> module name -> term
        self._hooks: dict[str, torch.utils.hooks.RemovableHandle] = {}

    def add(self, owner: int, terms: dict[str, nn.Module]) -> None:
        """Add ``terms[module name]`` to that module's output for ``owner``'s tokens.

        Raises:
            KeyError: a name is not a module of the model.
        """
        modules = {name: self.model.get_submodule(name) for name in terms}
        self.terms[owner] = dict(terms)
        for name, module in modules.items():
            if name not in self._hooks:
                self._hooks[name] = module.register_forward_hook(self._hook(name))

    def remove(self, owner: int) -> None:
        """Drop ``owner``'s terms (hooks no adapter uses any more are removed)."""
        self.terms.pop(owner, None)
        used = {name for terms in self.terms.values() for name in terms}
        for name in list(self._hooks):
            if name not in used:
                self._hooks.pop(name).remove()

    def close(self) -> None:
        for handle in self._hooks.values():
            handle.remove()
        self._hooks.clear()
        self.terms.clear()

    def _hook(self, name: str):
        @torch.no_grad()
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            owners = self.token_owner()
            if owners is None:
                return None
            x = args[0].reshape(-1, args[0].shape[-1])
            if x.shape[0] != owners.shape[0]:
                raise RuntimeError(
                    f"{name}: got {x.shape[0]} tokens but owners were set for {owners.shape[0]} "
                    "(its input is not [batch, seq, features] row-major)"
                )
            flat = None
            for owner, terms in self.terms.items():
                term = terms.get(name)
                if term is None:
                    continue
                tokens = torch.nonzero(owners.to(x.device) == owner).squeeze(1)
                if tokens.numel() == 0:
                    continue
                if flat is None:
                    flat = output.reshape(-1, output.shape[-1]).clone()
                flat.index_add_(0, tokens, term(x.index_select(0, tokens)).to(flat.dtype))
            return None if flat is None else flat.view(output.shape)

        hook._moe_runtime_base_passthrough = True  # adds nothing to base-model tokens (fast_decode.py)
        return hook
