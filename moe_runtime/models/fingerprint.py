"""Stable fingerprints of model weights.

A fingerprint is a sha256 over (name, dtype, shape, raw bytes) of tensors in name order, so it
does not depend on load order, device or the file layout of the checkpoint. Floating-point tensors
are hashed as their bfloat16 rounding (through float32) under the one dtype name ``float``, so a
checkpoint has the same fingerprint whether it is loaded in bfloat16, float16, float32 or float64:
``tune`` trains in float32 by default, ``eval`` loads float32 and ``generate`` the checkpoint's own
dtype, and an adapter tuned on a bfloat16 checkpoint must still be accepted by all three. Adapters
record the fingerprint of exactly the base weights they replace; profiles record the whole model's.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable

import torch
from torch import nn

__all__ = ["fingerprint_tensors", "model_fingerprint"]


_PIECE = 1 << 24  # values hashed per piece (a 100k x 2k embedding is not copied whole, twice)

Parts = Callable[[str, torch.Tensor], Iterable[torch.Tensor]]
"""``parts(name, tensor)``: the contents of a tensor that is not materialized (on the meta device),
as consecutive pieces along its first dimension (e.g. one expert at a time, read from disk)."""


def _update(digest: hashlib._Hash, name: str, tensor: torch.Tensor, parts: Parts | None = None) -> None:
    tensor = tensor.detach()
    floating = tensor.is_floating_point()  # hashed independently of the dtype it was loaded in
    dtype = "float" if floating else str(tensor.dtype).removeprefix("torch.")
    digest.update(f"{name}|{dtype}|{tuple(tensor.shape)}|".encode())
    pieces = [tensor]
    if tensor.dim() and tensor.numel() > _PIECE:  # rows at a time: the conversions below copy
        pieces = tensor.split(max(1, _PIECE // max(1, tensor[0].numel())))
    if tensor.is_meta:
        if parts is None:
            raise ValueError(
                f"cannot fingerprint '{name}': it is not materialized (meta) and no reader was given"
            )
        pieces = parts(name, tensor)
    for piece in pieces:
        piece = piece.detach().to("cpu")
        if floating:
            piece = piece.to(torch.float32).to(torch.bfloat16)
        flat = piece.to(tensor.dtype if not floating else torch.bfloat16).contiguous().reshape(-1)
        if flat.numel():
            digest.update(flat.view(torch.uint8).numpy().tobytes())


def fingerprint_tensors(named: Iterable[tuple[str, torch.Tensor]], parts: Parts | None = None) -> str:
    """``sha256:<hex>`` digest of named tensors, sorted by name (meta tensors read through ``parts``)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(named, key=lambda item: item[0]):
        _update(digest, name, tensor, parts)
    return "sha256:" + digest.hexdigest()


def model_fingerprint(model: nn.Module, parts: Parts | None = None) -> str:
    """Fingerprint of every parameter and persistent buffer of ``model`` (tied weights once).

    Args:
        parts: reads tensors that are not materialized (offloaded experts) piece by piece; the
            fingerprint equals that of the same model fully in memory.
    """
    seen: set[int] = set()
    named = []
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        key = id(tensor)
        if key in seen or name.endswith(("inv_freq", "original_inv_freq")):
            continue
        seen.add(key)
        named.append((name, tensor))
    return fingerprint_tensors(named, parts)
