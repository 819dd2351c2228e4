"""``map_file_pieces``: byte ranges of a file, back to back in one tensor made of the file's pages.

Checked against reading the same ranges: ranges that fill whole pages, ranges whose ends fall inside
pages (those pages are copies), ranges smaller than a page; writes stay in the process (the file is
unchanged); ranges that do not line up with the tensor's pages, or lie outside the file, are refused;
the mapping is gone once the tensor is.
"""

from __future__ import annotations

import gc
import os
import sys

import pytest
import torch

from moe_runtime.ops import extension_available, load_extension

pytestmark = [
    pytest.mark.skipif(not extension_available(), reason="moe_runtime._C is not built"),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps"),
]
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


@pytest.fixture(scope="module")
def blob(tmp_path_factory):
    data = torch.randint(0, 256, (40 * PAGE,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    path = tmp_path_factory.mktemp("map") / "blob.bin"
    path.write_bytes(data.numpy().tobytes())
    return str(path), bytes(data.numpy())


def _map(path, offsets, sizes):
    load_extension()
    return torch.ops.moe_runtime.map_file_pieces(path, offsets, sizes)


def _mappings(path: str) -> int:
    with open("/proc/self/maps") as maps:
        return sum(1 for line in maps if line.rstrip().endswith(path))


@pytest.mark.parametrize(
    "offsets, sizes",
    [
        ([0, 8 * PAGE, 2 * PAGE], [2 * PAGE, 3 * PAGE, PAGE]),  # whole pages, out of file order
        ([100, 100 + 9 * PAGE, 100 + 3 * PAGE], [2 * PAGE, 2 * PAGE, 4 * PAGE]),  # every seam inside a page
        ([5000, 5100], [100, 3000]),  # smaller than a page
        ([12, 12 + 3000 + 5 * PAGE], [3000, 6 * PAGE + 17]),  # sizes not page multiples, lined up
    ],
)
def test_pieces_are_the_file_bytes(blob, offsets, sizes):
    path, data = blob
    mapped = _map(path, offsets, sizes)
    assert mapped.dtype == torch.uint8 and mapped.numel() == sum(sizes)
    assert bytes(mapped.numpy()) == b"".join(data[o : o + n] for o, n in zip(offsets, sizes))
    if max(sizes) >= 2 * PAGE:
        assert _mappings(path) > 0  # the file's own pages, not a copy
    mapped.add_(1)  # copy-on-write: the process's pages change, the file does not
    with open(path, "rb") as f:
        assert f.read() == data
    del mapped
    gc.collect()
    assert _mappings(path) == 0


def test_refuses_what_does_not_line_up(blob):
    path, _ = blob
    with pytest.raises(RuntimeError, match="line up"):
        _map(path, [0, 10], [PAGE, PAGE])
    with pytest.raises(RuntimeError, match="outside"):
        _map(path, [0], [41 * PAGE])
    with pytest.raises(RuntimeError, match="cannot open"):
        _map(path + ".missing", [0], [PAGE])


def _vm_size() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmSize:")) * 1024


@pytest.mark.parametrize("first", [0, 100 + 3 * PAGE, 5000])
def test_placed_as_the_file_modulo_2mb_and_nothing_left_reserved(blob, first):
    # each byte's address equals its file offset modulo 2 MB (so a 2 MB folio of the page cache can
    # be mapped by one entry); the slack reserved to place it is given back, with the mapping at the end
    path, data = blob
    huge = 2 << 20
    mapped = _map(path, [first, first + 12 * PAGE], [6 * PAGE, 4 * PAGE + 7])
    assert mapped.data_ptr() % huge == first % huge
    expected = data[first : first + 6 * PAGE] + data[first + 12 * PAGE : first + 16 * PAGE + 7]
    assert bytes(mapped.numpy()) == expected
    del mapped
    gc.collect()
    before = _vm_size()
    for _ in range(64):
        _map(path, [first], [8 * PAGE])  # dropped at once
    gc.collect()
    assert _vm_size() - before < 16 * huge  # 64 leaked reservations would be 128 MB or more


def _resident_in_mappings(path: str) -> int:
    """Bytes of ``path``'s mappings in this process that have page-table entries (smaps ``Rss``)."""
    total, ours = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()
            if "-" in head[0] and len(head) >= 5 and ":" not in head[0]:
                ours = head[-1] == path
            elif ours and head[0] == "Rss:":
                total += int(head[1]) * 1024
    return total


@pytest.mark.parametrize("megabytes", [1, 80])  # one thread; several (pieces of 32 MB)
def test_mapped_pages_are_populated(tmp_path, megabytes):
    # the page tables are filled when the op returns (as llama.cpp's MAP_POPULATE), by one thread
    # for a small mapping and by several, piece by piece, for a large one: every page
    path = tmp_path / "sparse.bin"
    size = megabytes << 20
    with open(path, "wb") as f:
        f.truncate(size + 3 * PAGE)  # a sparse file: its pages read as zeros
        f.seek(size + PAGE)
        f.write(b"end")
    # a range whose page is a copy, then the rest
    mapped = _map(str(path), [PAGE + 100, 2 * PAGE], [PAGE - 100, size + PAGE])
    resident = _resident_in_mappings(str(path))
    assert size <= resident <= size + 2 * PAGE
    assert not mapped[: PAGE - 100].any() and not mapped[-PAGE:].any()
    assert bytes(mapped[PAGE - 100 + size - PAGE : PAGE - 100 + size - PAGE + 3].numpy()) == b"end"
