"""The compiled ``rows_linear`` op against ``F.linear``, and the streaming kernels inside ``segmented_mm``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moe_runtime.ops import extension_available, rows_linear, streams_rows
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
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 16, 17])
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
    assert not streams_rows(torch.randn(17, 16), w)  # past STREAM_ROWS_MAX: the GEMM
    assert not streams_rows(torch.randn(1, 16, dtype=torch.float64), w.double())
    assert not streams_rows(torch.randn(1, 16), torch.randn(16, 8).t())
    assert not streams_rows(torch.randn(1, 16, requires_grad=True), w)


@requires_extension
@pytest.mark.parametrize("transposed", [False, True])
def test_segmented_mm_streamed_equals_gemm_path(transposed, monkeypatch):
    """Slots of up to 16 rows stream; the GEMM path (MOE_RUNTIME_STREAM_MM=0) gives the same products."""
    g = torch.Generator().manual_seed(2)
    in_f, out_f = 70, 200  # tails past every vector width
    shape = (in_f, out_f) if transposed else (out_f, in_f)
    weights = [torch.randn(5, *shape, generator=g), torch.randn(3, *shape, generator=g)]
    rows = torch.tensor([1, 0, 4, 16, 17, 2, 0, 3])  # 17 rows take the GEMM either way
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
