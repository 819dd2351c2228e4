"""reroute_permute: the compiled op against its pure-PyTorch reference and a plain-Python spec.

Tests taking ``device`` run the op on that device (CPU kernel, or the CUDA kernel) and compare with
the reference on the CPU: every output is integer, so they must be equal exactly.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_runtime.ops import (
    Rerouted,
    _extension,
    extension_available,
    group_by_slot,
    reroute_permute,
    reroute_permute_reference,
)

requires_extension = pytest.mark.skipif(not extension_available(), reason="moe_runtime._C is not built")


def make_inputs(
    seed: int, tokens: int, top_k: int, owners: int, experts: int, num_slots: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Random routing with out-of-range expert ids and a table with -1 and too-large slots."""
    gen = torch.Generator().manual_seed(seed)
    top_k_index = torch.randint(-2, experts + 3, (tokens, top_k), generator=gen)
    token_owner = torch.randint(0, owners, (tokens,), generator=gen)
    slot_table = torch.randint(0, num_slots + 2, (owners, experts), generator=gen, dtype=torch.int32)
    dropped = torch.rand(owners, experts, generator=gen) < 0.25
    return top_k_index, token_owner, slot_table.masked_fill(dropped, -1), num_slots


def spec(top_k_index, token_owner, slot_table, num_slots) -> Rerouted:
    """The semantics written out entry by entry in plain Python."""
    num_owners, num_experts = slot_table.shape
    slots = []
    for t, row in enumerate(top_k_index.tolist()):
        for e in row:
            slot = num_slots
            if 0 <= e < num_experts and 0 <= slot_table[token_owner[t], e] < num_slots:
                slot = int(slot_table[token_owner[t], e])
            slots.append(slot)
    perm = sorted(range(len(slots)), key=lambda f: (slots[f], f))
    inv_perm = [0] * len(perm)
    for j, f in enumerate(perm):
        inv_perm[f] = j
    offsets = [sum(s <= g for s in slots) for g in range(num_slots)]
    return Rerouted(
        torch.tensor(slots, dtype=torch.int64),
        torch.tensor(perm, dtype=torch.int64),
        torch.tensor(inv_perm, dtype=torch.int64),
        torch.tensor(offsets, dtype=torch.int32),
    )


def on(device: str, inputs: tuple) -> tuple:
    """``inputs`` with every tensor moved to ``device``."""
    return tuple(x.to(device) if isinstance(x, torch.Tensor) else x for x in inputs)


def assert_same(actual: Rerouted, expected: Rerouted) -> None:
    for name, a, b in zip(Rerouted._fields, actual, expected, strict=True):
        torch.testing.assert_close(a.cpu(), b.cpu(), rtol=0, atol=0, msg=lambda m, name=name: f"{name}: {m}")


def shapes(max_tokens: int) -> st.SearchStrategy[tuple[int, int, int, int, int, int]]:
    """(seed, T, K, A, E, num_slots) for `make_inputs`."""
    return st.tuples(
        st.integers(0, 2**31 - 1),
        st.integers(0, max_tokens),
        st.integers(1, 8),
        st.integers(1, 5),
        st.integers(1, 70),
        st.integers(0, 80),
    )


@settings(max_examples=40, deadline=None)
@given(shapes(max_tokens=40))
def test_reference_matches_spec(shape):
    inputs = make_inputs(*shape)
    assert_same(reroute_permute_reference(*inputs), spec(*inputs))


@requires_extension
@settings(max_examples=150, deadline=None)
@given(shape=shapes(max_tokens=300))
def test_op_matches_reference(shape, device):
    inputs = make_inputs(*shape)
    result = reroute_permute(*on(device, inputs))
    assert all(t.device.type == device for t in result)
    assert_same(result, reroute_permute_reference(*inputs))


@requires_extension
@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), tokens=st.integers(10_000, 70_000))
def test_op_matches_reference_large(seed, tokens, device):
    """Large batches: hundreds of thread blocks, thousands of atomic counts per slot, a long stable sort."""
    inputs = make_inputs(seed, tokens, 4, 5, 64, 150)
    assert_same(reroute_permute(*on(device, inputs)), reroute_permute_reference(*inputs))


