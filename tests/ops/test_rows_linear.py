"""The compiled ``rows_linear`` op against ``F.linear``, and the streaming kernels inside ``segmented_mm``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moe_runtime.ops import extension_available, rows_linear, rows_mm_max, streams_rows
from moe_runtime.ops.experts_mm import (
    segmented_mm,
    segmented_mm_reference,
    slot_rows_mm,
    slot_rows_mm_reference,
)

requires_extension = pytest.mark.skipif(not extension_available(), reason="moe_runtime._C is not built")

# float32 sums of `in` products in another order: relative error ~ sqrt(in) * eps
RTOL, ATOL = 1e-5, 1e-5


@requires_extension
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 16, 17, 24, 130])
@pytest.mark.parametrize("in_f, out_f", [(64, 96), (37, 101), (1000, 3)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_linear(rows, in_f, out_f, with_bias):
    g = torch.Generator().manual_seed(rows * 1000 + in_f)
    x = torch.randn(rows, in_f, generator=g)
    w = torch.randn(out_f, in_f, generator=g) / in_f**0.5
    b = torch.randn(out_f, generator=g) if with_bias else None
    torch.testing.assert_close(rows_linear(x, w, b), F.linear(x, w, b), rtol=RTOL, atol=ATOL)


@requires_extension
def test_keeps_leading_dims_and_empty_rows():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 1, 48, generator=g), torch.randn(20, 48, generator=g)
    got = rows_linear(x, w)
    assert got.shape == (2, 1, 20)
    torch.testing.assert_close(got, F.linear(x, w), rtol=RTOL, atol=ATOL)
    assert rows_linear(torch.randn(0, 48), w).shape == (0, 20)


@requires_extension
def test_independent_of_thread_count():
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(3, 200, generator=g), torch.randn(1000, 200, generator=g)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(rows_linear(x, w))
    finally:
        torch.set_num_threads(before)
    # every output feature is the same chain of operations however the features are split
    assert torch.equal(results[0], results[1])


_ISA_CHECK = """
import torch, torch.nn.functional as F
from moe_runtime.ops import rows_linear
from moe_runtime.ops.experts_mm import segmented_mm
g = torch.Generator().manual_seed(3)
for rows, in_f, out_f in ((1, 64, 96), (6, 37, 101), (23, 300, 70)):
    x, w = torch.randn(rows, in_f, generator=g), torch.randn(out_f, in_f, generator=g) / in_f ** 0.5
    got = rows_linear(x, w)
    torch.testing.assert_close(got, F.linear(x, w), rtol=1e-5, atol=1e-5)
    assert torch.equal(got, torch.cat([rows_linear(x[i : i + 1], w) for i in range(rows)]))
    # the transposed layout ([in, out] weights) through segmented_mm
    slot = torch.tensor([rows], dtype=torch.int32)
    got = segmented_mm(x, [w.t().contiguous()[None]], slot, True)
    torch.testing.assert_close(got, F.linear(x, w), rtol=1e-5, atol=1e-5)
