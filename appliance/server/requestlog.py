"""The request audit: one hash-chained record per request, the same bytes to every sink.

Distinct from the host's audit log (``audit.jsonl``, what happened to the host), this trail
says who asked which model what, and how it went: time, key, model, route, tokens in and out,
latency, status. Prompt and response text only with ``log_prompts``, and then masked
(appliance.server.masking): the record is masked before it is encoded, so every sink gets the
same masked line.

The chain is the audit log's (appliance.chain): ``seq`` and ``prev`` in every record, and a
head (``requests.head``) anchoring the newest one, so that editing, removing or reordering a
line is found by ``appliance requests --check`` with its line number. A record is one
``write`` on an ``O_APPEND`` descriptor and the head is rewritten after it (no fsync: this is
the hot path of every request; a kill loses nothing, a power loss may lose the newest records,
which the check then reports like a cut, and ``serve`` refuses to extend). One ``serve`` at a
time: the head is locked while the log is open.

Rotation keeps the chain: when the log would pass ``max_bytes`` it is renamed to
``requests.NNNNNN.jsonl`` (numbered up from 1) and the new file's first record goes on from
the last one of the old file (``seq`` + 1, ``prev`` its hash), so the files check as one
chain. The oldest rotated files may be archived or removed; the check then starts from the
oldest one left and says so.

Sinks: the file (default), standard output, syslog (``/dev/log``: journald takes it too).
Without the file sink the chain lives in memory, from the genesis hash at each start.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import logging.handlers
import math
import os
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final, Protocol

from appliance import chain
from appliance.chain import GENESIS, LastRecord, Tail
from appliance.fsutil import atomic_write
from signing.bounded import clip
from signing.canonical import encode_canonical
from signing.errors import FormatError, InputError, IntegrityError, StateError

log = logging.getLogger(__name__)

SINKS: Final = ("file", "stdout", "syslog")
DEFAULT_MAX_BYTES: Final = 64 * 1024 * 1024
MAX_RECORD_BYTES: Final = 256 * 1024
MAX_TEXT: Final = 16 * 1024  # characters of a prompt or response kept in a record
HINT: Final = (
    "run 'appliance requests --check' to see what is wrong; move the log files and the head "
    "aside (they are evidence) to start a new chain"
)
_ROTATED: Final = re.compile(r"\.(\d{6})\.jsonl\Z")


class Sink(Protocol):
    def emit(self, line: bytes) -> None: ...

    def close(self) -> None: ...


class StdoutSink:
    def emit(self, line: bytes) -> None:
        sys.stdout.buffer.write(line + b"\n")
        sys.stdout.buffer.flush()

    def close(self) -> None:
        pass


class SyslogSink:
    """The record as a syslog message (facility local0, priority info) to a UNIX socket."""

    def __init__(self, address: Path) -> None:
        if not address.exists():
            raise InputError(f"request log sink syslog: {address} does not exist")
        try:
            self.handler = logging.handlers.SysLogHandler(
                address=str(address), facility=logging.handlers.SysLogHandler.LOG_LOCAL0
            )
        except OSError as exc:
            raise InputError(f"request log sink syslog: {address}: {exc.strerror}") from None
        self.handler.ident = "appliance-requests: "

    def emit(self, line: bytes) -> None:
        record = logging.LogRecord(
            "appliance.requests", logging.INFO, __file__, 0, line.decode("utf-8"), None, None
        )
        self.handler.emit(record)

    def close(self) -> None:
        self.handler.close()


def parse_sinks(value: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(n.strip() for n in value.split(",") if n.strip()))
    unknown = [n for n in names if n not in SINKS]
    if unknown or not names:
        raise ValueError(f"request log sinks are a comma-separated subset of {', '.join(SINKS)}")
    return names


@dataclass(frozen=True)
class LogFiles:
    """Where the chain lives: the current file, its head and its rotated predecessors."""

    path: Path

    @property
    def head(self) -> Path:
        return self.path.with_name(self.path.stem + ".head")

    def rotated(self) -> list[Path]:
        """Rotated files, oldest first."""
        found = []
        with contextlib.suppress(FileNotFoundError):
            for entry in self.path.parent.iterdir():
                match = _ROTATED.search(entry.name)
                if match and entry.name == f"{self.path.stem}.{match.group(1)}.jsonl":
                    found.append((int(match.group(1)), entry))
        return [p for _, p in sorted(found)]

    def next_rotated(self) -> Path:
        rotated = self.rotated()
        match = _ROTATED.search(rotated[-1].name) if rotated else None
        number = int(match.group(1)) + 1 if match else 1
        return self.path.with_name(f"{self.path.stem}.{number:06d}.jsonl")

    def read_head(self) -> bytes | None:
        """The head; None when missing or empty (opened by a server that wrote nothing yet)."""
        return chain.read_head(self.head, what="the request log head") or None


class RequestLog:
    """Appends chained records to the file and every other sink (see the module docstring)."""

    def __init__(
        self,
        path: Path,
        *,
        sinks: Sequence[str] = ("file",),
        max_bytes: int = DEFAULT_MAX_BYTES,
        syslog_address: Path = Path("/dev/log"),
    ) -> None:
        self.files = LogFiles(path)
        self.path = path
        self.sink_names = tuple(sinks)
        self.max_bytes = max_bytes
        self.syslog_address = syslog_address
        self._fd: int | None = None
        self._head_fd: int | None = None
        self._size = 0
        self._last: LastRecord | None = None
        self._sinks: list[Sink] = []
        self._open = False

    def open(self) -> None:
        """Open the sinks; find where the chain goes on (StateError/IntegrityError if it
        cannot: a head that disagrees with the log refuses the start, see HINT)."""
        if "file" in self.sink_names:
            self._open_file()
        if "stdout" in self.sink_names:
            self._sinks.append(StdoutSink())
        if "syslog" in self.sink_names:
            self._sinks.append(SyslogSink(self.syslog_address))
        self._open = True

    def preflight(self) -> None:
        """Raise IntegrityError if :meth:`open` would refuse for tampering; reads only, so that
        ``serve`` can refuse with one line before it binds a port or loads a model."""
        if "file" not in self.sink_names:
            return
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            self._tail_and_head(None)
            return
        except OSError as exc:
            raise StateError(f"cannot read request log {self.path}: {exc.strerror}") from None
        try:
            self._tail_and_head(fd)
        finally:
            os.close(fd)

    def _tail_and_head(self, fd: int | None) -> tuple[Tail, LastRecord | None]:
        """The current file's tail and the chain's last record, checked against the head."""
        tail = Tail(last=None, complete_size=0, torn=b"")
        if fd is not None:
            what = f"request log {self.path}"
            tail = chain.read_tail(fd, what=what, max_record_bytes=MAX_RECORD_BYTES, hint=HINT)
        last = tail.last or self._last_rotated()
        problem = chain.head_problem(self.files.read_head(), last, name=self.files.head.name)
        if problem is not None:
            raise IntegrityError(f"request log {self.path} {problem}; {HINT}")
        return tail, last

    def _open_file(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # 0600: with log_prompts on, the log holds what users asked (masked).
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StateError(f"cannot open request log {self.path}: {exc.strerror}") from None
        try:
            tail, last = self._tail_and_head(fd)
            if tail.torn:
                # An append cut by a crash: kept aside, never silently dropped.
                digest = hashlib.sha256(tail.torn).hexdigest()[:12]
                kept = self.path.with_name(f"{self.path.stem}.torn-{digest}")
                atomic_write(kept, tail.torn, mode=0o600)
                os.ftruncate(fd, tail.complete_size)
            # Rewritten in place with one pwrite per record: its count only grows, so the new
            # bytes always cover the old ones.
            head_fd = os.open(self.files.head, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except BaseException:
            os.close(fd)
            raise
        try:
            fcntl.flock(head_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(head_fd)
            os.close(fd)
            raise StateError(
                f"request log {self.path} is in use by another 'serve': give each its own "
                "request_log"
            ) from None
        self._fd, self._head_fd, self._size, self._last = fd, head_fd, tail.complete_size, last

    def _last_rotated(self) -> LastRecord | None:
        rotated = self.files.rotated()
        if not rotated:
            return None
        fd = os.open(rotated[-1], os.O_RDONLY | os.O_CLOEXEC)
        try:
            what = f"request log {rotated[-1]}"
            return chain.read_tail(fd, what=what, max_record_bytes=MAX_RECORD_BYTES, hint=HINT).last
        finally:
            os.close(fd)

    def write(self, entry: dict[str, Any]) -> None:
        """Append ``entry`` (masked already) as the chain's next record, to every sink."""
        if not self._open:
            return
        seq, prev = (self._last.seq + 1, self._last.sha256) if self._last else (1, GENESIS)
        line = encode_record({"seq": seq, "prev": prev, **entry})
        if self._fd is not None:
            self._append(self._fd, line)
        self._last = LastRecord(seq=seq, prev=prev, sha256=chain.digest(line))
        if self._head_fd is not None:
            head = encode_canonical({"count": seq, "sha256": self._last.sha256})
            os.pwrite(self._head_fd, head, 0)
        for sink in self._sinks:
            try:
                sink.emit(line)
            except OSError as exc:  # a full pipe or a gone syslog: the file still has it
                log.warning("request log sink %s: %s", type(sink).__name__, exc.strerror)

    def _append(self, fd: int, line: bytes) -> None:
        if self._size and self._size + len(line) + 1 > self.max_bytes:
            fd = self._rotate(fd)
        written = os.write(fd, line + b"\n")
        if written != len(line) + 1:
            os.ftruncate(fd, self._size)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._size += written

    def _rotate(self, fd: int) -> int:
        """Rename the full log aside and open a new one; the next record anchors to it."""
        self.path.rename(self.files.next_rotated())
        os.close(fd)
        self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._size = 0
        return self._fd

    def recent_usage(
        self, window_s: float, *, now: datetime | None = None
    ) -> list[tuple[str, float, int]]:
        """``(key name, seconds since the request ended, tokens)`` for the requests of the file
        sink's chain that ended within ``window_s`` of ``now``, summed by key and minute: what
        the key limiter charges again at a start (appliance.server.ratelimit). Empty without
        the file sink. Newest file first, back to the first one that begins before the
        window. A line that does not parse is passed over: checking the chain is ``appliance
        requests --check``'s job, and :meth:`open` has refused a tampered tail already."""
        if "file" not in self.sink_names:
            return []
        now = now or datetime.now(UTC)
        minutes: dict[tuple[str, int], int] = {}
        for path in [self.path, *reversed(self.files.rotated())]:
            first_age = _usage_in(path, now, window_s, minutes)
            if first_age is not None and first_age >= window_s:
                break
        return [(key, minute * 60.0, tokens) for (key, minute), tokens in minutes.items()]

    def close(self) -> None:
        for fd in (self._fd, self._head_fd):
            if fd is not None:
                os.close(fd)
        self._fd = self._head_fd = None
        for sink in self._sinks:
            sink.close()
        self._sinks.clear()
        self._open = False


