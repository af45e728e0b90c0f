"""SIGTERM as an exception while an operation runs, so that it ends the way Ctrl-C does.

With SIGTERM at its default, ``systemctl stop`` or ``kill`` ends the process at once: no audit
record, a staging slot left for the next run, and a health-check child orphaned. Raised as
:class:`Terminated` instead, the signal unwinds the stack like ``KeyboardInterrupt``: the audit
record says what happened, ``subprocess.run`` kills its child, staging is removed, and the CLI
exits 143 (128 + SIGTERM).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType


class Terminated(BaseException):
    """The process received SIGTERM. A BaseException, so that ``except Exception`` in library
    code does not swallow it."""


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
