"""Asynchronous positional reads of file byte ranges into CPU tensors (pure-Python stand-in).

    submit(path, [(offset, nbytes), ...], dest, priority) -> ticket     queued by (priority, order)
    reader threads: os.preadv straight into dest's memory               no intermediate copy
    wait(ticket) -> done or LoaderError naming path and offset

This module keeps the agreed interface (see the C++ loader in csrc/); only the Python backend is
implemented here.
"""

from __future__ import annotations

import heapq
import itertools
import os
import threading
import time
from dataclasses import dataclass, field

import torch

__all__ = ["ExpertLoader", "LoaderError"]


class LoaderError(OSError):
    """A read failed or came back short; the message names the file and offset."""


@dataclass(order=True)
class _Job:
    priority: int
    order: int
    ticket: int = field(compare=False)
    path: str = field(compare=False)
    ranges: list[tuple[int, int]] = field(compare=False)
    dest: torch.Tensor = field(compare=False)
    queued_at: float = field(compare=False, default=0.0)
    state: str = field(compare=False, default="queued")  # queued, running, done, failed, cancelled
    error: BaseException | None = field(compare=False, default=None)
    event: threading.Event = field(compare=False, default_factory=threading.Event)


class ExpertLoader:
    """Reads byte ranges of files into CPU tensors on background threads, lower priority first.

    Args:
        num_threads: reader threads.
        direct_io: accepted for interface compatibility (the Python backend reads through the page cache).
        staging_bytes: accepted for interface compatibility.
        backend: ``"auto"`` or ``"python"`` (this stand-in has no compiled backend).
        fail_every: tests only: every N-th read fails with a LoaderError.
    """

    def __init__(
        self,
        num_threads: int = 2,
        *,
        direct_io: bool = False,
        staging_bytes: int = 16 << 20,
        backend: str = "auto",
        fail_every: int | None = None,
    ) -> None:
        if backend not in ("auto", "python"):
            raise ValueError(f"backend '{backend}' is not available in this build (use 'python')")
        self._lock = threading.Condition()
        self._queue: list[_Job] = []
        self._jobs: dict[int, _Job] = {}
        self._order = itertools.count()
        self._tickets = itertools.count(1)
        self._fds: dict[str, int] = {}
        self._closed = False
        self._fail_every = fail_every
        self._reads = 0
        self._stats = {
            "bytes_read": 0,
            "reads": 0,
            "queue_wait_s": 0.0,
            "read_time_s": 0.0,
            "failed": 0,
            "cancelled": 0,
        }
        self._threads = [
            threading.Thread(target=self._worker, name=f"expert-loader-{i}", daemon=True)
            for i in range(max(1, num_threads))
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, path: str, ranges: list[tuple[int, int]], dest: torch.Tensor, priority: int = 0) -> int:
        """Queue reading ``ranges`` back to back into ``dest``; returns a ticket."""
        total = sum(n for _, n in ranges)
        if dest.device.type != "cpu" or not dest.is_contiguous():
            raise ValueError("dest must be a contiguous CPU tensor")
        if dest.numel() * dest.element_size() < total:
            raise ValueError(f"dest holds {dest.numel() * dest.element_size()} bytes, ranges need {total}")
        with self._lock:
            if self._closed:
                raise RuntimeError("the loader is closed")
            for job in self._queue:  # the same destination queued as a prefetch: promote it
                if (
                    job.dest.data_ptr() == dest.data_ptr()
                    and job.state == "queued"
                    and job.priority > priority
                ):
                    job.priority = priority
                    heapq.heapify(self._queue)
                    return job.ticket
            ticket = next(self._tickets)
            job = _Job(
                priority, next(self._order), ticket, str(path), list(ranges), dest, time.perf_counter()
            )
            self._jobs[ticket] = job
            heapq.heappush(self._queue, job)
            self._lock.notify()
        return ticket

    def promote(self, ticket: int) -> None:
        """Run a queued ticket as on-demand (priority 0)."""
        with self._lock:
            job = self._jobs.get(ticket)
            if job is not None and job.state == "queued" and job.priority > 0:
                job.priority = 0
                heapq.heapify(self._queue)

    def wait(self, ticket: int, timeout_s: float | None = None) -> None:
        """Block until the ticket is done.

        Raises:
            LoaderError: the read failed. TimeoutError: not done in time. RuntimeError: cancelled.
        """
        job = self._job(ticket)
        if not job.event.wait(timeout_s):
            raise TimeoutError(f"read of {job.path} not done after {timeout_s} s")
        with self._lock:
            self._jobs.pop(ticket, None)  # a finished ticket is forgotten once waited on
        if job.state == "cancelled":
            raise RuntimeError(f"read of {job.path} was cancelled")
        if job.error is not None:
            raise job.error

    def done(self, ticket: int) -> bool:
        """True once the ticket finished (ok, failed or cancelled) or was already waited on."""
        job = self._jobs.get(ticket)
        return job is None or job.event.is_set()

    def cancel(self, ticket: int) -> bool:
        """Cancel a ticket that has not started; True if it was still queued."""
        with self._lock:
            job = self._jobs.get(ticket)
            if job is None or job.state != "queued":
                return False
            job.state = "cancelled"
            self._queue.remove(job)
            heapq.heapify(self._queue)
            self._stats["cancelled"] += 1
        job.event.set()
        return True

    def stats(self) -> dict:
        with self._lock:
            return dict(self._stats)

    def close(self) -> None:
        """Cancel queued reads and join the threads."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for job in self._queue:
                job.state = "cancelled"
                job.event.set()
            self._stats["cancelled"] += len(self._queue)
            self._queue.clear()
            self._lock.notify_all()
        for thread in self._threads:
            thread.join()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> ExpertLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _job(self, ticket: int) -> _Job:
        try:
            return self._jobs[ticket]
        except KeyError:
            raise KeyError(f"unknown loader ticket {ticket}") from None

    def _fd(self, path: str) -> int:
        with self._lock:
            fd = self._fds.get(path)
            if fd is None:
                fd = self._fds[path] = os.open(path, os.O_RDONLY)
            return fd

    def _worker(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._closed:
                    self._lock.wait()
                if self._closed:
                    return
                job = heapq.heappop(self._queue)
                job.state = "running"
                self._stats["queue_wait_s"] += time.perf_counter() - job.queued_at
                self._reads += 1
                inject = self._fail_every is not None and self._reads % self._fail_every == 0
            start = time.perf_counter()
            try:
                if inject:
                    raise LoaderError(f"{job.path}: injected read failure at offset {job.ranges[0][0]}")
                self._read(job)
                job.state = "done"
            except OSError as exc:
                job.state, job.error = (
                    "failed",
                    exc if isinstance(exc, LoaderError) else LoaderError(f"{job.path}: {exc}"),
                )
            with self._lock:
                self._stats["read_time_s"] += time.perf_counter() - start
                self._stats["reads"] += 1
                if job.state == "failed":
                    self._stats["failed"] += 1
                else:
                    self._stats["bytes_read"] += sum(n for _, n in job.ranges)
            job.event.set()

    def _read(self, job: _Job) -> None:
        fd = self._fd(job.path)
        buffer = memoryview(job.dest.view(-1).view(torch.uint8).numpy())
        pos = 0
        for offset, nbytes in job.ranges:
            done = 0
            while done < nbytes:
                got = os.preadv(fd, [buffer[pos + done : pos + nbytes]], offset + done)
                if got <= 0:
                    raise LoaderError(
                        f"{job.path}: short read at offset {offset + done} ({done} of {nbytes} bytes)"
                    )
                done += got
            pos += nbytes
