"""Rebuild a file from a base file and a patch, on the host (docs/adr/0019-gguf-aware-deltas.md;
the format: signing/patchformat.py).

The base is a file of an installed slot, the patch and its literal file come from a verified
delta bundle, and the target is a new file in the staging slot. The steps:

1. Refuse a base or literal file of the wrong size (one ``fstat``: nothing read yet). With
   ``verify_base_first``, hash the whole base and refuse a mismatch before writing a byte.
2. Apply the operations in order: a copy with ``os.copy_file_range`` from the base's offset
   (reflinks where the file system shares extents; inside the kernel otherwise), falling back
   to ``pread``/``pwrite``; data from the literal file, read once in order and hashed on the
   way (the format requires that order). A worker thread writes, in windows.
3. Hash the target **as written**: each window is read back from the target right after it is
   written, while the page cache holds it and while the worker writes the next one, as
   appliance/staging.py's ``CopyingSink`` does.
   Hashing the source bytes instead would need them in Python (no kernel copy), and would
   prove what was read, not what the slot holds; the read-back proves the latter, and a base
   that changes between a check and a copy cannot slip through.
4. Compare the target's sha256 with the patch's (the manifest names it too). On a mismatch,
   say why, in this order: the literal file does not match; the base does not match (hashed
   now, unless step 1 did); else the result itself. The target is removed on every failure.

Without ``verify_base_first`` the base is read once (by the copy) and the target once (by the
hash): the target's sha256 proves every byte, copied or carried, so a base check up front
only moves the refusal earlier. A bad base still gets its own line, from step 4.

Memory is two buffers of :data:`CHUNK` (one a thread) whatever the sizes.
"""

from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Final, NoReturn

from appliance.staging import leave_signals_to_the_main_thread
from signing.errors import IntegrityError, PayloadError, StateError
from signing.patchformat import MAX_PATCH_BYTES, Op, Patch

CHUNK: Final = 1 << 20
WINDOW: Final = 8 << 20  # the kernel copies this much, then it is read back and hashed
COPY_FILE_RANGE: Final = "copy_file_range"
READ_WRITE: Final = "read/write"
# Where the kernel cannot copy between these two files (as in appliance/staging.py).
_NO_KERNEL_COPY: Final = frozenset(
    {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM, errno.ETXTBSY}
)


@dataclass(frozen=True)
class Applied:
    """A rebuilt file: its sha256 (equal to the patch's target), and how it was made."""

    sha256: str
    size: int
    copied_bytes: int
    literal_bytes: int
    mode: str


def apply_patch(
    *,
    patch: Path,
    literal: Path,
    base_files: Mapping[str, Path],
    output: Path,
    verify_base_first: bool = False,
    fsync: bool = True,
) -> Applied:
    """Rebuild ``output`` by the patch file ``patch`` (read strictly, at most
    ``MAX_PATCH_BYTES``), from the base in ``base_files`` (sha256 to path: the files of the
    installed slot) that the patch names; :func:`rebuild_file` does the rest."""
    try:
        with patch.open("rb") as stream:
            raw = stream.read(MAX_PATCH_BYTES + 1)
    except OSError as exc:
        raise StateError(f"cannot read the patch {patch}: {exc.strerror}") from None
    parsed = Patch.from_bytes(raw)
    base = base_files.get(parsed.base.sha256)
    if base is None:
        raise IntegrityError(
            f"patch {patch.name} needs a base file with sha256 {parsed.base.sha256} "
            f"({parsed.base.size} bytes); the base slot holds none"
        )
    return rebuild_file(
        parsed,
        base=base,
        literal=literal,
        target=output,
        verify_base_first=verify_base_first,
        fsync=fsync,
    )


