"""One state-changing operation per host at a time (install, rollback, trust update, gc)."""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from types import TracebackType

from signing.errors import HostBusyError, StateError


class HostLock:
    """An exclusive, non-blocking ``flock`` on ``DIR/lock``, released by the kernel on exit.

    ``flock`` rather than a pid file: a process killed with SIGKILL releases it, so a crash
    never leaves the host locked.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._fd: int | None = None

    def __enter__(self) -> HostLock:
        try:
            fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise StateError(f"cannot take the host lock {self._path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise HostBusyError(
                f"another appliance operation is running (pid {holder}); try again later"
            ) from None
        with contextlib.suppress(OSError):  # the pid is a hint for the message above; a full
            os.ftruncate(fd, 0)  # disk must not stop the operation that may free it
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)
            self._fd = None
