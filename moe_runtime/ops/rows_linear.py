"""Few-row linear layers that stream the weight once: the products of a decode step and a prompt.

    x [..., in] (one row per sequence while decoding, a prompt's tokens) -> rows_linear -> [..., out]

A decode step multiplies one row per sequence by every weight matrix, so its linear layers are bound
by reading the weights. The compiled ``rows_linear`` op reads each weight row once for up to four
input rows, with AVX-512 / AVX2 kernels chosen at run time, and splits the output features across
threads (a GEMM with one row does not: the second core idles). More rows go tile by tile of output
features, every group of four passing over a tile while it is cached, which also beat MKL's sgemm up
to :func:`rows_mm_max` rows. ``F.linear`` is the reference.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ._extension import extension_available, load_extension

__all__ = [
    "STREAM_ROWS_MAX",
    "rows_linear",
    "rows_linear_op",
    "rows_linear_reference",
    "rows_mm_max",
    "streams_rows",
]


STREAM_ROWS_MAX = 16
"""Decode-sized calls: rows (or routed entries) up to which the per-entry paths skip sorting."""


def rows_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` through the compiled op (CPU, float32, no autograd).

    Args:
        x: ``[..., in]`` float32.
        weight: ``[out, in]`` float32 with contiguous rows.
        bias: ``[out]`` or None.

    Returns:
        ``[..., out]``.
    """
    load_extension()
    return torch.ops.moe_runtime.rows_linear(x, weight, bias)


def rows_linear_op():
    """The op's overload itself (loads the extension): the cheapest call, for per-layer hot paths."""
    load_extension()
    return torch.ops.moe_runtime.rows_linear.default


@functools.cache
def rows_mm_max() -> int:
    """Rows up to which :func:`rows_linear` beats the GEMM on this CPU (0 without the extension).

    Past four rows the kernels work tile by tile of output features, each tile's weights read from
    memory once: with AVX-512 that beat MKL's sgemm up to 128 rows, with AVX2 up to 16
    (``MOE_RUNTIME_CPU_ISA=avx2`` or ``plain`` caps the instruction set, read once per process).
    """
    if not extension_available():
        return 0
    load_extension()
    return int(torch.ops.moe_runtime.rows_mm_max())


def rows_linear_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Pure-PyTorch :func:`rows_linear`."""
    return F.linear(x, weight, bias)


def streams_rows(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :func:`rows_linear` should serve ``F.linear(x, weight)``: CPU float32, at most
    :func:`rows_mm_max` rows, contiguous weight rows, no gradient needed, extension built."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32:
        return False
    if x.dim() == 0 or x.numel() > rows_mm_max() * x.shape[-1] or weight.stride(-1) != 1:
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return False
    return weight.dim() == 2 and weight.stride(0) == weight.shape[1] and extension_available()
