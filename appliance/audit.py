"""The host's append-only, hash-chained audit log (invariant 8).

One canonical JSON object a line. Each record carries ``prev``, the sha256 of the previous
line's bytes (64 zeros for the first), and a ``seq`` counting from 1, so that editing, removing
or reordering any record breaks the chain at that point and ``appliance history --check`` says
where. Each record proves its predecessors, not its successors, so ``audit.head`` (written
atomically after every append) anchors the count and hash of the last record: removing or
editing the newest records is caught too.

The log stays true and usable under any input and fault (docs/adr/0010-audit-log-faults.md):

- **Bounded records.** Every string in a record is cut at ``MAX_TEXT`` characters and every
  list at ``MAX_ITEMS`` items, with a "… N more" tail (signing.bounded's marks); a record
  that is still over ``MAX_RECORD_BYTES`` keeps only its core fields. No input can write a
  record that a later append cannot read back.
- **Whole or nothing.** A record is written with one ``write`` and fsynced, then the head is
  replaced. A short or failed write, or a head that cannot be written, truncates the log back
  to its size before the append and raises :class:`StateError` (exit 5): the append did not
  happen, and the host is as it was. A reserve file (``audit.reserve``) holds space for the
  log: a write that finds the disk full releases it and tries once more, so the record of what
  happened still lands when the operation itself filled the disk.
- **Torn tails are recovered, tampering is not.** kill -9 inside ``write`` can leave bytes
  after the last newline. Such a fragment is a torn tail, not tampering, when the head still
  anchors the last *complete* record (the head is replaced only after the record is fsynced,
  so an anchored record is never torn) and the fragment is shorter than a record can be. The
  next append moves the fragment to ``audit.torn-<seq>-<sha>`` and writes a ``recovered``
  record naming its hash and size before its own.
- **Tamper evidence is never overwritten.** Before extending the chain an append checks the
  head against the last record (constant time: the head may lag by one record after a crash
  between the record and the head, never more). A missing, damaged or disagreeing head, or a
  log cut behind its head, refuses the append with the repair command
  (``appliance repair --reanchor-audit-log``, itself audited), instead of rewriting the head.
  A record edited in the middle breaks the chain where it is; appending does not hide that,
  and ``history --check`` still finds it.

Appends take their own ``flock`` so that a ``verify`` running beside an ``install`` cannot fork
the chain.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, Final

from appliance import chain
from appliance.chain import GENESIS, LastRecord, Tail, check_lines
from appliance.fsutil import TMP_PREFIX, atomic_write, fsync_dir
from appliance.limits import HOST_LIMITS
from signing.bounded import ELLIPSIS, clip
from signing.canonical import encode_canonical, format_time
from signing.errors import IntegrityError, StateError

# The bounds of invariant 8, from the host's one config of limits.
MAX_TEXT: Final = HOST_LIMITS.audit_max_text
MAX_ITEMS: Final = HOST_LIMITS.audit_max_items
MAX_RECORD_BYTES: Final = HOST_LIMITS.audit_max_record_bytes
RESERVE_BYTES: Final = HOST_LIMITS.audit_reserve_bytes
REPAIR_HINT: Final = (
    "run 'appliance history --check' to see what is wrong, then "
    "'appliance repair --reanchor-audit-log' (audited) to start a new chain beside the old one"
)
_CORE_FIELDS: Final = ("seq", "prev", "time", "event", "outcome", "error")
_HEAD_NAME: Final = "audit.head"
_DISK_FULL: Final = frozenset({errno.ENOSPC, errno.EDQUOT})


class AuditLog:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.head_path = path.with_name(path.stem + ".head")
        self.reserve_path = path.with_name(path.stem + ".reserve")

    # -- appending ----------------------------------------------------------------------

    def append(self, *, time: datetime, event: str, outcome: str, **fields: Any) -> None:
        """Append one record durably, or nothing (see the module docstring).

        ``fields`` must be JSON values (no floats); they are bounded here. Raises
        :class:`IntegrityError` (exit 6) when the log's head shows tampering, and
        :class:`StateError` (exit 5) when the record cannot be written.
        """
        if not self.path.exists():
            # Before O_CREAT: a log removed behind its head must stay removed (the head check
            # under the lock below covers a log that exists).
            self.ensure_appendable()
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
        except OSError as exc:
            raise StateError(f"cannot open the audit log {self.path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            tail = read_tail(fd)
            problem = head_problem(self._read_head(), tail.last)
            if problem is not None:
                raise IntegrityError(f"audit log {problem}; nothing was appended: {REPAIR_HINT}")
            last = tail.last
            if tail.torn:
                last = self._quarantine(fd, tail, time=time)
            record = {
                "time": format_time(time),
                "event": event,
                "outcome": outcome,
                **{k: bounded(v) for k, v in fields.items() if v is not None},
            }
            self._write(fd, last, record)
        finally:
            os.close(fd)
        self._keep_reserve()

    def ensure_appendable(self) -> None:
        """Raise IntegrityError if an append would be refused for tampering (constant time).

        Operations call this before they change anything, so that a host whose log shows
        tampering refuses the operation itself, not only its record.
        """
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            last = None
        except OSError as exc:
            raise StateError(f"cannot read the audit log {self.path}: {exc.strerror}") from None
        else:
            try:
                last = read_tail(fd).last
            finally:
                os.close(fd)
        problem = head_problem(self._read_head(), last)
        if problem is not None:
            raise IntegrityError(f"audit log {problem}; nothing was done: {REPAIR_HINT}")

    def _quarantine(self, fd: int, tail: Tail, *, time: datetime) -> LastRecord | None:
        """Move a torn tail aside and record that it was found; return the new last record."""
        digest = hashlib.sha256(tail.torn).hexdigest()
        seq = tail.last.seq + 1 if tail.last else 1
        kept = self.path.with_name(f"{self.path.stem}.torn-{seq}-{digest[:12]}")
        self._retrying_on_full_disk(lambda: atomic_write(kept, tail.torn, mode=0o640))
        os.ftruncate(fd, tail.complete_size)
        os.fsync(fd)
        record = {
            "time": format_time(time),
            "event": "audit",
            "outcome": "recovered",
            "torn_bytes": len(tail.torn),
            "torn_sha256": digest,
            "kept_in": kept.name,
            "error": "an interrupted append left a partial record after the last one; "
            "it was moved aside",
        }
        return self._write(fd, tail.last, record)

    def _write(self, fd: int, last: LastRecord | None, fields: dict[str, Any]) -> LastRecord:
        seq, prev = (last.seq + 1, last.sha256) if last else (1, GENESIS)
        line = _encode_bounded({"seq": seq, "prev": prev, **fields})
        size = os.fstat(fd).st_size

        def write_record() -> None:
            try:
                written = os.write(fd, line + b"\n")
                os.fsync(fd)
            except OSError:
                os.ftruncate(fd, size)  # the torn bytes go; the append did not happen
                raise
            if written != len(line) + 1:  # a short write: the disk filled within the record
                os.ftruncate(fd, size)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        self._retrying_on_full_disk(write_record)
        digest = hashlib.sha256(line).hexdigest()
        head = encode_canonical({"count": seq, "sha256": digest})
        try:
            self._retrying_on_full_disk(lambda: atomic_write(self.head_path, head, mode=0o640))
        except StateError:
            # The record may not outlive a head that does not anchor it: the head may lag by
            # one record (a crash here), never by more (a second failure here).
            os.ftruncate(fd, size)
            os.fsync(fd)
            raise
        return LastRecord(seq=seq, prev=prev, sha256=digest)

    def _retrying_on_full_disk(self, write: Callable[[], None]) -> None:
        """Run ``write``; on a full disk release the reserve and run it once more."""
        try:
            write()
            return
        except OSError as exc:
            if exc.errno not in _DISK_FULL or not self.reserve_path.exists():
                raise StateError(
                    f"cannot write the audit log {self.path}: {exc.strerror}"
                ) from None
        self.reserve_path.unlink()
        try:
            write()
        except OSError as exc:
            raise StateError(f"cannot write the audit log {self.path}: {exc.strerror}") from None

    def _keep_reserve(self) -> None:
        """Hold ``RESERVE_BYTES`` of real blocks for the log's next appends (best effort)."""
        if self.reserve_path.exists():
            return
        tmp = self.reserve_path.with_name(TMP_PREFIX + self.reserve_path.name)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.posix_fallocate(fd, 0, RESERVE_BYTES)
                os.fsync(fd)
            finally:
                os.close(fd)
            tmp.replace(self.reserve_path)
            fsync_dir(self.reserve_path.parent)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()

    def reanchor(self, *, time: datetime, problem: str) -> str:
        """Set a damaged log aside and start a new chain whose first record names it.

        The operator's answer to a log that refuses appends (``appliance repair
        --reanchor-audit-log``). Nothing is deleted: the old log and head are renamed to
        ``audit.<time>.damaged.jsonl`` / ``.head``, and the new chain's first record carries
        the old log's sha256 and size and what was wrong with it, so the evidence stays
        checkable and the break itself is on record. Returns the old log's new name.
        """
        stamp = format_time(time).replace("-", "").replace(":", "")
        kept = self.path.with_name(f"{self.path.stem}.{stamp}.damaged{self.path.suffix}")
        digest, size = hashlib.sha256(), 0
        try:
            with self.path.open("rb") as fh:
                while chunk := fh.read(1 << 20):
                    digest.update(chunk)
                    size += len(chunk)
            self.path.rename(kept)
        except FileNotFoundError:
            pass
        if self.head_path.exists():
            self.head_path.rename(kept.with_suffix(".head"))
        fsync_dir(self.path.parent)
        self.append(
            time=time,
            event="audit",
            outcome="reanchored",
            previous_log=kept.name,
            previous_log_sha256=digest.hexdigest(),
            previous_log_bytes=size,
            error=problem,
        )
        return kept.name

    # -- reading ------------------------------------------------------------------------

    def records(self) -> Iterator[dict[str, Any]]:
        for lineno, line in self._lines():
            yield _parse(line, lineno=lineno)

    def check(self) -> int:
        """Verify the whole chain and its head; return the number of records.

        Raises IntegrityError naming the first problem. A torn tail that the next append will
        recover (see :meth:`torn_tail`) is not a problem of the chain.
        """
        last = check_lines(self._lines(), what="audit log")
        problem = head_problem(self._read_head(), last)
        if problem is not None:
            raise IntegrityError(f"audit log {problem}")
        return last.seq if last else 0

    def torn_tail(self) -> int:
        """Bytes after the last complete record (0 when none)."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return 0
        try:
            return len(read_tail(fd).torn)
        finally:
            os.close(fd)

    def _read_head(self) -> bytes | None:
        return chain.read_head(self.head_path, what="the audit log head")

    def _lines(self) -> Iterator[tuple[int, bytes]]:
        try:
            fh = self.path.open("rb")
        except FileNotFoundError:
            return
        with fh:
            for lineno, raw in enumerate(fh, start=1):
                if not raw.endswith(b"\n"):
                    if len(raw) > MAX_RECORD_BYTES:
                        raise IntegrityError(f"audit log line {lineno}: truncated record")
                    return  # a torn tail: the head decides whether it is one (head_problem)
                yield lineno, raw[:-1]


def head_problem(head: bytes | None, last: LastRecord | None) -> str | None:
    """What is wrong between audit.head and the log's last complete record, or None."""
    return chain.head_problem(head, last, name=_HEAD_NAME)


