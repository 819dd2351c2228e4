"""The compiled ``segmented_mm`` op against its pure-PyTorch reference, and its use in the experts."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from moe_runtime.ops import extension_available
from moe_runtime.ops.experts_mm import segmented_mm, segmented_mm_reference

requires_extension = pytest.mark.skipif(not extension_available(), reason="moe_runtime._C is not built")

TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _case(sizes, rows_per_slot, dtype, transposed, seed=0, in_f=8, out_f=6):
    g = torch.Generator().manual_seed(seed)
    shape = (in_f, out_f) if transposed else (out_f, in_f)
    weights = [torch.randn(n, *shape, generator=g).to(dtype) for n in sizes]
    offsets = torch.tensor(rows_per_slot).cumsum(0).to(torch.int32)
    x = torch.randn(int(sum(rows_per_slot)), in_f, generator=g).to(dtype)
    return x, weights, offsets


def _random_rows(slots, seed, empty_share):
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(1, 5, (slots,), generator=g)
    rows[torch.rand(slots, generator=g) < empty_share] = 0
    return rows.tolist()


@requires_extension
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_matches_reference_on_random_segments(dtype, transposed, seed):
    g = torch.Generator().manual_seed(100 + seed)
    sizes = torch.randint(1, 7, (int(torch.randint(1, 5, (1,), generator=g)),), generator=g).tolist()
    rows = _random_rows(sum(sizes), seed, empty_share=0.6)
    x, weights, offsets = _case(sizes, rows, dtype, transposed, seed)
    got = segmented_mm(x, weights, offsets, transposed)
    want = segmented_mm_reference(x, weights, offsets, transposed)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=TOL[dtype], atol=TOL[dtype])


@requires_extension
@pytest.mark.parametrize(
    "sizes, rows",
    [
        ([4, 3], [0, 0, 0, 0, 0, 0, 0]),  # no rows at all
        ([4, 3], [0, 0, 0, 0, 0, 0, 9]),  # every row on the last slot of the last segment
        ([4, 3], [9, 0, 0, 0, 0, 0, 0]),  # every row on slot 0
        ([1], [5]),
    ],
)
def test_edge_cases(sizes, rows):
    x, weights, offsets = _case(sizes, rows, torch.float64, False)
    got = segmented_mm(x, weights, offsets, False)
    torch.testing.assert_close(got, segmented_mm_reference(x, weights, offsets, False), rtol=0, atol=1e-12)


@requires_extension
@pytest.mark.parametrize("threads", [1, 2])
def test_independent_of_thread_count(threads):
    x, weights, offsets = _case([32, 20], _random_rows(52, 7, 0.5), torch.float32, False, in_f=64, out_f=96)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        got = segmented_mm(x, weights, offsets, False)
    finally:
        torch.set_num_threads(before)
    # each slot's rows are one product whatever the threading: bit-identical to the 1-thread result
    torch.set_num_threads(1)
    try:
        want = segmented_mm(x, weights, offsets, False)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(got, want)


@requires_extension
def test_aten_path_keeps_the_callers_grad_mode_on_every_thread():
    """bfloat16 groups run ``at::mm_out`` on the OpenMP workers; they must see the caller's no-grad
    mode (a worker starts with grad mode on, and ``out=`` ops refuse weights that require grad)."""
    x, weights, offsets = _case([16, 16], _random_rows(32, 3, 0.2), torch.bfloat16, False, in_f=32, out_f=48)
    weights = [w.requires_grad_() for w in weights]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with torch.no_grad():
            got = segmented_mm(x, weights, offsets, False)
            want = segmented_mm_reference(x, weights, offsets, False)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(got, want, rtol=TOL[torch.bfloat16], atol=TOL[torch.bfloat16])


@requires_extension
@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda x, w, o: (x, w, o[:-1]), "offsets for"),
        (lambda x, w, o: (x[:-1], w, o), "offsets end at"),
        (lambda x, w, o: (x, [w[0].float(), w[1]], o), "dtype"),
        (lambda x, w, o: (x, [w[0][:, :, :-1], w[1]], o), "does not fit"),
        (lambda x, w, o: (x, w, o.flip(0)), "non-decreasing|offsets end at"),
        (lambda x, w, o: (x, [], o), "no weight segments"),
    ],
)
def test_bad_inputs_raise(mutate, match):
    x, weights, offsets = _case([3, 2], [1, 0, 2, 1, 1], torch.float64, False)
    with pytest.raises(RuntimeError, match=match):
        segmented_mm(*mutate(x, weights, offsets), False)


@requires_extension
def test_opcheck():
    x, weights, offsets = _case([3, 2], [1, 0, 2, 1, 1], torch.float32, False)
    torch.library.opcheck(
        torch.ops.moe_runtime.segmented_mm.default,
        (x, weights, offsets, False),
        test_utils=("test_schema", "test_faketensor"),
    )


@requires_extension
def test_aten_fallback_path_matches_reference(tmp_path):
    """The per-product ``at::mm_out`` path (no BLAS symbol, other dtypes) gives the same products.

    The BLAS lookup happens once per process, so the forced fallback runs in a child process.
    """
    script = tmp_path / "check.py"
    script.write_text(
        "import torch\n"
        "from moe_runtime.ops.experts_mm import segmented_mm, segmented_mm_reference\n"
        "g = torch.Generator().manual_seed(3)\n"
        "for dtype in (torch.float32, torch.float64):\n"
        "    for transposed in (False, True):\n"
        "        shape = (8, 6) if transposed else (6, 8)\n"
        "        w = [torch.randn(n, *shape, generator=g).to(dtype) for n in (5, 3)]\n"
        "        rows = torch.tensor([2, 0, 1, 0, 3, 0, 4, 1])\n"
        "        x = torch.randn(int(rows.sum()), 8, generator=g).to(dtype)\n"
        "        o = rows.cumsum(0).to(torch.int32)\n"
        "        torch.testing.assert_close(segmented_mm(x, w, o, transposed),\n"
        "                                   segmented_mm_reference(x, w, o, transposed))\n"
        "print('ok')\n"
    )
    env = {**os.environ, "MOE_RUNTIME_SEGMENTED_MM_ATEN": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
