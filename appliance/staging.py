"""Step I5's and V6-V9's payload sinks: where a bundle's member bytes go, on which threads.

The installer (appliance.installer) decides what is installed; this module only moves bytes
fast and boundedly: the kernel copy with read-back hashing for a bundle file
(:class:`CopyingSink`), a writer thread for a pipe (:class:`StagingSink`), read-ahead for
verify (:class:`ReadAheadSink`). Each keeps memory fixed whatever the bundle size, fsyncs on a
thread of its own, skips every fsync once the install is failing, and leaves SIGINT and SIGTERM
to the main thread. Measurements and the reasoning: docs/adr/0008-install-copy-path.md.
"""

from __future__ import annotations

import errno
import io
import os
import queue
import signal
import stat
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final, Protocol, runtime_checkable

from appliance.fsutil import fsync_dir
from appliance.limits import HOST_LIMITS
from signing.bundle import DiscardSink, Limits
from signing.errors import StateError
from signing.manifest import Entry
from signing.tarstream import TarReader


class StagingSink:
    """Writes payload files into staging on a thread of its own; a third thread fsyncs them.

    The reader thread hashes chunk N+1 while the writer writes chunk N (hashlib and os.write
    release the GIL), and each finished file is fsynced and closed on the syncer thread while
    the writer goes on with the next file: the disk flushes while the CPU hashes. A fixed pool
    of buffers bounds memory whatever the bundle size (docs/benchmarks.md has the figures).
    """

    def __init__(self, payload_dir: Path, limits: Limits) -> None:
        self._dir = payload_dir
        self._free: queue.Queue[bytearray] = queue.Queue()
        for _ in range(limits.buffers):
            self._free.put(bytearray(limits.chunk_bytes))
        self._ops: queue.Queue[tuple[str, Any, int]] = queue.Queue()
        self._error: OSError | None = None
        self._aborted = False
        self._thread = threading.Thread(target=self._run, name="staging-writer", daemon=True)
        self._to_sync: queue.Queue[int | None] = queue.Queue()
        self._syncer = threading.Thread(target=self._sync, name="staging-fsync", daemon=True)

    def __enter__(self) -> StagingSink:
        self._dir.mkdir(parents=True)
        self._syncer.start()
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        # On failure the staging slot is about to be deleted: drop queued writes and skip
        # every fsync, so an interrupted or refused install ends at once even on a busy disk.
        self._aborted = exc_type is not None
        self._ops.put(("stop", None, 0))
        self._thread.join()
        if exc_type is None:
            self._raise_if_failed()

    def buffer(self) -> bytearray:
        self._raise_if_failed()
        return self._free.get()

    def begin(self, entry: Entry) -> None:
        self._ops.put(("begin", entry.path, 0))

    def write(self, buffer: bytearray, length: int) -> None:
        self._ops.put(("write", buffer, length))

    def end(self, entry: Entry) -> None:
        self._ops.put(("end", entry.path, 0))

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise StateError(f"cannot write the staging slot: {self._error}")

    def _run(self) -> None:
        leave_signals_to_the_main_thread()
        fd = -1
        made_dirs: set[Path] = {self._dir}
        while True:
            op, arg, length = self._ops.get()
            if op == "stop":
                break
            try:
                if self._error is not None or self._aborted:
                    continue
                if op == "begin":
                    path = self._dir / arg
                    _make_parents(path.parent, made_dirs)
                    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
                    fd = os.open(path, flags, 0o644)
                elif op == "write":
                    view = memoryview(arg)[:length]
                    while view:
                        view = view[os.write(fd, view) :]
                elif op == "end":
                    self._to_sync.put(fd)  # the syncer fsyncs and closes it
                    fd = -1
            except OSError as exc:
                self._error = exc
            finally:
                if op == "write":
                    self._free.put(arg)
        if fd >= 0:
            os.close(fd)
        self._to_sync.put(None)
        self._syncer.join()
        if self._error is None and not self._aborted:
            for directory in sorted(made_dirs, key=lambda p: len(p.parts), reverse=True):
                fsync_dir(directory)

    def _sync(self) -> None:
        leave_signals_to_the_main_thread()
        while (fd := self._to_sync.get()) is not None:
            try:
                if not self._aborted:
                    os.fsync(fd)
            except OSError as exc:
                self._error = self._error or exc
            finally:
                os.close(fd)


