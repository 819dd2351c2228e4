"""``bench kernels``: the compiled few-row CPU products against the GEMM, by rows.

    linear   rows_linear(x [rows, in], W [out, in])  vs  F.linear (libtorch's GEMM: MKL's sgemm)
    experts  segmented_mm over 16 experts [2I, H] with `rows` rows each: the rows_mm kernels vs the
             same op with MOE_RUNTIME_STREAM_MM=0 (every slot through the GEMM)

Both sides of a pair run in one process on the same inputs, interleaved, at each thread count; the
medians and their ratio are reported (above 1: the compiled kernels are faster). The crossover is
what ``rows_mm_max()`` encodes for the instruction set in use (``MOE_RUNTIME_CPU_ISA`` caps it).
Float32, no gradient; results are also checked against the reference (``F.linear``, the GEMM path).
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from unittest import mock

import torch
import torch.nn.functional as F

from ..errors import UsageError
from ..runtime.offload.tier import scoped_threads

__all__ = ["bench_kernels", "format_table", "ROWS", "LINEAR_SHAPES"]

ROWS = (1, 4, 8, 16, 24, 32, 64, 128, 256)
LINEAR_SHAPES = ((1024, 1024), (4096, 1024), (1024, 4096))
_EXPERTS, _HIDDEN, _WIDTH = 16, 1024, 1024


def _per_call(fn: Callable[[], object], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def _pair(ours: Callable[[], object], theirs: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Per-call medians of two callables, interleaved (the order alternates each repeat)."""
    ours(), theirs()  # warm
    single = max(_per_call(ours, 1), 1e-6)
    calls = max(1, min(200, int(2e-3 / single)))  # ~2 ms per measurement
    a, b = [], []
    for r in range(repeats):
        order = ((ours, a), (theirs, b)) if r % 2 == 0 else ((theirs, b), (ours, a))
        for fn, out in order:
            out.append(_per_call(fn, calls))
    return statistics.median(a), statistics.median(b)


def bench_kernels(
    *,
    repeats: int = 5,
    thread_counts: tuple[int, ...] = (1, 2),
    rows: tuple[int, ...] | None = None,
    seed: int = 0,
) -> dict:
    """Time the compiled products against the GEMM (see the module docstring).

    Args:
        repeats: timed repeats per pair (medians reported).
        thread_counts: torch threads of each pass.
        rows: input rows (per expert for the experts pass); default :data:`ROWS`.
        seed: inputs' seed.

    Raises:
        UsageError: the compiled extension is not built.
    """
    from ..ops import extension_available, rows_linear, rows_mm_max
    from ..ops.experts_mm import segmented_mm

    if not extension_available():
        raise UsageError("bench kernels: the compiled extension is not built (pip install -e . builds it)")
    rows = ROWS if rows is None else rows
    g = torch.Generator().manual_seed(seed)
    linear, experts = [], []
    with torch.no_grad():
        weights = {s: torch.randn(*s, generator=g) / s[1] ** 0.5 for s in LINEAR_SHAPES}
        up = torch.randn(_EXPERTS, 2 * _WIDTH, _HIDDEN, generator=g) / _HIDDEN**0.5
        for threads in thread_counts:
            with scoped_threads(threads):
                for (out_f, in_f), w in weights.items():
                    for m in rows:
                        x = torch.randn(m, in_f, generator=g)
                        torch.testing.assert_close(rows_linear(x, w), F.linear(x, w), rtol=1e-4, atol=1e-4)
                        ours, gemm = _pair(
                            lambda x=x, w=w: rows_linear(x, w), lambda x=x, w=w: F.linear(x, w), repeats
                        )
                        linear.append({"threads": threads, "out": out_f, "in": in_f, "rows": m,
                                       "ours_ms": ours * 1e3, "gemm_ms": gemm * 1e3, "speedup": gemm / ours})  # fmt: skip
                for m in rows:
                    x = torch.randn(_EXPERTS * m, _HIDDEN, generator=g)
                    offsets = (torch.arange(1, _EXPERTS + 1) * m).to(torch.int32)

                    def kernels(x=x, offsets=offsets):
                        return segmented_mm(x, [up], offsets, False)

                    def gemm(x=x, offsets=offsets):
                        with mock.patch.dict(os.environ, {"MOE_RUNTIME_STREAM_MM": "0"}):  # read per call
                            return segmented_mm(x, [up], offsets, False)

                    torch.testing.assert_close(kernels(), gemm(), rtol=1e-4, atol=1e-4)
                    ours, theirs = _pair(kernels, gemm, repeats)
                    experts.append({"threads": threads, "rows_per_expert": m, "ours_ms": ours * 1e3,
                                    "gemm_ms": theirs * 1e3, "speedup": theirs / ours,
                                    "weight_gb_per_s": up.numel() * 4 / ours / 1e9})  # fmt: skip
    return {
        "bench": "kernels",
        "rows_mm_max": rows_mm_max(),
        "isa_cap": os.environ.get("MOE_RUNTIME_CPU_ISA") or "none",
        "repeats": repeats,
        "expert_shape": list(up.shape),
        "linear": linear,
        "experts": experts,
    }


def format_table(result: dict) -> str:
    """Speedups of the compiled products over the GEMM, one line per shape and thread count."""
    rows = sorted({r["rows"] for r in result["linear"]} | {r["rows_per_expert"] for r in result["experts"]})
    head = "| | threads | " + " | ".join(str(r) for r in rows) + " |"
    lines = [
        f"kernels: compiled few-row products / GEMM, speedup by rows (rows_mm_max here: {result['rows_mm_max']}, "
        f"ISA cap: {result['isa_cap']})",
        head,
        "|" + "---|" * (len(rows) + 2),
    ]
    keys = sorted({(r["out"], r["in"], r["threads"]) for r in result["linear"]}, key=lambda k: (k[2], k))
    for out_f, in_f, threads in keys:
        by = {
            r["rows"]: r["speedup"]
            for r in result["linear"]
            if (r["out"], r["in"], r["threads"]) == (out_f, in_f, threads)
        }
        lines.append(f"| linear [{out_f} x {in_f}] | {threads} | " + " | ".join(f"{by[r]:.2f}x" if r in by else "" for r in rows) + " |")  # fmt: skip
    e, out_f, in_f = result["expert_shape"]
    for threads in sorted({r["threads"] for r in result["experts"]}):
        by = {r["rows_per_expert"]: r["speedup"] for r in result["experts"] if r["threads"] == threads}
        lines.append(f"| experts {e} x [{out_f} x {in_f}], rows per expert | {threads} | " + " | ".join(f"{by[r]:.2f}x" if r in by else "" for r in rows) + " |")  # fmt: skip
    return "\n".join(lines)
