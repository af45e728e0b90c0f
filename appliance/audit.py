"""The host's append-only, hash-chained audit log (invariant 8).

One canonical JSON object a line. Each record carries ``prev``, the sha256 of the previous
line's bytes (64 zeros for the first), and a ``seq`` counting from 1, so that editing, removing
or reordering any record breaks the chain at that point and ``appliance history --check`` says
where. Appends take their own ``flock`` so that a ``verify`` running beside an ``install``
cannot fork the chain.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, Final

from signing.canonical import decode_canonical, encode_canonical, format_time
from signing.errors import FormatError, IntegrityError

GENESIS: Final = "0" * 64
_TAIL_READ: Final = 1 << 16


class AuditLog:
    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, *, time: datetime, event: str, outcome: str, **fields: Any) -> None:
        """Append one record durably. ``fields`` must be JSON values (no floats)."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            last = _last_line(fd)
            if last is None:
                seq, prev = 1, GENESIS
            else:
                seq = int(_parse(last, lineno=0)["seq"]) + 1
                prev = hashlib.sha256(last).hexdigest()
            record = {
                "seq": seq,
                "prev": prev,
                "time": format_time(time),
                "event": event,
                "outcome": outcome,
                **{k: v for k, v in fields.items() if v is not None},
            }
            os.write(fd, encode_canonical(record) + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)

    def records(self) -> Iterator[dict[str, Any]]:
        for lineno, line in self._lines():
            yield _parse(line, lineno=lineno)

    def check(self) -> int:
        """Verify the whole chain; return the number of records or raise IntegrityError."""
        prev = GENESIS
        count = 0
        for lineno, line in self._lines():
            record = _parse(line, lineno=lineno)
            if record.get("seq") != lineno:
                raise IntegrityError(f"audit log line {lineno}: seq is {record.get('seq')!r}")
            if record.get("prev") != prev:
                raise IntegrityError(
                    f"audit log line {lineno}: chain broken (prev does not match line {lineno - 1})"
                )
            prev = hashlib.sha256(line).hexdigest()
            count += 1
        return count

    def _lines(self) -> Iterator[tuple[int, bytes]]:
        try:
            fh = self.path.open("rb")
        except FileNotFoundError:
            return
        with fh:
            for lineno, raw in enumerate(fh, start=1):
                if not raw.endswith(b"\n"):
                    raise IntegrityError(f"audit log line {lineno}: truncated record")
                yield lineno, raw[:-1]


def _last_line(fd: int) -> bytes | None:
    size = os.fstat(fd).st_size
    if size == 0:
        return None
    start = max(0, size - _TAIL_READ)
    tail = os.pread(fd, size - start, start)
    if not tail.endswith(b"\n"):
        raise IntegrityError(
            "audit log ends in a truncated record; run 'appliance history --check'"
        )
    lines = tail[:-1].rsplit(b"\n", 1)
    if len(lines) == 1 and start > 0:
        raise IntegrityError("audit log record longer than 64 KiB")
    return lines[-1]


def _parse(line: bytes, *, lineno: int) -> dict[str, Any]:
    try:
        value = decode_canonical(line, what=f"audit log line {lineno}")
    except FormatError as exc:
        raise IntegrityError(str(exc)) from None
    if not isinstance(value, dict):
        raise IntegrityError(f"audit log line {lineno}: not a JSON object")
    return value