# copy_file_range cannot copy between these two files (another file system on a kernel before
# 5.3 or from 5.19 on, no such system call, a file system or sandbox that refuses it): the
# next way down is tried (see CopyingSink._move).
_NO_KERNEL_COPY: Final = frozenset(
    {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM, errno.ETXTBSY}
)
_COPY_FILE_RANGE: Final = "copy_file_range"
_SENDFILE: Final = "sendfile"
_READ_WRITE: Final = "read/write"


@runtime_checkable
class CopySource(Protocol):
    """Where :class:`CopyingSink` takes a bundle's bytes from: one bundle file
    (:class:`FileSource`), or its split parts (appliance.parts.PartStream)."""

    def copy_range(self, count: int) -> tuple[int, int] | None:
        """A descriptor whose current position holds the next bytes, and how many of at most
        ``count`` may be copied from it; None where they must be read with ``readinto``."""

    def copied(self, count: int) -> None:
        """The kernel copied ``count`` bytes from that descriptor (its position moved)."""

    def readinto(self, buffer: memoryview, /) -> int | None: ...


class FileSource:
    """One bundle file: the kernel copies from its descriptor, at the shared position."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def copy_range(self, count: int) -> tuple[int, int] | None:
        return self._fd, count

    def copied(self, count: int) -> None:
        pass

    def readinto(self, buffer: memoryview, /) -> int:
        return os.readv(self._fd, [buffer])


class CopyingSink:
    """Step I5 for a bundle that is a regular file, or split parts: the kernel copies the
    data (within one part at a time: :class:`CopySource`), we hash it.

    For each window (``Limits.copy_window_bytes``) of a member, ``os.copy_file_range`` copies
    the bytes from the bundle file's current position into the staged file inside the kernel
    (no copy through Python, no writer thread); then the staged bytes are read back from the
    page cache in ``Limits.chunk_bytes`` pieces, each hashed while it is still in the CPU's
    cache. What is hashed is therefore what the staged file holds, not the source, which could
    change between a hash and a copy (docs/adr/0008-install-copy-path.md). The strict reader
    still reads every header and padding block: the copy advances the file position it reads
    from, through :meth:`TarReader.transfer`, which also detects a truncated bundle.

    Where ``copy_file_range`` is refused (another file system, an old kernel), ``sendfile``
    copies instead, and where that is refused too, plain ``read`` and ``write``; the staged
    bytes are read back and hashed either way. While one window is read back and hashed, the
    next window of the same member is already being copied by a worker thread (both release
    the GIL: the copy runs in the kernel, hashlib hashes large buffers without it), so copying
    and hashing overlap on two cores; the reader is only ever used by one thread at a time,
    and the member's last window is joined before its next header is read. Finished files are
    fsynced and closed on a third thread while the next file is copied; directories at the
    end, deepest first. On any failure nothing more is fsynced: the staging slot is about to
    be removed.
    """

    def __init__(self, payload_dir: Path, source: CopySource | int, limits: Limits) -> None:
        self._dir = payload_dir
        # A bare descriptor is one bundle file.
        self._source = FileSource(source) if isinstance(source, int) else source
        self._window = max(limits.copy_window_bytes, limits.chunk_bytes)
        self._buffer = bytearray(limits.chunk_bytes)
        self._view = memoryview(self._buffer)
        # The copy's own buffer, for the read/write fallback on the worker thread.
        self._move_view = memoryview(bytearray(limits.chunk_bytes))
        self._mode = _COPY_FILE_RANGE
        self._copier = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix="staging-copy",
            initializer=leave_signals_to_the_main_thread,
        )
        self._pending: Future[int] | None = None  # the next window, being copied
        self._fd = -1
        self._copied = 0  # bytes of the current file in place
        self._hashed = 0  # of which read back and handed out
        self._made_dirs: set[Path] = {payload_dir}
        self._error: OSError | None = None
        self._aborted = False
        self._to_sync: queue.Queue[int | None] = queue.Queue()
        self._syncer = threading.Thread(target=self._sync, name="staging-fsync", daemon=True)

    @property
    def mode(self) -> str:
        """How bytes are being copied: copy_file_range, sendfile or read/write."""
        return self._mode

    def __enter__(self) -> CopyingSink:
        self._dir.mkdir(parents=True)
        self._syncer.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        # On failure the staging slot is about to be deleted: skip every fsync still to do.
        self._aborted = exc_type is not None
        self._join_pending(reraise=exc_type is None)
        self._copier.shutdown(wait=True)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._to_sync.put(None)
        self._syncer.join()
        if exc_type is None:
            self._raise_if_failed()
            for directory in sorted(self._made_dirs, key=lambda p: len(p.parts), reverse=True):
                fsync_dir(directory)

    def begin(self, entry: Entry) -> None:
        self._raise_if_failed()
        path = self._dir / entry.path
        _make_parents(path.parent, self._made_dirs)
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        self._fd = os.open(path, flags, 0o644)
        self._copied = self._hashed = 0

    def take(self, tar: TarReader, length: int) -> memoryview:
        self._raise_if_failed()
        if self._hashed == self._copied:
            if self._pending is not None:
                self._join_pending(reraise=True)
            else:
                self._copied = self._copy(tar, min(length, self._window))
            # ``length`` is what is left to hash; of that, what is not copied yet goes next.
            ahead = length - (self._copied - self._hashed)
            if ahead > 0:
                self._pending = self._copier.submit(self._copy, tar, min(ahead, self._window))
        view = self._view[: min(self._copied - self._hashed, len(self._buffer))]
        _read_exactly_at(self._fd, view, self._hashed)
        self._hashed += len(view)
        return view

    def end(self, entry: Entry) -> None:
        self._to_sync.put(self._fd)  # the syncer fsyncs and closes it
        self._fd = -1

    def _copy(self, tar: TarReader, window: int) -> int:
        """Copy the member's next ``window`` bytes into the staged file (either thread);
        return how many bytes the staged file now holds."""
        tar.transfer(window, self._move)
        return os.lseek(self._fd, 0, os.SEEK_CUR)

    def _join_pending(self, *, reraise: bool) -> None:
        """Wait for the window being copied; on success it counts as copied."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        try:
            self._copied = pending.result()
        except BaseException:
            if reraise:
                raise

    def _move(self, count: int) -> int:
        """Copy up to ``count`` bytes from the bundle's position to the staged file's."""
        while self._mode != _READ_WRITE:
            target = self._source.copy_range(count)
            if target is None:
                break  # these bytes cannot come from a descriptor (a part rebuilt from parity)
            src, most = target
            try:
                if self._mode == _COPY_FILE_RANGE:
                    moved = os.copy_file_range(src, self._fd, most)
                else:
                    moved = os.sendfile(self._fd, src, None, most)
            except OSError as exc:
                if exc.errno not in _NO_KERNEL_COPY:
                    raise
                self._mode = _SENDFILE if self._mode == _COPY_FILE_RANGE else _READ_WRITE
                continue
            if moved > 0:
                self._source.copied(moved)
                return moved
            # 0 is the end of the bundle, or a file system that copies nothing (some virtual
            # and network ones): a read tells the two apart, and the copy goes on by reading.
            self._mode = _READ_WRITE
        view = self._move_view[: min(count, len(self._move_view))]
        got = self._source.readinto(view) or 0
        _write_all(self._fd, view[:got])
        return got

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise StateError(f"cannot write the staging slot: {self._error}")

    def _sync(self) -> None:
        leave_signals_to_the_main_thread()
        while (fd := self._to_sync.get()) is not None:
            try:
                if not self._aborted and self._error is None:
                    os.fsync(fd)
            except OSError as exc:
                self._error = self._error or exc
            finally:
                os.close(fd)


