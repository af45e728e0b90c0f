"""Hashing on every core: payload ranges read back and checked by a pool of threads.

The reader (signing.bundle) puts each range of bytes in place (a kernel copy into staging, or
nothing at all for verify: the bytes already lie in the bundle file) and hands this pool where
they lie; each worker reads its range with ``pread`` into a buffer of its own and hashes it
(hashlib releases the GIL on large updates, so N workers use N cores). What is hashed at
install is what the staged file holds, read back, as before (docs/adr/0008-install-copy-path.md).

Memory stays fixed: one read buffer per worker, and at most ``2 x workers`` jobs in flight,
after which :meth:`PoolHasher.submit` waits. Failures are reported in stream order whatever
order the workers finish in, so a refusal says what a sequential pass would have said: a job
that fails is raised once every job before it is done, and only if none of those failed.
Decisions and measurements: docs/adr/0022-chunk-hashes.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Final

from appliance.staging import leave_signals_to_the_main_thread
from signing.bounded import quote
from signing.bundle import Segment
from signing.chunks import HashJob
from signing.errors import PayloadError

# The piece a worker reads and hashes at a time: it stays in the core's L2 between the two.
READ_BYTES: Final = 512 << 10
MAX_WORKERS: Final = 64


def default_workers() -> int:
    """One hashing thread per core this process may run on."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_WORKERS))


class PoolHasher:
    """Checks :class:`~signing.chunks.HashJob` ranges on ``workers`` threads."""

    def __init__(self, workers: int | None = None) -> None:
        self._workers = workers or default_workers()
        self._pool = ThreadPoolExecutor(
            max_workers=self._workers,
            thread_name_prefix="hash",
            initializer=leave_signals_to_the_main_thread,
        )
        self._slots = threading.BoundedSemaphore(2 * self._workers)
        self._local = threading.local()
        self._futures: list[Future[PayloadError | None]] = []
        self._done = 0  # futures before this index are finished and fine
        self._checked = 0  # the same, as seen by the thread that waits in _settled
        self._closed = False

    @property
    def workers(self) -> int:
        return self._workers

    def __enter__(self) -> PoolHasher:
        return self

    def __exit__(self, *_: object) -> None:
        self._closed = True  # queued jobs close their descriptors and stop
        self._pool.shutdown(wait=True)

    def submit(self, job: HashJob, segments: list[Segment]) -> Callable[[], bool]:
        self._raise_if_failed()
        self._slots.acquire()
        try:
            future = self._pool.submit(self._run, job, segments)
        except BaseException:
            self._slots.release()
            _close(segments)
            raise
        self._futures.append(future)
        index = len(self._futures) - 1
        return lambda: self._settled(index)

    def _settled(self, upto: int) -> bool:
        """Wait for the jobs up to ``upto``: True if every one matched. Called by one thread
        at a time (the sink's fsync thread), in increasing ``upto``."""
        while self._checked <= upto:
            future = self._futures[self._checked]
            if future.exception() is not None or future.result() is not None:
                return False
            self._checked += 1
        return True

    def drain(self) -> None:
        failure = self.first_failure()
        if failure is not None:
            raise failure

    def first_failure(self) -> PayloadError | None:
        for future in self._futures[self._done :]:
            failure = future.result()
            if failure is not None:
                return failure
            self._done += 1
        return None

    def _raise_if_failed(self) -> None:
        """Raise the first failure in stream order once it is certain (every job before it
        finished), without waiting for jobs that are still running."""
        futures = self._futures
        while self._done < len(futures) and futures[self._done].done():
            failure = futures[self._done].result()
            if failure is not None:
                raise failure
            self._done += 1

    def _run(self, job: HashJob, segments: list[Segment]) -> PayloadError | None:
        try:
            if self._closed:
                return PayloadError("bundle: hashing stopped")
            buffer = self._buffer()
            digest = hashlib.sha256()
            for segment in segments:
                _hash_range(segment, buffer, digest)
            actual = digest.hexdigest()
            return None if actual == job.expected else PayloadError(job.mismatch(actual))
        except OSError as exc:
            return PayloadError(
                f"bundle: cannot read back bytes {job.offset}..{job.offset + job.length} of "
                f"{quote(job.member)}: {exc.strerror}"
            )
        finally:
            _close(segments)
            self._slots.release()

    def _buffer(self) -> memoryview:
        buffer: memoryview | None = getattr(self._local, "buffer", None)
        if buffer is None:
            buffer = memoryview(bytearray(READ_BYTES))
            self._local.buffer = buffer
        return buffer


def _hash_range(segment: Segment, buffer: memoryview, digest: hashlib._Hash) -> None:
    offset, end = segment.offset, segment.offset + segment.length
    while offset < end:
        view = buffer[: min(len(buffer), end - offset)]
        got = os.preadv(segment.fd, [view], offset)
        if got == 0:
            raise OSError(0, f"file ended at byte {offset}, {end - offset} bytes early")
        digest.update(view[:got])
        offset += got


def _close(segments: list[Segment]) -> None:
    for segment in segments:
        with contextlib.suppress(OSError):
            os.close(segment.fd)
    segments.clear()