def rebuild_file(
    patch: Patch,
    *,
    base: Path,
    literal: Path,
    target: Path,
    verify_base_first: bool = False,
    fsync: bool = True,
) -> Applied:
    """Write ``target`` (a new file) from ``base`` and ``literal`` by ``patch`` (module
    docstring); IntegrityError for a base that does not match, PayloadError for a literal
    file or result that does not match, StateError when the files cannot be read or written.
    """
    try:
        base_fd = os.open(base, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise StateError(f"cannot read the patch's base {base}: {exc.strerror}") from None
    try:
        return _apply(
            patch,
            base_fd,
            base=base,
            literal=literal,
            target=target,
            verify_base_first=verify_base_first,
            fsync=fsync,
        )
    finally:
        os.close(base_fd)


def _apply(
    patch: Patch,
    base_fd: int,
    *,
    base: Path,
    literal: Path,
    target: Path,
    verify_base_first: bool,
    fsync: bool,
) -> Applied:
    size = os.fstat(base_fd).st_size
    if size != patch.base.size:  # step 1
        raise IntegrityError(f"base {base} does not match: {size} bytes expected {patch.base.size}")
    if verify_base_first:
        _check_base(patch, base_fd, base)
    try:
        literal_fd = os.open(literal, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise StateError(f"cannot read the literal file {literal}: {exc.strerror}") from None
    try:
        if os.fstat(literal_fd).st_size != patch.literal.size:
            raise PayloadError(
                f"literal file {literal} does not match: {os.fstat(literal_fd).st_size} bytes "
                f"expected {patch.literal.size}"
            )
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            out_fd = os.open(target, flags, 0o644)
        except OSError as exc:
            raise StateError(f"cannot write {target}: {exc.strerror}") from None
        try:
            writer = _Writer(base_fd, literal_fd, out_fd)
            writer.base_checked = verify_base_first
            writer.run(patch.ops)  # step 2, and step 3 as it goes
            if fsync:
                os.fsync(out_fd)
            got = writer.target.hexdigest()
            if got != patch.target.sha256:  # step 4
                _refuse_result(patch, writer, base_fd, base=base, literal=literal, target=target)
        except BaseException as exc:
            os.close(out_fd)
            target.unlink(missing_ok=True)
            if isinstance(exc, OSError):
                raise StateError(f"cannot rebuild {target}: {exc.strerror}") from None
            raise
        os.close(out_fd)
    finally:
        os.close(literal_fd)
    return Applied(
        sha256=got,
        size=patch.target.size,
        copied_bytes=patch.copied_bytes,
        literal_bytes=patch.literal.size,
        mode=writer.mode,
    )


def _refuse_result(
    patch: Patch, writer: _Writer, base_fd: int, *, base: Path, literal: Path, target: Path
) -> NoReturn:
    """Step 4: why the target's sha256 is not the patch's, the likeliest cause first."""
    if writer.literal.hexdigest() != patch.literal.sha256:
        raise PayloadError(
            f"literal file {literal} does not match: sha256 {writer.literal.hexdigest()} "
            f"expected {patch.literal.sha256}"
        )
    if not writer.base_checked:
        _check_base(patch, base_fd, base)
    raise PayloadError(
        f"patched {target.name} does not match: sha256 {writer.target.hexdigest()} expected "
        f"{patch.target.sha256}"
    )


def _check_base(patch: Patch, base_fd: int, base: Path) -> None:
    digest = hashlib.sha256()
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    position = 0
    try:
        while got := os.preadv(base_fd, [view], position):
            digest.update(view[:got])
            position += got
    except OSError as exc:
        raise StateError(f"cannot read the patch's base {base}: {exc.strerror}") from None
    if digest.hexdigest() != patch.base.sha256 or position != patch.base.size:
        raise IntegrityError(
            f"base {base} does not match: sha256 {digest.hexdigest()} expected {patch.base.sha256}"
        )


class _Writer:
    """Writes each operation's bytes into the target at its place, and hashes them as the
    target holds them.

    The operations are cut into windows (:data:`WINDOW`); a worker thread writes window N+1
    (``copy_file_range`` runs in the kernel, and the fallback's ``pread``/``write`` release the
    GIL too) while this thread reads window N back and hashes it (hashlib releases the GIL on
    large buffers): copying and hashing overlap on two cores, as in appliance/staging.py's
    ``CopyingSink``. The worker is one thread, so the windows are written in order and the
    literal file is read in order; at most two windows are in flight.
    """

    def __init__(self, base_fd: int, literal_fd: int, out_fd: int) -> None:
        self._base = base_fd
        self._literal = literal_fd
        self._out = out_fd
        self._hash_view = memoryview(bytearray(CHUNK))  # this thread's
        self._move_view = memoryview(bytearray(CHUNK))  # the worker's
        self.mode = COPY_FILE_RANGE
        self.base_checked = False
        self.target = hashlib.sha256()
        self.literal = hashlib.sha256()

    def run(self, ops: Iterable[Op]) -> None:
        with ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix="patch-copy",
            initializer=leave_signals_to_the_main_thread,
        ) as worker:
            previous: tuple[Future[None], int, int] | None = None
            for kind, source, place, length in _windows(ops):
                job = worker.submit(self._write, kind, source, place, length)
                if previous is not None:
                    self._hash_back(*previous)
                previous = (job, place, length)
            if previous is not None:
                self._hash_back(*previous)

    def _write(self, kind: str, source: int, place: int, length: int) -> None:
        """Write one window at ``place`` of the target (on the worker thread)."""
        while length > 0:
            moved = (
                self._copy(source, place, length) if kind == "copy" else self._carry(place, length)
            )
            source += moved
            place += moved
            length -= moved

    def _copy(self, source: int, place: int, count: int) -> int:
        if self.mode == COPY_FILE_RANGE:
            try:
                moved = os.copy_file_range(self._base, self._out, count, source, place)
            except OSError as exc:
                if exc.errno not in _NO_KERNEL_COPY:
                    raise
                moved = 0
            if moved > 0:
                return moved
            # 0 is a file system that copies nothing (the base's size was checked): read.
            self.mode = READ_WRITE
        view = self._move_view[: min(count, CHUNK)]
        got = os.preadv(self._base, [view], source)
        if got == 0:
            raise OSError(errno.EIO, "the base file shrank while it was read")
        _write_all(self._out, view[:got], place)
        return got

    def _carry(self, place: int, count: int) -> int:
        """The literal file's next bytes, hashed as the literal file's too."""
        view = self._move_view[: min(count, CHUNK)]
        got = os.readv(self._literal, [view])
        if got == 0:
            raise OSError(errno.EIO, "the literal file shrank while it was read")
        self.literal.update(view[:got])
        _write_all(self._out, view[:got], place)
        return got

    def _hash_back(self, job: Future[None], place: int, length: int) -> None:
        """Wait for a window, then read it back from the target and hash it (step 3)."""
        job.result()
        end = place + length
        while place < end:
            view = self._hash_view[: min(end - place, CHUNK)]
            got = os.preadv(self._out, [view], place)
            if got == 0:
                raise OSError(errno.EIO, "the target file is shorter than what was written")
            self.target.update(view[:got])
            place += got


def _windows(ops: Iterable[Op]) -> Iterator[tuple[str, int, int, int]]:
    """Each operation as windows: (kind, offset in base or literal, place in target, length)."""
    place = 0
    for op in ops:
        for start in range(0, op.length, WINDOW):
            length = min(WINDOW, op.length - start)
            yield op.kind, op.offset + start, place, length
            place += length


def _write_all(fd: int, view: memoryview, place: int) -> None:
    while view:
        written = os.pwrite(fd, view, place)
        view = view[written:]
        place += written