class ReadAheadSink:
    """Verify (V6 to V9) of a bundle that is a regular file: read the next piece while this
    one is hashed.

    ``take`` hands back a member's pieces (``READ_AHEAD_BYTES`` each) read by the strict reader;
    while the caller hashes one, a worker thread already reads the next piece of the same member
    into the other of two buffers (``readinto`` and hashlib both release the GIL). The reader is
    used by one thread at a time: the member's last piece is never read ahead, so the next
    header is read after the worker is done. Saves the read's copy from the page cache (about
    0.1 s per GiB) on the wall clock; nothing is written.
    """

    def __init__(self, piece_bytes: int) -> None:
        self._piece = piece_bytes
        self._buffers = (bytearray(piece_bytes), bytearray(piece_bytes))
        self._turn = 0
        self._pending: Future[memoryview] | None = None
        self._reader = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix="verify-read",
            initializer=leave_signals_to_the_main_thread,
        )

    def __enter__(self) -> ReadAheadSink:
        return self

    def __exit__(self, *_: object) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.exception()  # wait for it; a failure is already being raised, or moot
        self._reader.shutdown(wait=True)

    def begin(self, entry: Entry) -> None:
        pass

    def take(self, tar: TarReader, length: int) -> memoryview:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            view = pending.result()
        else:
            view = self._read(tar, min(length, self._piece))
        ahead = length - len(view)
        if ahead > 0:
            self._pending = self._reader.submit(self._read, tar, min(ahead, self._piece))
        return view

    def end(self, entry: Entry) -> None:
        pass

    def _read(self, tar: TarReader, length: int) -> memoryview:
        view = memoryview(self._buffers[self._turn])[:length]
        self._turn ^= 1
        tar.read_into(view)
        return view


