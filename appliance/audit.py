"""The host's append-only, hash-chained audit log (invariant 8).

One canonical JSON object a line. Each record carries ``prev``, the sha256 of the previous
line's bytes (64 zeros for the first), and a ``seq`` counting from 1, so that editing, removing
or reordering any record breaks the chain at that point and ``appliance history --check`` says
where. Each record proves its predecessors, not its successors, so ``audit.head`` (written
atomically after every append) anchors the count and hash of the last record: removing or
editing the newest records is caught too. A crash between the append and the head update
leaves the head one record behind, which ``check`` accepts (and the next append repairs).
Appends take their own ``flock`` so that a ``verify`` running beside an ``install`` cannot fork
the chain.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, Final

from appliance.fsutil import atomic_write
from signing.canonical import decode_canonical, encode_canonical, format_time
from signing.errors import FormatError, IntegrityError

GENESIS: Final = "0" * 64
_TAIL_READ: Final = 1 << 16


class AuditLog:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.head_path = path.with_name(path.stem + ".head")

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
            line = encode_canonical(record)
            os.write(fd, line + b"\n")
            os.fsync(fd)
            head = {"count": seq, "sha256": hashlib.sha256(line).hexdigest()}
            atomic_write(self.head_path, encode_canonical(head), mode=0o640)
        finally:
            os.close(fd)

    def records(self) -> Iterator[dict[str, Any]]:
        for lineno, line in self._lines():
            yield _parse(line, lineno=lineno)

    def check(self) -> int:
        """Verify the whole chain; return the number of records or raise IntegrityError."""
        prev = GENESIS
        count = 0
        hashes: list[str] = []
        for lineno, line in self._lines():
            record = _parse(line, lineno=lineno)
            if record.get("seq") != lineno:
                raise IntegrityError(f"audit log line {lineno}: seq is {record.get('seq')!r}")
            if record.get("prev") != prev:
                raise IntegrityError(
                    f"audit log line {lineno}: chain broken (prev does not match line {lineno - 1})"
                )
            prev = hashlib.sha256(line).hexdigest()
            hashes.append(prev)
            count += 1
        self._check_head(hashes)
        return count

    def _check_head(self, hashes: list[str]) -> None:
        try:
            head = decode_canonical(self.head_path.read_bytes(), what="audit head")
            count, digest = int(head["count"]), str(head["sha256"])
        except FileNotFoundError:
            if hashes:
                raise IntegrityError("audit log head (audit.head) is missing") from None
            return
        except (FormatError, KeyError, TypeError, ValueError) as exc:
            raise IntegrityError(f"audit log head is damaged: {exc}") from None
        # The head may lag by one record (a crash between append and head update), never more,
        # and never run ahead of the log (records removed from the end).
        if count > len(hashes):
            raise IntegrityError(
                f"audit log ends at record {len(hashes)} but its head says {count}: "
                "records were removed from the end"
            )
        if count < len(hashes) - 1 or (count and hashes[count - 1] != digest):
            raise IntegrityError(
                f"audit log line {count}: does not match the log's head (audit.head)"
            )

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
