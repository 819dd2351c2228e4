"""Asynchronous expert loader: positional reads of byte ranges of files into CPU tensors.

    submit(path, ranges, dest, priority) -> ticket
      -> queue ordered by (priority, arrival): 0 = on-demand runs before 1 = prefetch
      -> a worker thread opens the file (O_DIRECT optional) and preads the ranges back to back
         into dest (O_DIRECT: straight into dest where offset and address are 4 KiB-aligned,
         otherwise through an aligned staging buffer, copied out)
      -> widen_from (optional): the ranges hold the bf16 / fp16 values of a float32 dest; they are
         read into its last half and widened in place by the worker (no staging memory)
      -> wait(ticket) returns, or raises LoaderError naming the path and offset

Two backends with the same semantics: "cpp", the custom class
`torch.classes.moe_runtime.ExpertLoader` (csrc/loader.cpp, a C++ thread pool), and "python",
the pure-Python reference (threads + `os.preadv`). Both read without holding the GIL (the custom
class's methods release it, as does `os.preadv`), and `wait` blocks in short slices so Python
threads and Ctrl-C stay responsive.

A submit that matches a queued or running ticket (same dest address, path and ranges) returns
that ticket instead of reading twice, moving it up if the new priority is lower: this is how an
on-demand load promotes a queued prefetch of the same expert. Outcomes of finished tickets are
kept for the 4,096 most recent ones (failures and cancellations until reported); a ticket whose
outcome was forgotten counts as done.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import heapq
import mmap
import os
import threading
import time
from collections import deque
from dataclasses import dataclass

import torch

from ._extension import load_extension

__all__ = [
    "ExpertLoader",
    "LoaderCancelledError",
    "LoaderError",
    "aligned_empty",
    "cpp_loader_available",
    "widen_in_place",
]

# Ticket states, shared with csrc/loader.h.
_QUEUED, _RUNNING, _DONE, _FAILED, _CANCELLED = range(5)
_ALIGN = 4096  # O_DIRECT alignment of offsets, lengths and buffers
_MAX_CHUNK = 1 << 30  # largest single pread
_RETAINED_OUTCOMES = 4096
_WAIT_SLICE_S = 0.1  # longest uninterrupted block of `wait`
_COUNTERS = (
    "submitted",
    "reads",
    "bytes_read",
    "staged_bytes",
    "failed",
    "cancelled",
    "promoted",
    "deduplicated",
    "direct_fallbacks",
    "widened",
    "queued",
    "running",
)


class LoaderError(OSError):
    """A load failed (open error, read error, short read); the message names the path and offset."""


class LoaderCancelledError(LoaderError):
    """The ticket was cancelled before it started (by `cancel` or `close`)."""


def aligned_empty(nbytes: int, alignment: int = _ALIGN) -> torch.Tensor:
    """An uninitialized uint8 tensor of `nbytes` whose data starts on an `alignment` boundary.

    With direct_io, reads of block-aligned ranges into such a buffer go straight into it (no
    staging copy). The tensor is a view of a slightly larger allocation.
    """
    buffer = torch.empty(nbytes + alignment, dtype=torch.uint8)
    pad = -buffer.data_ptr() % alignment
    return buffer[pad : pad + nbytes]


_WIDEN = {torch.bfloat16: 1, torch.float16: 2}  # shared with csrc/loader.h (Widen)
_WIDEN_DTYPES = {code: dtype for dtype, code in _WIDEN.items()}


def widen_in_place(dest: torch.Tensor, stored: torch.dtype) -> None:
    """Widen the ``dest.numel()`` values of the narrower dtype ``stored`` held in the last bytes of
    ``dest`` into ``dest`` itself (the reference of the loader's widening).

    A float32 slot of ``n`` values has room for its ``n`` bf16 values in its upper half: reading them
    there and widening front to back needs no staging memory. Each step converts a block whose
    source lies wholly past its destination (``(n - done) * (wide - narrow) // wide`` values), so
    no value is overwritten before it is read: about log2(n) steps.
    """
    n = dest.numel()
    flat = dest.view(-1)
    raw = flat.view(torch.uint8)
    wide, narrow = flat.element_size(), torch.empty(0, dtype=stored).element_size()
    source = raw[raw.numel() - n * narrow :].view(stored)
    done = 0
    while (count := (n - done) * (wide - narrow) // wide) >= 1:
        flat[done : done + count].copy_(source[done : done + count])
        done += count
    for index in range(done, n):  # at most one value left: read before it is overwritten
        flat[index] = source[index].clone()


@functools.cache
def _cpp_class():
    """The compiled custom class, or None when the extension is not built or predates it (a build
    without widening: its ``stats`` lack ``widened``; rebuild with ``python setup.py build_ext --inplace``)."""
    try:
        load_extension()
        cls = torch.classes.moe_runtime.ExpertLoader
        probe = cls(1, False, _ALIGN, 0)
    except (RuntimeError, AttributeError):
        return None
    try:
        current = "widened" in dict(probe.stats())
    finally:
        probe.close()
    return cls if current else None


def cpp_loader_available() -> bool:
    """Whether the compiled loader (backend "cpp") is available."""
    return _cpp_class() is not None


class ExpertLoader:
    """Asynchronous positional reads of byte ranges of files into CPU tensors.

    Thread-safe: any Python thread may submit, wait, cancel. Use as a context manager or call
    `close`.

    Args:
        num_threads: Reader threads (>= 1).
        direct_io: Open files with O_DIRECT (bypassing the page cache); falls back to buffered
            reads, counted in stats()["direct_fallbacks"], where the file system refuses it.
        staging_bytes: Bound on the aligned staging buffers of all threads together (used only
            with direct_io, for unaligned offsets, addresses and tails; at least 4 KiB a thread).
        backend: "cpp" (the compiled loader), "python" (the reference) or "auto" (cpp if built).
        fail_every: Test hook: if > 0 (None = 0), every fail_every-th ticket taken off the queue fails with
            EIO instead of reading.

    Raises:
        ValueError: Bad arguments.
        RuntimeError: backend="cpp" but the compiled loader is unavailable.
    """

    def __init__(
        self,
        num_threads: int = 2,
        *,
        direct_io: bool = False,
        staging_bytes: int = 16 << 20,
        backend: str = "auto",
        fail_every: int | None = 0,
    ) -> None:
        if backend not in ("auto", "cpp", "python"):
            raise ValueError(f"ExpertLoader: backend must be 'auto', 'cpp' or 'python', got {backend!r}")
        if int(num_threads) < 1:
            raise ValueError(f"ExpertLoader: num_threads must be >= 1, got {num_threads}")
        if direct_io and int(staging_bytes) < _ALIGN * int(num_threads):
            raise ValueError(
                f"ExpertLoader: staging_bytes must hold one {_ALIGN}-byte block per thread with direct_io, "
                f"got {staging_bytes} for {num_threads} threads"
            )
        fail_every = int(fail_every or 0)
        if fail_every < 0:
            raise ValueError(f"ExpertLoader: fail_every must be >= 0, got {fail_every}")
        cls = _cpp_class() if backend != "python" else None
        if backend == "cpp" and cls is None:
            raise RuntimeError("ExpertLoader: the compiled loader is unavailable (build moe_runtime._C)")
        self.backend = "cpp" if cls is not None else "python"
        make = cls if cls is not None else _PythonLoader
        self._impl = make(int(num_threads), bool(direct_io), int(staging_bytes), int(fail_every))

    def submit(
        self,
        path: str | os.PathLike,
        ranges: list[tuple[int, int]],
        dest: torch.Tensor,
        priority: int = 0,
        *,
        widen_from: torch.dtype | None = None,
    ) -> int:
        """Queues reads of `ranges` of `path`, back to back into `dest`.

        Args:
            path: File to read.
            ranges: (file offset, nbytes) pairs; offsets and sizes need no alignment.
            dest: Contiguous CPU tensor with at least sum(nbytes) bytes; must stay untouched
                until the ticket finished.
            priority: Lower runs first: 0 = on-demand, 1 = prefetch.
            widen_from: torch.bfloat16 or torch.float16: the ranges hold exactly dest's values in
                that dtype; dest is float32 and receives them widened (by the reader thread).

        Returns:
            The ticket (an int >= 1); an existing one if a queued or running ticket reads the
            same ranges of the same path into the same dest.

        Raises:
            ValueError: Malformed ranges or dest.
            RuntimeError: The loader is closed.
        """
        if not isinstance(dest, torch.Tensor) or dest.device.type != "cpu" or not dest.is_contiguous():
            raise ValueError("ExpertLoader.submit: dest must be a contiguous CPU tensor")
        offsets, sizes = [], []
        for item in ranges:
            offset, nbytes = (int(v) for v in item)
            if offset < 0 or nbytes < 0:
                raise ValueError(f"ExpertLoader.submit: range {tuple(item)} has a negative offset or size")
            offsets.append(offset)
            sizes.append(nbytes)
        capacity = dest.numel() * dest.element_size()
        if sum(sizes) > capacity:
            raise ValueError(
                f"ExpertLoader.submit: the ranges hold {sum(sizes)} bytes but dest only {capacity}"
            )
        widen = 0
        if widen_from is not None:
            if widen_from not in _WIDEN or dest.dtype != torch.float32:
                raise ValueError(
                    f"ExpertLoader.submit: widening goes from bfloat16 or float16 into float32, got {widen_from} "
                    f"into {dest.dtype}"
                )
            if sum(sizes) != 2 * dest.numel():
                raise ValueError(
                    f"ExpertLoader.submit: widening {dest.numel()} values needs ranges of {2 * dest.numel()} "
                    f"bytes, got {sum(sizes)}"
                )
            widen = _WIDEN[widen_from]
        return int(self._impl.submit(os.fspath(path), offsets, sizes, dest, int(priority), widen))

    def promote(self, ticket: int, priority: int = 0) -> bool:
        """Moves a queued ticket up to `priority` (default on-demand); True if it was still queued."""
        return bool(self._impl.promote(int(ticket), int(priority)))

    def wait(self, ticket: int, timeout_s: float | None = None) -> None:
        """Blocks until the ticket finished.

        Raises:
            LoaderError: The read failed or was short (the message names path and offset).
            LoaderCancelledError: The ticket was cancelled.
            TimeoutError: Not finished after timeout_s seconds.
            ValueError: Not a ticket of this loader.
        """
        ticket = int(ticket)
        deadline = None if timeout_s is None else time.monotonic() + float(timeout_s)
        while True:
            slice_s = _WAIT_SLICE_S
            if deadline is not None:
                slice_s = max(0.0, min(slice_s, deadline - time.monotonic()))
            state, error, message = self._impl.wait(ticket, slice_s)
            if state == _DONE:
                return
            if state == _FAILED:
                raise LoaderError(int(error), message)
            if state == _CANCELLED:
                raise LoaderCancelledError(errno.ECANCELED, message)
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"ExpertLoader.wait: ticket {ticket} not finished after {timeout_s} s")

    def done(self, ticket: int) -> bool:
        """Whether the ticket finished (read, failed or cancelled); never blocks."""
        return int(self._impl.state(int(ticket))) >= _DONE

    def cancel(self, ticket: int) -> bool:
        """Cancels a queued ticket; True if it was still queued (never started)."""
        return bool(self._impl.cancel(int(ticket)))

    def pause(self) -> None:
        """Holds queued tickets (running reads finish); submits keep queueing."""
        self._impl.pause()

    def resume(self) -> None:
        """Lets the threads take queued tickets again."""
        self._impl.resume()

    def stats(self) -> dict:
        """Counters (ints): submitted, reads (tickets read), bytes_read, staged_bytes (bytes copied
        through staging), failed, cancelled, promoted, deduplicated, direct_fallbacks, widened
        (tickets whose values were widened), queued and
        running (now); seconds (floats): queue_wait_s, read_time_s (summed over tickets)."""
        raw = dict(self._impl.stats())
        return {key: int(value) if key in _COUNTERS else float(value) for key, value in raw.items()}

    def close(self) -> None:
        """Cancels queued tickets, lets running reads finish and joins the threads. Idempotent."""
        self._impl.close()

    def _start_index(self, ticket: int) -> int:
        """Order in which the ticket left the queue (0 first), -1 if it did not (tests)."""
        return int(self._impl.start_index(int(ticket)))

    def __enter__(self) -> ExpertLoader:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __del__(self) -> None:
        impl = getattr(self, "_impl", None)
        if isinstance(impl, _PythonLoader):  # the C++ destructor closes the compiled loader
            impl.close()


@dataclass(eq=False)
class _Request:
    id: int
    path: str
    offsets: list[int]
    sizes: list[int]
    dest: torch.Tensor | None
    priority: int
    submitted: float
    widen: int = 0
    seq: int = 0
    state: int = _QUEUED
    error: int = 0
    message: str = ""
    reported: bool = False
    start_index: int = -1


@dataclass
class _Outcome:
    error: int = 0
    message: str = ""
    bytes: int = 0
    staged: int = 0
    fallback: bool = False
    widened: bool = False


@dataclass
class _Counters:
    submitted: int = 0
    reads: int = 0
    bytes_read: int = 0
    staged_bytes: int = 0
    failed: int = 0
    cancelled: int = 0
    promoted: int = 0
    deduplicated: int = 0
    direct_fallbacks: int = 0
    widened: int = 0
    queue_wait_s: float = 0.0
    read_time_s: float = 0.0


def _read_full(fd: int, view: memoryview, pos: int, direct: bool) -> int:
    """Reads into `view` from file position `pos` until full or the end of the file (with
    O_DIRECT, a partial block also ends it); returns the bytes read. Raises OSError."""
    total = 0
    while total < len(view):
        got = os.preadv(fd, [view[total : total + _MAX_CHUNK]], pos + total)
        if got == 0:
            break
        total += got
        if direct and got % _ALIGN:
            break
    return total


class _PythonLoader:
    """Pure-Python reference of csrc/loader.cpp: same methods, states and semantics."""

    def __init__(self, num_threads: int, direct_io: bool, staging_bytes: int, fail_every: int) -> None:
        self._direct_io = direct_io
        self._staging_size = max(_ALIGN, staging_bytes // num_threads // _ALIGN * _ALIGN)
        self._fail_every = fail_every
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._done = threading.Condition(self._lock)
        self._close_lock = threading.Lock()
        self._requests: dict[int, _Request] = {}
        self._heap: list[tuple[int, int, int]] = []  # (priority, seq, ticket); stale entries skipped
        self._queued = 0
        self._pending_by_dest: dict[int, int] = {}
        self._retained: deque[int] = deque()
        self._next_ticket = 1
        self._next_seq = 0
        self._started = 0
        self._executed = 0
        self._running = 0
        self._paused = False
        self._closing = False
        self._counters = _Counters()
        self._threads = [
            threading.Thread(target=self._worker, name=f"expert-loader-{i}", daemon=True)
            for i in range(num_threads)
        ]
        for thread in self._threads:
            thread.start()

    # All methods below whose name starts with "_" (except the worker) need self._lock held.

    def _find(self, ticket: int, method: str) -> _Request | None:
        if not 1 <= ticket < self._next_ticket:
            raise ValueError(f"ExpertLoader.{method}: unknown ticket {ticket}")
        return self._requests.get(ticket)

    def _enqueue(self, request: _Request) -> None:
        request.seq = self._next_seq
        self._next_seq += 1
        heapq.heappush(self._heap, (request.priority, request.seq, request.id))
        self._work.notify()

    def _requeue(self, request: _Request, priority: int) -> None:
        request.priority = priority  # the old heap entry goes stale
        self._counters.promoted += 1
        self._enqueue(request)

    def _retain(self, ticket: int) -> None:
        self._retained.append(ticket)
        while len(self._retained) > _RETAINED_OUTCOMES:
            self._requests.pop(self._retained.popleft(), None)

    def _finish(self, request: _Request, state: int) -> None:
        if request.state == _QUEUED:
            self._queued -= 1
        request.state = state
        if request.dest is not None and request.dest.numel() > 0:
            address = request.dest.data_ptr()
            if self._pending_by_dest.get(address) == request.id:
                del self._pending_by_dest[address]
        request.dest = None
        if state == _CANCELLED:
            self._counters.cancelled += 1
        elif state == _FAILED:
            self._counters.failed += 1
        else:
            self._retain(request.id)
        self._done.notify_all()

    def submit(
        self, path: str, offsets: list[int], sizes: list[int], dest: torch.Tensor, priority: int, widen: int
    ) -> int:
        with self._lock:
            if self._closing:
                raise RuntimeError("ExpertLoader.submit: the loader is closed")
            address = dest.data_ptr() if dest.numel() > 0 else 0
            other = self._requests.get(self._pending_by_dest.get(address, 0)) if address else None
            if other is not None and (other.path, other.offsets, other.sizes, other.widen) == (
                path,
                offsets,
                sizes,
                widen,
            ):
                self._counters.deduplicated += 1
                if other.state == _QUEUED and priority < other.priority:
                    self._requeue(other, priority)
                return other.id
            request = _Request(
                self._next_ticket, path, offsets, sizes, dest, priority, time.monotonic(), widen
            )
            self._next_ticket += 1
            self._requests[request.id] = request
            if address:
                self._pending_by_dest[address] = request.id
            self._counters.submitted += 1
            self._queued += 1
            self._enqueue(request)
            return request.id

    def promote(self, ticket: int, priority: int) -> bool:
        with self._lock:
            request = self._find(ticket, "promote")
            if request is None or request.state != _QUEUED:
                return False
            if priority < request.priority:
                self._requeue(request, priority)
            return True

    def cancel(self, ticket: int) -> bool:
        with self._lock:
            request = self._find(ticket, "cancel")
            if request is None or request.state != _QUEUED:
                return False
            request.message = f"ticket {ticket} ({request.path}) was cancelled"
            self._finish(request, _CANCELLED)
            request.reported = True
            self._retain(ticket)
            return True

    def wait(self, ticket: int, timeout_s: float) -> tuple[int, int, str]:
        with self._lock:
            request = self._find(ticket, "wait")
            if request is None:
                return _DONE, 0, ""
            self._done.wait_for(lambda: request.state >= _DONE, None if timeout_s < 0 else timeout_s)
            if request.state in (_FAILED, _CANCELLED) and not request.reported:
                request.reported = True
                self._retain(ticket)
            return request.state, request.error, request.message

    def state(self, ticket: int) -> int:
        with self._lock:
            request = self._find(ticket, "state")
            return _DONE if request is None else request.state

    def start_index(self, ticket: int) -> int:
        with self._lock:
            request = self._find(ticket, "start_index")
            return -1 if request is None else request.start_index

    def pause(self) -> None:
        with self._lock:
            self._paused = True

    def resume(self) -> None:
        with self._lock:
            self._paused = False
            self._work.notify_all()

    def stats(self) -> dict:
        with self._lock:
            out = {key: getattr(self._counters, key) for key in _COUNTERS if hasattr(self._counters, key)}
            out.update(
                queued=self._queued,
                running=self._running,
                queue_wait_s=self._counters.queue_wait_s,
                read_time_s=self._counters.read_time_s,
            )
            return out

    def close(self) -> None:
        with self._close_lock:
            with self._lock:
                self._closing = True
                for _, _, ticket in sorted(self._heap):
                    request = self._requests.get(ticket)
                    if request is not None and request.state == _QUEUED:
                        request.message = f"ticket {ticket} ({request.path}) was cancelled: the loader closed"
                        self._finish(request, _CANCELLED)
                self._heap.clear()
                self._work.notify_all()
            current = threading.current_thread()
            for thread in self._threads:
                if thread is not current:
                    thread.join()
            self._threads = []

    def _take(self) -> _Request | None:
        """Pops the next valid queued request (lock held), or None if the queue holds none."""
        while self._heap:
            priority, seq, ticket = heapq.heappop(self._heap)
            request = self._requests.get(ticket)
            if (
                request is not None
                and request.state == _QUEUED
                and (request.priority, request.seq) == (priority, seq)
            ):
                return request
        return None

    def _worker(self) -> None:
        staging: list[memoryview] = []  # this thread's aligned buffer, made on first use
        with self._lock:
            while True:
                self._work.wait_for(lambda: self._closing or (not self._paused and self._queued > 0))
                if self._closing:
                    return
                request = self._take()
                if request is None:
                    continue
                self._queued -= 1
                request.state = _RUNNING
                request.start_index = self._started
                self._started += 1
                self._executed += 1
                inject = self._fail_every > 0 and self._executed % self._fail_every == 0
                self._running += 1
                start = time.monotonic()
                self._counters.queue_wait_s += start - request.submitted
                self._lock.release()
                try:
                    if inject:
                        outcome = _Outcome(
                            errno.EIO,
                            f"injected read failure (fail_every={self._fail_every}) reading {request.path}: "
                            + os.strerror(errno.EIO),
                        )
                    else:
                        outcome = self._execute(request, staging)
                except Exception as exc:  # a bug must fail the ticket, not kill the thread
                    outcome = _Outcome(errno.EIO, f"reading {request.path}: {exc!r}")
                finally:
                    self._lock.acquire()
                self._running -= 1
                counters = self._counters
                counters.read_time_s += time.monotonic() - start
                counters.bytes_read += outcome.bytes
                counters.staged_bytes += outcome.staged
                counters.direct_fallbacks += int(outcome.fallback)
                counters.widened += int(outcome.widened)
                request.error, request.message = outcome.error, outcome.message
                counters.reads += int(outcome.error == 0)
                self._finish(request, _DONE if outcome.error == 0 else _FAILED)

    def _execute(self, request: _Request, staging: list[memoryview]) -> _Outcome:
        outcome = _Outcome()
        path = request.path

        def fail(error: int, what: str, strerror: str | None = None) -> _Outcome:
            outcome.error = error
            outcome.message = f"{what}: {strerror or os.strerror(error)}"
            return outcome

        flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)
        fd, direct = -1, False
        if self._direct_io and hasattr(os, "O_DIRECT"):
            try:
                fd, direct = os.open(path, flags | os.O_DIRECT), True
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    return fail(exc.errno, f"opening {path}")
                outcome.fallback = True
        if fd < 0:
            try:
                fd = os.open(path, flags)
            except OSError as exc:
                return fail(exc.errno, f"opening {path}")
        try:
            base = request.dest.data_ptr()
            if request.widen:  # the 16-bit values go to the last half, widened after
                base += request.dest.numel() * request.dest.element_size() // 2
            total = sum(request.sizes)
            out = memoryview((ctypes.c_ubyte * total).from_address(base)).cast("B")
            done_bytes = 0
            for offset, nbytes in zip(request.offsets, request.sizes):
                what = f"reading {path} at offset {offset} ({nbytes} bytes)"
                view = out[done_bytes : done_bytes + nbytes]
                done = 0
                try:
                    if not direct or (offset % _ALIGN == 0 and (base + done_bytes) % _ALIGN == 0):
                        length = nbytes // _ALIGN * _ALIGN if direct else nbytes
                        got = _read_full(fd, view[:length], offset, direct)
                        if got < length:
                            return fail(errno.EIO, what, f"short read, the file ends at byte {offset + got}")
                        done = length
                    while done < nbytes:
                        if not staging:
                            staging.append(memoryview(mmap.mmap(-1, self._staging_size)))  # page-aligned
                        buffer = staging[0]
                        pos = offset + done
                        block = pos // _ALIGN * _ALIGN
                        skip = pos - block
                        want = min(nbytes - done, self._staging_size - skip)
                        length = -(-(skip + want) // _ALIGN) * _ALIGN
                        got = _read_full(fd, buffer[:length], block, True)
                        if got < skip + want:
                            return fail(errno.EIO, what, f"short read, the file ends at byte {block + got}")
                        view[done : done + want] = buffer[skip : skip + want]
                        outcome.staged += want
                        done += want
                except OSError as exc:
                    return fail(exc.errno or errno.EIO, what, exc.strerror)
                done_bytes += nbytes
                outcome.bytes += nbytes
            if request.widen:
                widen_in_place(request.dest, _WIDEN_DTYPES[request.widen])
                outcome.widened = True
            return outcome
        finally:
            os.close(fd)
