"""Step I5's and V6-V9's payload sinks: where a bundle's member bytes go, on which threads.

The installer (appliance.installer) decides what is installed; this module only moves bytes
fast and boundedly: the kernel copy for a bundle file, read back and hashed on every core by
appliance.hashpool (:class:`CopyingSink`), a writer thread for a pipe (:class:`StagingSink`),
and for verify only the position moved past bytes that are hashed where they lie
(:class:`InPlaceSink`). Each keeps memory fixed whatever the bundle size, fsyncs on a
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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final, Protocol, runtime_checkable

from appliance.fsutil import fsync_dir
from signing.bundle import DiscardSink, Limits, Segment
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
    data (within one part at a time: :class:`CopySource`); the hash pool reads it back.

    ``os.copy_file_range`` copies each window (``Limits.copy_window_bytes``) of a member from
    the bundle file's current position into the staged file inside the kernel (no copy through
    Python, no writer thread); :meth:`place` then says where the bytes lie in the staged file,
    and appliance.hashpool reads them back from the page cache and hashes them on other cores
    while the next range is copied. What is hashed is therefore what the staged file holds,
    not the source, which could change between a hash and a copy
    (docs/adr/0008-install-copy-path.md). The strict reader still reads every header and
    padding block: the copy advances the file position it reads from, through
    :meth:`TarReader.transfer`, which also detects a truncated bundle.

    Where ``copy_file_range`` is refused (another file system, an old kernel), ``sendfile``
    copies instead, and where that is refused too, plain ``read`` and ``write``; the staged
    bytes are read back and hashed either way. Finished files are fsynced and closed on a
    thread of their own while the next file is copied; directories at the end, deepest first.
    On any failure nothing more is fsynced: the staging slot is about to be removed.
    """

    def __init__(self, payload_dir: Path, source: CopySource | int, limits: Limits) -> None:
        self._dir = payload_dir
        # A bare descriptor is one bundle file.
        self._source = FileSource(source) if isinstance(source, int) else source
        self._window = max(limits.copy_window_bytes, limits.chunk_bytes)
        # The copy's own buffer, for the read/write fallback.
        self._move_view = memoryview(bytearray(limits.chunk_bytes))
        self._mode = _COPY_FILE_RANGE
        self._fd = -1
        self._copied = 0  # bytes of the current file in place
        self._made_dirs: set[Path] = {payload_dir}
        self._error: OSError | None = None
        self._aborted = False
        self._to_sync: queue.Queue[tuple[int, Callable[[], bool]] | None] = queue.Queue()
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
        self._copied = 0

    def place(
        self, tar: TarReader, length: int, progress: Callable[[int], None] | None
    ) -> list[Segment]:
        """Copy the member's next ``length`` bytes into the staged file; they are read back
        from there (a duplicate descriptor: the file is fsynced and closed meanwhile)."""
        self._raise_if_failed()
        start = self._copied
        done = 0
        while done < length:
            window = min(length - done, self._window)
            tar.transfer(window, self._move)
            done += window
            if progress is not None:
                progress(window)
        self._copied = start + done
        return [Segment(fd=os.dup(self._fd), offset=start, length=length)] if length else []

    def end(self, entry: Entry, settled: Callable[[], bool]) -> None:
        # The syncer fsyncs and closes it, once its hashes matched: a refused file is never
        # fsynced (the staging slot is about to be removed).
        self._to_sync.put((self._fd, settled))
        self._fd = -1

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
        while (item := self._to_sync.get()) is not None:
            fd, settled = item
            try:
                if not self._aborted and self._error is None and settled():
                    os.fsync(fd)
            except OSError as exc:
                self._error = self._error or exc
            finally:
                os.close(fd)


class InPlaceSink:
    """Verify (V6 to V9) of a bundle file or of its parts: the bytes already lie on disk.

    :meth:`place` only moves the reader's position past the member's bytes (an ``lseek``) and
    says where they lie, in the bundle file or in the parts; the hash pool reads and hashes
    them on every core. Nothing is copied and nothing written. A file shorter than it should
    be stops the move, and the strict reader reports the bundle as truncated.
    """

    def __init__(self, source: CopySource, window: int) -> None:
        self._source = source
        self._window = window  # progress is told of each
        self._segments: list[Segment] = []
        self._from = -1  # the source descriptor the last segment duplicates

    def __enter__(self) -> InPlaceSink:
        return self

    def __exit__(self, *_: object) -> None:
        for segment in self._segments:  # left by a failed move
            os.close(segment.fd)
        self._segments.clear()

    def begin(self, entry: Entry) -> None:
        pass

    def place(
        self, tar: TarReader, length: int, progress: Callable[[int], None] | None
    ) -> list[Segment]:
        done = 0
        while done < length:
            window = min(length - done, self._window)
            tar.transfer(window, self._skip)
            done += window
            if progress is not None:
                progress(window)
        placed, self._segments = self._segments, []
        return placed

    def end(self, entry: Entry, settled: Callable[[], bool]) -> None:
        pass

    def _skip(self, count: int) -> int:
        target = self._source.copy_range(count)
        if target is None:  # pragma: no cover - verify_sink gives a rebuilt part no such sink
            raise StateError("bundle bytes that are not on disk cannot be verified in place")
        fd, most = target
        position = os.lseek(fd, 0, os.SEEK_CUR)
        most = max(0, min(most, os.fstat(fd).st_size - position))
        if most == 0:
            return 0  # the end of the file: the reader calls the bundle truncated
        os.lseek(fd, most, os.SEEK_CUR)
        self._source.copied(most)
        last = self._segments[-1] if self._segments else None
        if last is not None and self._from == fd and last.offset + last.length == position:
            self._segments[-1] = Segment(fd=last.fd, offset=last.offset, length=last.length + most)
        else:
            self._segments.append(Segment(fd=os.dup(fd), offset=position, length=most))
            self._from = fd
        return most


@contextmanager
def verify_sink(
    stream: io.FileIO | CopySource, limits: Limits
) -> Iterator[DiscardSink | InPlaceSink]:
    """In place (hashed on every core) for a bundle file or parts that are all on disk; the
    plain one-thread pass for a pipe, or for parts of which one is rebuilt from parity."""
    if limits.copy_window_bytes > 0 and _is_file(stream) and _on_disk(stream):
        source = stream if isinstance(stream, CopySource) else FileSource(stream.fileno())
        with InPlaceSink(source, max(limits.copy_window_bytes, limits.chunk_bytes)) as sink:
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


def _on_disk(stream: io.FileIO | CopySource) -> bool:
    """Every byte can be read from a descriptor (not a part rebuilt from parity)."""
    return getattr(stream, "all_on_disk", True) is not False


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