@requires_extension
@pytest.mark.parametrize("threads", [1, 2, 3, 8])
def test_op_is_deterministic_across_thread_counts(threads):
    inputs = make_inputs(seed=7, tokens=40_000, top_k=4, owners=5, experts=64, num_slots=150)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        actual = reroute_permute(*inputs)
    finally:
        torch.set_num_threads(before)
    assert_same(actual, reroute_permute_reference(*inputs))


EDGE_CASES = {
    "no_tokens": (torch.zeros(0, 4, dtype=torch.int64), torch.zeros(0, dtype=torch.int64), 3),
    "one_slot_for_all": (torch.full((9, 2), 1), torch.zeros(9, dtype=torch.int64), 3),
    "all_sentinel": (torch.full((6, 3), 5), torch.zeros(6, dtype=torch.int64), 3),
    "no_slots": (torch.zeros(5, 2, dtype=torch.int64), torch.zeros(5, dtype=torch.int64), 0),
}


@requires_extension
@pytest.mark.parametrize("case", sorted(EDGE_CASES))
def test_edge_cases(case, device):
    top_k_index, token_owner, num_slots = EDGE_CASES[case]
    slot_table = torch.tensor([[2, 1, -1, 0, 2, -1]], dtype=torch.int32)
    result = reroute_permute(*on(device, (top_k_index, token_owner, slot_table, num_slots)))
    assert_same(result, spec(top_k_index, token_owner, slot_table, num_slots))
    entries = top_k_index.numel()
    if case == "one_slot_for_all":
        assert result.offsets.tolist() == [0, entries, entries]  # slots 0 and 2 are empty groups
    if case in ("all_sentinel", "no_slots"):
        assert result.offsets.tolist() == [0] * num_slots
        assert result.perm.tolist() == list(range(entries))


@requires_extension
def test_empty_table_and_noncontiguous_inputs(device):
    top_k_index = torch.tensor([[0, 3, 1], [2, 2, 0]], device=device).t()  # [3, 2], not contiguous
    token_owner = torch.tensor([1, 0, 0, 1, 2, 0], device=device)[::2]
    slot_table = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0], [1, 1, -1, 0]], dtype=torch.int32, device=device)
    assert not top_k_index.is_contiguous() and not token_owner.is_contiguous()
    expected = spec(*on("cpu", (top_k_index, token_owner, slot_table, 4)))
    assert_same(reroute_permute(top_k_index, token_owner, slot_table, 4), expected)
    empty_table = torch.zeros(1, 0, dtype=torch.int32, device=device)
    owner = torch.zeros(3, dtype=torch.int64, device=device)
    assert_same(
        reroute_permute(top_k_index, owner, empty_table, 2),
        spec(*on("cpu", (top_k_index, owner, empty_table, 2))),
    )


@requires_extension
def test_inputs_on_two_devices_raise(device):
    if device == "cpu":
        pytest.skip("needs a second device type (cuda)")
    top_k_index, token_owner, slot_table, num_slots = make_inputs(0, 4, 2, 1, 4, 3)
    with pytest.raises(RuntimeError, match="one device"):
        reroute_permute(top_k_index.to(device), token_owner, slot_table.to(device), num_slots)


@requires_extension
@pytest.mark.parametrize(
    ("top_k_index", "token_owner", "slot_table", "match"),
    [
        (
            torch.zeros(2, 1, dtype=torch.int64),
            torch.tensor([0, 2]),
            torch.zeros(2, 3, dtype=torch.int32),
            "token_owner\\[1\\] = 2",
        ),
        (
            torch.zeros(2, 1, dtype=torch.int64),
            torch.tensor([-1, 0]),
            torch.zeros(2, 3, dtype=torch.int32),
            "token_owner\\[0\\] = -1",
        ),
        (
            torch.zeros(2, 1, dtype=torch.int32),
            torch.tensor([0, 0]),
            torch.zeros(2, 3, dtype=torch.int32),
            "int64",
        ),
        (
            torch.zeros(2, 1, dtype=torch.int64),
            torch.tensor([0, 0]),
            torch.zeros(2, 3, dtype=torch.int64),
            "int32",
        ),
        (
            torch.zeros(2, 1, dtype=torch.int64),
            torch.tensor([0]),
            torch.zeros(2, 3, dtype=torch.int32),
            "\\[T\\]",
        ),
        (
            torch.zeros(2, dtype=torch.int64),
            torch.tensor([0, 0]),
            torch.zeros(2, 3, dtype=torch.int32),
            "\\[T, K\\]",
        ),
    ],
)
def test_bad_inputs_raise(top_k_index, token_owner, slot_table, match):
    with pytest.raises(RuntimeError, match=match):
        reroute_permute(top_k_index, token_owner, slot_table, 3)