def _usage_in(
    path: Path, now: datetime, window_s: float, minutes: dict[tuple[str, int], int]
) -> float | None:
    """Add the tokens of ``path``'s records that ended within ``window_s`` of ``now`` to
    ``minutes`` (by key and whole minutes since the end); return the age of the file's first
    record (None: no file, or no record with a time)."""
    first_age: float | None = None
    try:
        source = path.open("rb")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateError(f"cannot read request log {path}: {exc.strerror}") from None
    with source:
        for line in source:
            try:
                record = json.loads(line)
                ended = datetime.fromisoformat(record["time"]) + timedelta(
                    milliseconds=record.get("latency_ms") or 0
                )
                age = max((now - ended).total_seconds(), 0.0)  # from the future: now
                key = record["key"]
                tokens = int(record.get("prompt_tokens") or 0) + int(
                    record.get("completion_tokens") or 0
                )
            except (ValueError, KeyError, TypeError, AttributeError):
                continue
            if first_age is None:
                first_age = age
            if age < window_s and isinstance(key, str) and tokens > 0:
                slot = (key, int(age // 60))
                minutes[slot] = minutes.get(slot, 0) + tokens
    return first_age


def encode_record(record: dict[str, Any]) -> bytes:
    """Canonical JSON of a record: texts clipped, floats as strings (canonical JSON has none)
    except the latency, in whole milliseconds rounded up."""
    latency = record.get("latency_ms")
    if isinstance(latency, float):
        record = {**record, "latency_ms": math.ceil(latency)}
    try:
        line = encode_canonical(_plain(record))
        if len(line) <= MAX_RECORD_BYTES:
            return line
        dropped = "the record was too large"
    except FormatError as exc:  # e.g. messages nested deeper than canonical JSON allows
        dropped = str(exc)
    slim = {k: v for k, v in record.items() if k not in ("prompt", "response")}
    slim["text_dropped"] = clip(dropped, 200)
    return encode_canonical(_plain(slim))


def _plain(value: Any) -> Any:
    if isinstance(value, float):
        return str(value)
    if isinstance(value, str):
        return clip(value, MAX_TEXT)
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


# -- checking ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckReport:
    files: int
    records: int
    first_seq: int  # > 1 when older rotated files were archived or removed


def check_log(path: Path) -> CheckReport:
    """Verify the chain across the rotated files and the current one, and the head.

    Raises IntegrityError naming the file and the line of the first problem.
    """
    files = LogFiles(path)
    paths = [*files.rotated(), path]
    last: LastRecord | None = None
    first_seq = 0
    count = 0
    for index, current in enumerate(paths):
        lines = list(_lines(current))
        if index == 0 and lines:
            first = chain.parse_record(lines[0][1], what=f"request log {current.name} line 1")
            seq, prev = first.get("seq"), first.get("prev")
            if not isinstance(seq, int) or not isinstance(prev, str):
                raise IntegrityError(f"request log {current.name} line 1: no valid seq and prev")
            # The oldest file left: its anchor is taken as given (older files were archived).
            last = LastRecord(seq=seq - 1, prev="", sha256=prev) if seq > 1 else None
            first_seq = seq
        last = chain.check_lines(
            lines,
            what=f"request log {current.name}",
            prev=last.sha256 if last else GENESIS,
            seq=last.seq if last else 0,
            last=last,
        )
        count += len(lines)
    problem = chain.head_problem(files.read_head(), last, name=files.head.name)
    if problem is not None:
        raise IntegrityError(f"request log {path.name} {problem}")
    return CheckReport(files=len(paths), records=count, first_seq=max(first_seq, 1))


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    try:
        fh = path.open("rb")
    except FileNotFoundError:
        return
    except OSError as exc:
        raise StateError(f"cannot read the request log {path}: {exc.strerror}") from None
    with fh:
        for lineno, raw in enumerate(fh, start=1):
            if not raw.endswith(b"\n"):
                raise IntegrityError(f"request log {path.name} line {lineno}: truncated record")
            yield lineno, raw[:-1]