# A module name (read at each call), so that a test can make the pieces small.
READ_AHEAD_BYTES: Final = HOST_LIMITS.read_ahead_bytes


@contextmanager
def verify_sink(
    stream: io.FileIO | CopySource, limits: Limits
) -> Iterator[DiscardSink | ReadAheadSink]:
    """Read-ahead for a bundle file or its parts; the plain one-thread pass for a pipe."""
    if limits.copy_window_bytes > 0 and _is_file(stream):
        with ReadAheadSink(READ_AHEAD_BYTES) as sink:
            yield sink
    else:
        yield DiscardSink(limits.chunk_bytes)


def payload_sink(
    payload_dir: Path, stream: io.FileIO | CopySource, limits: Limits
) -> StagingSink | CopyingSink:
    """The kernel copy for a bundle that is a regular file, or for its parts (within each
    part); the writer thread for a pipe."""
    if limits.copy_window_bytes > 0 and _is_file(stream):
        source = stream if isinstance(stream, CopySource) else FileSource(stream.fileno())
        return CopyingSink(payload_dir, source, limits)
    return StagingSink(payload_dir, limits)


def _is_file(stream: io.FileIO | CopySource) -> bool:
    if isinstance(stream, io.FileIO):
        return stat.S_ISREG(os.fstat(stream.fileno()).st_mode)
    return True  # split parts are files (appliance.parts)


def _read_exactly_at(fd: int, view: memoryview, offset: int) -> None:
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n == 0:
            raise StateError(f"staged file shorter than what was copied into it ({offset + got})")
        got += n


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        view = view[os.write(fd, view) :]


def leave_signals_to_the_main_thread() -> None:
    """Block SIGINT and SIGTERM in a worker thread, so the kernel delivers them to the main one.

    Python runs handlers in the main thread only; a signal that lands on a worker would not
    interrupt the main thread's blocking read of a stalled pipe (a paused data diode), and
    Ctrl-C would wait for the next byte.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})


def _make_parents(directory: Path, made: set[Path]) -> None:
    if directory in made:
        return
    _make_parents(directory.parent, made)
    directory.mkdir()
    made.add(directory)
