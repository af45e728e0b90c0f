"""Hash chains of canonical JSON lines: what the audit log and the request audit share.

A chained log is one canonical JSON object a line. Each record carries ``seq`` (counting on
from the record before it) and ``prev``, the sha256 of the previous line's bytes (64 zeros
before the first record), so that editing, removing or reordering any line breaks the chain
where it happened. A chain proves a record's predecessors, never its successors: a *head*
(``{"count": N, "sha256": H}``, written beside the log after each append) anchors the newest
record, so that cutting records off the end is caught too. The head may lag by exactly one
record (a crash between a record and its head), never more, and never run ahead.

Pure apart from reading a file descriptor (:func:`read_tail`): the callers own their files,
locks and crash semantics (appliance.audit, appliance.server.requestlog).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from signing.canonical import decode_canonical, is_int
from signing.errors import FormatError, IntegrityError, StateError

GENESIS: Final = "0" * 64
_READ_BACK: Final = 1 << 16


@dataclass(frozen=True)
class LastRecord:
    seq: int
    prev: str
    sha256: str


@dataclass(frozen=True)
class Tail:
    """The end of a log: its last complete record and any bytes after it."""

    last: LastRecord | None
    complete_size: int  # bytes up to and including the last newline
    torn: bytes  # bytes after the last newline: a torn append, or an attack


def digest(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


def parse_record(line: bytes, *, what: str) -> dict[str, Any]:
    """One line as a JSON object; IntegrityError naming ``what`` (e.g. "audit log line 3")."""
    try:
        value = decode_canonical(line, what=what)
    except FormatError as exc:
        raise IntegrityError(str(exc)) from None
    if not isinstance(value, dict):
        raise IntegrityError(f"{what}: not a JSON object")
    return value


def check_lines(
    lines: Iterable[tuple[int, bytes]],
    *,
    what: str,
    prev: str = GENESIS,
    seq: int = 0,
    last: LastRecord | None = None,
) -> LastRecord | None:
    """Verify numbered ``lines`` continue the chain after ``seq``/``prev``; the last record.

    ``what`` names the log in messages (``"audit log"`` gives "audit log line 3: ..."); the
    first problem is raised as IntegrityError with the line number.
    """
    for lineno, line in lines:
        record = parse_record(line, what=f"{what} line {lineno}")
        if record.get("seq") != seq + 1:
            raise IntegrityError(f"{what} line {lineno}: seq is {record.get('seq')!r}")
        if record.get("prev") != prev:
            raise IntegrityError(
                f"{what} line {lineno}: chain broken (prev does not match "
                + (f"line {lineno - 1})" if lineno > 1 else "the record before this file)")
            )
        seq += 1
        last = LastRecord(seq=seq, prev=prev, sha256=digest(line))
        prev = last.sha256
    return last


def read_head(path: Path, *, what: str) -> bytes | None:
    """The head's bytes, None when there is none; StateError naming ``what`` if unreadable."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateError(f"cannot read {what}: {exc.strerror}") from None


def head_problem(head: bytes | None, last: LastRecord | None, *, name: str) -> str | None:
    """What is wrong between the head (the file ``name``) and the log's last record, or None.

    The head may lag by exactly one record (a crash between a record and its head), which is
    proven by that record's ``prev`` naming the head's hash; it may never run ahead.
    """
    count = last.seq if last else 0
    if head is None:
        if count > 1:
            return f"has {count} records but its head ({name}) is missing"
        return None
    try:
        value = decode_canonical(head, what=name)
        anchored, sha256 = value["count"], value["sha256"]
    except (FormatError, KeyError, TypeError) as exc:
        return f"head ({name}) is damaged: {exc}"
    if not is_int(anchored) or anchored < 0:
        return f"head ({name}) is damaged: its count is not a count"
    if not isinstance(sha256, str):
        return f"head ({name}) is damaged: its sha256 is not a string"
    if last is None:
        if anchored:
            return f"is missing or empty but its head says {anchored} records: records were removed"
        return None
    if anchored > last.seq:
        return (
            f"ends at record {last.seq} but its head says {anchored}: "
            "records were removed from the end"
        )
    if anchored == last.seq and sha256 == last.sha256:
        return None
    if anchored == last.seq - 1 and sha256 == last.prev:
        return None
    return f"line {anchored}: does not match the log's head ({name})"


def read_tail(fd: int, *, what: str, max_record_bytes: int, hint: str) -> Tail:
    """The last complete line and any torn bytes after it, reading back from the end.

    A tail longer than a record can be is no torn append: IntegrityError with ``hint``.
    """
    size = os.fstat(fd).st_size
    if size == 0:
        return Tail(last=None, complete_size=0, torn=b"")
    end = size
    buffer = b""
    newline = -1
    while end > 0 and newline < 0:
        start = max(0, end - _READ_BACK)
        buffer = os.pread(fd, end - start, start) + buffer
        end = start
        newline = buffer.rfind(b"\n")
    if newline < 0:
        return Tail(last=None, complete_size=0, torn=buffer)
    complete_size = end + newline + 1
    torn = buffer[newline + 1 :]
    if len(torn) > max_record_bytes:
        raise IntegrityError(f"{what} ends in {len(torn)} bytes that are no record; {hint}")
    # The last complete line: from the newline before it (read further back if needed).
    before = buffer.rfind(b"\n", 0, newline)
    while before < 0 and end > 0:
        start = max(0, end - _READ_BACK)
        chunk = os.pread(fd, end - start, start)
        buffer, newline = chunk + buffer, newline + len(chunk)
        end = start
        before = buffer.rfind(b"\n", 0, newline)
    line = buffer[before + 1 : newline]
    record = parse_record(line, what=f"{what}'s last record")
    seq, prev = record.get("seq"), record.get("prev")
    if not is_int(seq) or not isinstance(prev, str):
        raise IntegrityError(f"{what}'s last record has no valid seq and prev; {hint}")
    last = LastRecord(seq=seq, prev=prev, sha256=digest(line))
    return Tail(last=last, complete_size=complete_size, torn=torn)
