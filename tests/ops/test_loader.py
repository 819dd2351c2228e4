"""ExpertLoader, both backends: bytes equal the file's, priorities, promote, cancel, errors, close."""

from __future__ import annotations

import contextlib
import errno
import os
import random
import threading
import time
from pathlib import Path

import pytest
import torch

from moe_runtime.ops.loader import (
    ExpertLoader,
    LoaderCancelledError,
    LoaderError,
    aligned_empty,
    cpp_loader_available,
)

BACKENDS = [
    "python",
    pytest.param(
        "cpp", marks=pytest.mark.skipif(not cpp_loader_available(), reason="moe_runtime._C lacks the loader")
    ),
]
ALIGN = 4096
TIMEOUT = 10.0  # generous bound on every wait: a hang fails the test instead of stalling it


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> tuple[Path, bytes]:
    """A file of random bytes whose size is not a multiple of the O_DIRECT block."""
    path = tmp_path_factory.mktemp("loader") / "experts.bin"
    data = random.Random(0).randbytes(300 * 1024 + 1234)
    path.write_bytes(data)
    return path, data


def test_aligned_empty():
    for nbytes in (0, 1, 5000):
        tensor = aligned_empty(nbytes)
        assert tensor.numel() == nbytes and tensor.dtype == torch.uint8 and tensor.is_contiguous()
        assert tensor.data_ptr() % ALIGN == 0


def as_bytes(tensor: torch.Tensor, nbytes: int) -> bytes:
    return tensor.view(-1).view(torch.uint8)[:nbytes].numpy().tobytes()


def expected(data: bytes, ranges: list[tuple[int, int]]) -> bytes:
    return b"".join(data[offset : offset + nbytes] for offset, nbytes in ranges)