print("ok")
"""


@requires_extension
@pytest.mark.parametrize("isa", ["avx2", "plain"])
def test_narrower_instruction_sets(isa):
    """MOE_RUNTIME_CPU_ISA caps the kernels' instruction set: each level matches ``F.linear``."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "MOE_RUNTIME_CPU_ISA": isa}
    done = subprocess.run(
        [sys.executable, "-c", _ISA_CHECK], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


@requires_extension
@pytest.mark.parametrize("transposed", [False, True])
def test_row_count_does_not_change_results(transposed):
    """Past four rows the product goes tile by tile; each row's result equals the row alone."""
    g = torch.Generator().manual_seed(4)
    in_f, out_f, rows = 300, 150, 37
    shape = (in_f, out_f) if transposed else (out_f, in_f)
    w = torch.randn(1, *shape, generator=g)
    x = torch.randn(rows, in_f, generator=g)
    together = segmented_mm(x, [w], torch.tensor([rows], dtype=torch.int32), transposed)
    alone = torch.cat(
        [
            segmented_mm(x[i : i + 1], [w], torch.tensor([1], dtype=torch.int32), transposed)
            for i in range(rows)
        ]
    )
    assert torch.equal(together, alone)
    if not transposed:
        assert torch.equal(rows_linear(x, w[0]), together)


@requires_extension
@pytest.mark.parametrize(
    "x, w, b, match",
    [
        (torch.randn(2, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64), None, "float32"),
        (torch.randn(2, 8), torch.randn(4, 9), None, "features"),
        (torch.randn(2, 8), torch.randn(8, 4).t(), None, "contiguous"),
        (torch.randn(2, 8), torch.randn(4, 8), torch.randn(5), "bias"),
    ],
)
def test_bad_inputs_raise(x, w, b, match):
    with pytest.raises(RuntimeError, match=match):
        rows_linear(x, w, b)


@requires_extension
def test_opcheck():
    x, w, b = torch.randn(2, 16), torch.randn(8, 16), torch.randn(8)
    torch.library.opcheck(
        torch.ops.moe_runtime.rows_linear.default, (x, w, b), test_utils=("test_schema", "test_faketensor")
    )


@requires_extension
def test_streams_rows_only_where_it_applies():
    w = torch.randn(8, 16)
    assert streams_rows(torch.randn(1, 1, 16), w)
    assert rows_mm_max() >= 16
    assert streams_rows(torch.randn(1, rows_mm_max(), 16), w)
    assert not streams_rows(torch.randn(rows_mm_max() + 1, 16), w)  # past it: the GEMM
    assert not streams_rows(torch.randn(1, 16, dtype=torch.float64), w.double())
    assert not streams_rows(torch.randn(1, 16), torch.randn(16, 8).t())
    assert not streams_rows(torch.randn(1, 16, requires_grad=True), w)


@requires_extension
@pytest.mark.parametrize("transposed", [False, True])
def test_segmented_mm_streamed_equals_gemm_path(transposed, monkeypatch):
    """Slots of up to rows_mm_max() rows take the kernels; the GEMM path (MOE_RUNTIME_STREAM_MM=0) gives the same products."""
    g = torch.Generator().manual_seed(2)
    in_f, out_f = 70, 200  # tails past every vector width
    shape = (in_f, out_f) if transposed else (out_f, in_f)
    weights = [torch.randn(5, *shape, generator=g), torch.randn(3, *shape, generator=g)]
    rows = torch.tensor([1, 0, 4, 16, 17, 2, 129, 3])  # 129 rows take the GEMM either way
    x = torch.randn(int(rows.sum()), in_f, generator=g)
    offsets = rows.cumsum(0).to(torch.int32)
    streamed = segmented_mm(x, weights, offsets, transposed)
    monkeypatch.setenv("MOE_RUNTIME_STREAM_MM", "0")
    gemm = segmented_mm(x, weights, offsets, transposed)
    want = segmented_mm_reference(x, weights, offsets, transposed)
    torch.testing.assert_close(streamed, want, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(gemm, want, rtol=RTOL, atol=ATOL)


@requires_extension
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("tokens, top_k", [(1, 2), (3, 4), (5, 1)])
def test_slot_rows_mm_matches_reference(transposed, tokens, top_k):
    g = torch.Generator().manual_seed(tokens * 10 + top_k)
    in_f, out_f = 70, 200
    shape = (in_f, out_f) if transposed else (out_f, in_f)
    weights = [torch.randn(4, *shape, generator=g), torch.randn(2, *shape, generator=g)]
    x = torch.randn(tokens, in_f, generator=g)
    slots = torch.randint(0, 6, (tokens * top_k,), generator=g)
    slots[0] = 6  # past the last slot: a dropped entry, a zero row
    got = slot_rows_mm(x, weights, slots, transposed)
    want = slot_rows_mm_reference(x, weights, slots, transposed)
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)
    assert not got[0].any()
    with pytest.raises(RuntimeError, match="multiple"):
        slot_rows_mm(torch.randn(2, in_f), weights, torch.zeros(3, dtype=torch.long), transposed)