def test_reference_rejects_bad_owner():
    with pytest.raises(RuntimeError, match="token_owner"):
        reroute_permute_reference(
            torch.zeros(2, 1, dtype=torch.int64),
            torch.tensor([0, 3]),
            torch.zeros(2, 3, dtype=torch.int32),
            3,
        )


@requires_extension
def test_offsets_drive_grouped_mm(device):
    """A grouped GEMM through perm/offsets equals one matmul per routed entry (float32 on the CPU)."""
    tokens, top_k, hidden_size, out_size, num_slots = 13, 3, 8, 4, 8
    top_k_index, token_owner, slot_table, _ = make_inputs(3, tokens, top_k, 3, 6, num_slots)
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(tokens, hidden_size, generator=gen)
    weights = torch.randn(num_slots, hidden_size, out_size, generator=gen)

    grouped, rerouted = group_by_slot(*on(device, (hidden, top_k_index, token_owner, slot_table, num_slots)))
    out = torch._grouped_mm(grouped, weights.to(device), offs=rerouted.offsets)
    per_entry = out[rerouted.inv_perm].cpu()  # back to flat (token, k) order
    rerouted = Rerouted(*(t.cpu() for t in rerouted))
    valid = rerouted.slot_ids < num_slots
    assert 0 < int(valid.sum()) < tokens * top_k  # both routed and dropped entries occur

    expected = torch.stack(
        [hidden[f // top_k] @ weights[s] for f, s in enumerate(rerouted.slot_ids.tolist()) if s < num_slots]
    )
    torch.testing.assert_close(per_entry[valid], expected, atol=1e-5, rtol=1.3e-6)


@requires_extension
@pytest.mark.parametrize("shape", [(0, 2, 1, 3, 4), (5, 2, 2, 6, 4), (17, 4, 3, 9, 1)])
def test_opcheck(shape, device):
    """Schema, fake kernel (shapes without data) and AOT dispatch with dynamic shapes, per device kernel."""
    tokens, top_k, owners, experts, num_slots = shape
    inputs = on(device, make_inputs(11, tokens, top_k, owners, experts, num_slots))
    torch.library.opcheck(torch.ops.moe_runtime.reroute_permute.default, inputs)


@requires_extension
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiles_without_graph_breaks(device, backend):
    """One graph with dynamic shapes; aot_eager traces through the fake kernel."""
    torch._dynamo.reset()
    compiled = torch.compile(reroute_permute, fullgraph=True, backend=backend, dynamic=True)
    for tokens in (6, 11):
        inputs = make_inputs(5, tokens, 2, 2, 7, 5)
        assert_same(compiled(*on(device, inputs)), reroute_permute_reference(*inputs))


def test_missing_extension_raises_with_build_hint(monkeypatch):
    monkeypatch.setattr(_extension, "_extension", None)
    monkeypatch.setitem(sys.modules, "moe_runtime._C", None)  # makes the import fail
    with pytest.raises(RuntimeError, match="build_ext --inplace"):
        reroute_permute(*make_inputs(0, 3, 2, 1, 4, 2))


@requires_extension
def test_import_and_cpu_op_never_initialize_cuda():
    code = textwrap.dedent(
        """
        import sys
        import torch
        import moe_runtime
        import moe_runtime.ops as ops
        assert "moe_runtime._C" not in sys.modules, "the extension loaded at import"
        result = ops.reroute_permute(
            torch.tensor([[0, 1]]), torch.tensor([0]), torch.tensor([[1, 0]], dtype=torch.int32), 2
        )
        assert result.perm.tolist() == [1, 0]
        assert not torch.cuda.is_initialized(), "CUDA was initialized"
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