def read_tail(fd: int) -> Tail:
    """The last complete line and any torn bytes after it, reading back from the end."""
    return chain.read_tail(
        fd, what="audit log", max_record_bytes=MAX_RECORD_BYTES, hint=REPAIR_HINT
    )


def bounded(value: Any) -> Any:
    """``value`` with every string cut at MAX_TEXT characters and every list at MAX_ITEMS."""
    if isinstance(value, str):
        return clip(value, MAX_TEXT)
    if isinstance(value, list | tuple):
        items = [bounded(v) for v in value[:MAX_ITEMS]]
        if len(value) > MAX_ITEMS:
            items.append(f"{ELLIPSIS} {len(value) - MAX_ITEMS} more")
        return items
    if isinstance(value, dict):
        keys = list(value)[:MAX_ITEMS]
        out = {clip(str(k), MAX_TEXT): bounded(value[k]) for k in keys}
        if len(value) > MAX_ITEMS:
            out[ELLIPSIS] = f"{len(value) - MAX_ITEMS} more"
        return out
    return value


def _encode_bounded(record: dict[str, Any]) -> bytes:
    line = encode_canonical(record)
    if len(line) <= MAX_RECORD_BYTES:
        return line
    core: dict[str, Any] = {k: record[k] for k in _CORE_FIELDS if k in record}
    core["truncated_fields"] = sorted(k for k in record if k not in core)[:MAX_ITEMS]
    return encode_canonical(core)


def _parse(line: bytes, *, lineno: int) -> dict[str, Any]:
    return chain.parse_record(line, what=f"audit log line {lineno}")