def random_ranges(rng: random.Random, size: int, count: int) -> list[tuple[int, int]]:
    """Unaligned ranges, block-aligned ones, one ending exactly at the end of the file, an empty one."""
    ranges = []
    for _ in range(count):
        kind = rng.random()
        if kind < 0.3:
            offset = rng.randrange(0, size // ALIGN) * ALIGN
            nbytes = min(rng.randrange(1, 8) * ALIGN, size - offset)
        elif kind < 0.4:
            nbytes = rng.randrange(1, 20000)
            offset = size - nbytes
        elif kind < 0.45:
            offset, nbytes = rng.randrange(0, size), 0
        else:
            offset = rng.randrange(0, size - 1)
            nbytes = rng.randrange(1, min(50000, size - offset) + 1)
        ranges.append((offset, nbytes))
    return ranges


def gate(loader: ExpertLoader, tmp_path: Path) -> tuple[int, Path]:
    """Submits a read of a FIFO: the worker blocks in open() until `release` opens the writer."""
    fifo = tmp_path / "gate.fifo"
    os.mkfifo(fifo)
    ticket = loader.submit(fifo, [(0, 8)], torch.zeros(8, dtype=torch.uint8))
    deadline = time.monotonic() + TIMEOUT
    while loader._start_index(ticket) < 0:
        assert time.monotonic() < deadline, "the gate ticket never started"
        time.sleep(0.005)
    return ticket, fifo


def release(fifo: Path) -> None:
    os.close(os.open(fifo, os.O_WRONLY))


@pytest.mark.parametrize("direct_io", [False, True])
def test_random_ranges_equal_file_bytes(backend, data_file, direct_io):
    path, data = data_file
    rng = random.Random(1)
    # 8 KiB of staging per thread: long unaligned ranges go through it in several chunks.
    with ExpertLoader(3, direct_io=direct_io, staging_bytes=3 * 8192, backend=backend) as loader:
        jobs = []
        for i in range(40):
            ranges = random_ranges(rng, len(data), rng.randrange(1, 5))
            total = sum(n for _, n in ranges)
            if i % 3 == 0:
                dest = aligned_empty(total)
            elif i % 3 == 1:
                dest = torch.zeros((total + 3) // 4 + 1, dtype=torch.float32)  # any dtype, spare room
            else:
                dest = torch.zeros(total + 5, dtype=torch.uint8)[5:]  # unaligned address
            jobs.append((loader.submit(path, ranges, dest, priority=i % 2), ranges, dest))
        for ticket, ranges, dest in jobs:
            loader.wait(ticket, timeout_s=TIMEOUT)
            assert loader.done(ticket)
            assert as_bytes(dest, sum(n for _, n in ranges)) == expected(data, ranges)
        stats = loader.stats()
    assert stats["submitted"] == stats["reads"] == 40
    assert stats["bytes_read"] == sum(sum(n for _, n in ranges) for _, ranges, _ in jobs)
    assert stats["failed"] == stats["cancelled"] == stats["queued"] == stats["running"] == 0
    assert stats["read_time_s"] > 0 and stats["queue_wait_s"] >= 0
    if direct_io:
        assert stats["staged_bytes"] > 0  # unaligned ranges went through staging
    else:
        assert stats["staged_bytes"] == 0


def test_direct_io_reads_aligned_blocks_in_place(backend, data_file):
    path, data = data_file
    with ExpertLoader(1, direct_io=True, backend=backend) as loader:
        dest = aligned_empty(4 * ALIGN)
        loader.wait(loader.submit(path, [(2 * ALIGN, 4 * ALIGN)], dest), TIMEOUT)
        if loader.stats()["direct_fallbacks"]:
            pytest.skip("the temporary directory's file system refuses O_DIRECT")
        assert loader.stats()["staged_bytes"] == 0
        assert as_bytes(dest, 4 * ALIGN) == data[2 * ALIGN : 6 * ALIGN]
        # Aligned start, unaligned length: whole blocks in place, the tail (to EOF) staged.
        tail = len(data) - 10 * ALIGN
        dest = aligned_empty(tail)
        loader.wait(loader.submit(path, [(10 * ALIGN, tail)], dest), TIMEOUT)
        assert loader.stats()["staged_bytes"] == tail % ALIGN
        assert as_bytes(dest, tail) == data[10 * ALIGN :]


def test_on_demand_overtakes_queued_prefetch(backend, data_file):
    path, _ = data_file
    with ExpertLoader(1, backend=backend) as loader:
        loader.pause()
        names = ["p1", "p2", "d1", "p3", "d2"]
        tickets = {
            name: loader.submit(
                path, [(i * 100, 100)], torch.empty(100, dtype=torch.uint8), priority=int(name[0] == "p")
            )
            for i, name in enumerate(names)
        }
        assert loader.stats()["queued"] == 5
        loader.resume()
        for ticket in tickets.values():
            loader.wait(ticket, TIMEOUT)
        order = sorted(names, key=lambda name: loader._start_index(tickets[name]))
    assert order == ["d1", "d2", "p1", "p2", "p3"]


def test_promote_and_resubmit_move_a_prefetch_up(backend, data_file):
    path, data = data_file
    with ExpertLoader(1, backend=backend) as loader:
        loader.pause()
        dests = [torch.zeros(64, dtype=torch.uint8) for _ in range(4)]
        tickets = [loader.submit(path, [(i * 64, 64)], dests[i], priority=1) for i in range(4)]
        assert loader.promote(tickets[2]) is True
        # Submitting the same read into the same dest on demand returns the queued ticket, moved up.
        assert loader.submit(path, [(3 * 64, 64)], dests[3], priority=0) == tickets[3]
        # The same dest with other ranges is a different read.
        other = torch.zeros(64, dtype=torch.uint8)
        assert loader.submit(path, [(0, 32)], other, priority=1) not in tickets
        stats = loader.stats()
        assert (stats["promoted"], stats["deduplicated"], stats["submitted"]) == (2, 1, 5)
        loader.resume()
        for ticket in tickets:
            loader.wait(ticket, TIMEOUT)
        assert [loader._start_index(t) for t in tickets] == [2, 3, 0, 1]
        assert loader.promote(tickets[0]) is False  # finished
        assert [as_bytes(d, 64) for d in dests] == [data[i * 64 : (i + 1) * 64] for i in range(4)]


def test_cancel_queued_ticket(backend, data_file):
    path, data = data_file
    with ExpertLoader(1, backend=backend) as loader:
        loader.pause()
        kept, dropped = torch.zeros(10, dtype=torch.uint8), torch.zeros(10, dtype=torch.uint8)
        a = loader.submit(path, [(0, 10)], kept)
        b = loader.submit(path, [(10, 10)], dropped)
        assert loader.cancel(b) is True
        assert loader.cancel(b) is False
        assert loader.done(b) and not loader.done(a)
        loader.resume()
        loader.wait(a, TIMEOUT)
        assert loader.cancel(a) is False
        with pytest.raises(LoaderCancelledError, match="cancelled") as info:
            loader.wait(b, TIMEOUT)
        assert info.value.errno == errno.ECANCELED
        assert isinstance(info.value, LoaderError)
        assert as_bytes(kept, 10) == data[:10] and not dropped.any()
        assert loader.stats()["cancelled"] == 1


def test_running_ticket_cannot_be_cancelled_and_wait_times_out(backend, tmp_path):
    with ExpertLoader(1, backend=backend) as loader:
        ticket, fifo = gate(loader, tmp_path)
        assert loader.cancel(ticket) is False
        assert not loader.done(ticket)
        assert loader.stats()["running"] == 1
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            loader.wait(ticket, timeout_s=0.2)
        assert 0.15 < time.monotonic() - start < 2.0
        release(fifo)
        with pytest.raises(LoaderError, match="gate.fifo at offset 0") as info:
            loader.wait(ticket, TIMEOUT)  # pread on a FIFO fails: the error reaches the waiter
        assert info.value.errno == errno.ESPIPE


@pytest.mark.parametrize("direct_io", [False, True])
def test_read_errors_surface_on_wait(backend, tmp_path, direct_io):
    path = tmp_path / "short.bin"
    path.write_bytes(bytes(range(256)) * 40)  # 10240 bytes
    with ExpertLoader(2, backend=backend, direct_io=direct_io) as loader:
        dest = torch.zeros(4096, dtype=torch.uint8)
        missing = loader.submit(tmp_path / "missing.bin", [(0, 10)], dest)
        with pytest.raises(LoaderError, match="missing.bin") as info:
            loader.wait(missing, TIMEOUT)
        assert info.value.errno == errno.ENOENT
        for offset, nbytes in [(9000, 2000), (20000, 10), (8192, 4096)]:
            ticket = loader.submit(
                path, [(0, 16), (offset, nbytes)], torch.zeros(16 + nbytes, dtype=torch.uint8)
            )
            with pytest.raises(LoaderError, match=f"short.bin at offset {offset} .*short read") as info:
                loader.wait(ticket, TIMEOUT)
            assert info.value.errno == errno.EIO
            assert loader.done(ticket)
            with pytest.raises(LoaderError):  # the outcome is kept: a second wait raises again
                loader.wait(ticket, TIMEOUT)
        # A file truncated between submit and read.
        loader.pause()
        ticket = loader.submit(path, [(4096, 4096)], aligned_empty(4096))
        os.truncate(path, 5000)
        loader.resume()
        with pytest.raises(LoaderError, match="ends at byte 5000"):
            loader.wait(ticket, TIMEOUT)
        assert loader.stats()["failed"] == 5


def test_injected_failures(backend, data_file):
    path, data = data_file
    with ExpertLoader(1, backend=backend, fail_every=3) as loader:
        dests = [torch.zeros(32, dtype=torch.uint8) for _ in range(6)]
        tickets = [loader.submit(path, [(i, 32)], dests[i]) for i in range(6)]
        for i, ticket in enumerate(tickets):
            if i % 3 == 2:
                with pytest.raises(LoaderError, match="injected") as info:
                    loader.wait(ticket, TIMEOUT)
                assert info.value.errno == errno.EIO
            else:
                loader.wait(ticket, TIMEOUT)
                assert as_bytes(dests[i], 32) == data[i : i + 32]
        stats = loader.stats()
        assert (stats["reads"], stats["failed"]) == (4, 2)


def test_many_concurrent_submitters(backend, data_file):
    path, data = data_file
    errors = []
    with ExpertLoader(3, backend=backend) as loader:

        def client(seed: int) -> None:
            rng = random.Random(seed)
            try:
                for _ in range(15):
                    ranges = random_ranges(rng, len(data), rng.randrange(1, 4))
                    dest = torch.zeros(sum(n for _, n in ranges), dtype=torch.uint8)
                    loader.wait(loader.submit(path, ranges, dest, priority=rng.randrange(2)), TIMEOUT)
                    assert as_bytes(dest, dest.numel()) == expected(data, ranges)
            except Exception as exc:  # reported by the main thread
                errors.append(exc)

        threads = [threading.Thread(target=client, args=(seed,)) for seed in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(TIMEOUT)
        assert not errors, errors
        assert loader.stats()["reads"] == 8 * 15


def test_close_cancels_queued_and_finishes_running(backend, tmp_path, data_file):
    path, _ = data_file
    loader = ExpertLoader(1, backend=backend)
    running, fifo = gate(loader, tmp_path)
    queued = [loader.submit(path, [(i, 8)], torch.zeros(8, dtype=torch.uint8)) for i in range(3)]
    closer = threading.Thread(target=loader.close)
    closer.start()
    deadline = time.monotonic() + TIMEOUT
    while not all(loader.done(t) for t in queued):
        assert time.monotonic() < deadline, "close did not cancel the queued tickets"
        time.sleep(0.005)
    assert closer.is_alive()  # still joining the thread that is blocked on the gate
    release(fifo)
    closer.join(TIMEOUT)
    assert not closer.is_alive()
    for ticket in queued:
        with pytest.raises(LoaderCancelledError, match="closed"):
            loader.wait(ticket, TIMEOUT)
    with pytest.raises(LoaderError) as info:  # the running read finished (and failed) normally
        loader.wait(running, TIMEOUT)
    assert info.value.errno == errno.ESPIPE
    assert loader.stats()["cancelled"] == 3
    with pytest.raises(RuntimeError, match="closed"):
        loader.submit(path, [(0, 8)], torch.zeros(8, dtype=torch.uint8))
    loader.close()  # idempotent


def test_threads_end_after_close_and_destruction(backend, data_file):
    path, _ = data_file

    def count() -> int:
        """Live loader threads: named in /proc (C++ threads) or in threading (Python threads)."""
        if backend == "python":
            return sum(thread.name.startswith("expert-loader") for thread in threading.enumerate())
        names = []
        for task in os.listdir("/proc/self/task"):
            with contextlib.suppress(OSError):  # the thread just ended
                names.append(Path(f"/proc/self/task/{task}/comm").read_text().strip())
        return names.count("expert-loader")

    baseline = count()
    assert baseline == 0
    loader = ExpertLoader(4, backend=backend)
    assert count() == baseline + 4
    loader.wait(loader.submit(path, [(0, 100)], torch.zeros(100, dtype=torch.uint8)), TIMEOUT)
    loader.close()
    assert count() == baseline
    loader = ExpertLoader(3, backend=backend)
    loader.pause()
    loader.submit(path, [(0, 100)], torch.zeros(100, dtype=torch.uint8))
    del loader  # never closed: the destructor cancels and joins
    deadline = time.monotonic() + TIMEOUT
    while count() != baseline:
        assert time.monotonic() < deadline, "loader threads outlived the loader"
        time.sleep(0.01)


def test_wait_lets_other_python_threads_run(backend, tmp_path):
    with ExpertLoader(1, backend=backend) as loader:
        ticket, fifo = gate(loader, tmp_path)
        spins, stop = [0], threading.Event()

        def spin() -> None:
            while not stop.is_set():
                spins[0] += 1

        spinner = threading.Thread(target=spin)
        spinner.start()
        with pytest.raises(TimeoutError):
            loader.wait(ticket, timeout_s=0.3)
        stop.set()
        spinner.join()
        release(fifo)
        with pytest.raises(LoaderError):
            loader.wait(ticket, TIMEOUT)
    assert spins[0] > 1000  # a wait holding the GIL would have frozen the spinner


def test_old_outcomes_are_forgotten_but_failures_are_kept(backend, tmp_path, data_file):
    path, _ = data_file
    with ExpertLoader(2, backend=backend) as loader:
        failed = loader.submit(tmp_path / "missing.bin", [], torch.zeros(0))
        first = loader.submit(path, [(0, 1)], torch.zeros(1, dtype=torch.uint8))
        tickets = [loader.submit(path, [], torch.zeros(0)) for _ in range(4200)]
        for ticket in tickets:
            loader.wait(ticket, TIMEOUT)
        assert loader.done(first)
        loader.wait(first, TIMEOUT)  # forgotten: counts as done
        assert loader._start_index(first) == -1
        with pytest.raises(LoaderError, match="missing.bin"):
            loader.wait(failed, TIMEOUT)


def test_bad_arguments(backend, data_file):
    path, _ = data_file
    with pytest.raises(ValueError, match="backend"):
        ExpertLoader(backend="rust")
    with pytest.raises(ValueError, match="num_threads"):
        ExpertLoader(0, backend=backend)
    with pytest.raises(ValueError, match="staging_bytes"):
        ExpertLoader(2, direct_io=True, staging_bytes=4096, backend=backend)
    with ExpertLoader(1, backend=backend) as loader:
        with pytest.raises(ValueError, match="contiguous"):
            loader.submit(path, [(0, 4)], torch.zeros(4, 4)[:, 0])
        with pytest.raises(ValueError, match="holds? 20 bytes but dest only 16"):
            loader.submit(path, [(0, 10), (50, 10)], torch.zeros(16, dtype=torch.uint8))
        with pytest.raises(ValueError, match="negative"):
            loader.submit(path, [(-1, 4)], torch.zeros(4, dtype=torch.uint8))
        for method in (loader.wait, loader.done, loader.cancel, loader.promote):
            with pytest.raises(ValueError, match="unknown ticket 7"):
                method(7)


def test_auto_backend_prefers_cpp():
    with ExpertLoader() as loader:
        assert loader.backend == ("cpp" if cpp_loader_available() else "python")


@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("direct_io", [False, True])
def test_widening_reads_equal_a_cast(backend, tmp_path, stored, direct_io):
    """16-bit values in two ranges (unaligned, back to back in dest) arrive widened into float32."""
    values = torch.randn(5000 + 4099).to(stored)
    raw = values.view(torch.uint8).numpy().tobytes()
    path = tmp_path / "w.bin"
    path.write_bytes(b"x" * 123 + raw[:10000] + b"y" * 77 + raw[10000:])
    ranges = [(123, 10000), (123 + 10000 + 77, len(raw) - 10000)]
    dest = torch.full((values.numel(),), float("nan"))
    with ExpertLoader(2, backend=backend, direct_io=direct_io) as loader:
        loader.wait(loader.submit(path, ranges, dest, widen_from=stored), TIMEOUT)
        assert loader.stats()["widened"] == 1
        with pytest.raises(ValueError, match="widening"):
            loader.submit(path, ranges[:1], dest, widen_from=stored)  # not all of dest's values
        with pytest.raises(ValueError, match="widening"):
            loader.submit(path, ranges, dest.double(), widen_from=stored)
    assert torch.equal(dest, values.float())
