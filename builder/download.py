"""One download of a locked artifact into the cache: retries, resumption, a byte bound, and the
hash that decides (docs/adr/0007-package-environments.md, "Fetch").

:class:`Downloader` fetches one :class:`~builder.artifacts.Artifact` at a time (builder.fetch
runs several on a thread pool, sharing one ``httpx.Client``). A download streams into the
artifact's partial file under the cache's ``tmp/`` while it is hashed, and enters the cache
(builder.cache) only when its sha256 equals the lock's. Otherwise
:class:`~signing.errors.ArtifactError` names the package and both hashes, and nothing is left
behind: no partial file, no cache entry.

Transfers (``http://``, ``https://``; ``file://`` is copied):

- Bounded: a transfer stops at the lock's ``size`` when the lock gives one, else at
  :attr:`DownloadOptions.max_bytes`, as python-tuf's ``download_file(url, max_length)`` does. A
  server that announces more (``Content-Length``, ``Content-Range``) is refused before its body
  is read; one that sends more is cut off at the first byte over. Either is an
  :class:`~signing.errors.ArtifactError` (over the lock's size: not the locked file) or a
  :class:`~signing.errors.FetchError` (over the maximum) naming the URL and both sizes.
- Transient failures are retried with exponential backoff (``backoff * 2**n`` seconds, or the
  server's ``Retry-After`` when longer, at most :data:`MAX_BACKOFF_S`): connection errors and
  timeouts, a connection cut mid-body, HTTP 5xx, 408 and 429. ``retries`` counts the retries
  after the first try; a try that delivered body bytes resets that count (a flaky server that
  makes progress is followed to the end, up to :data:`MAX_REQUESTS` requests per file). Any
  other status (404, 403, 401, 410, ...) fails at once: :class:`~signing.errors.FetchError`
  names the URL and the status.
- An interrupted transfer resumes with ``Range: bytes=<have>-`` from the bytes already in the
  partial file, within a run and across runs (a killed build leaves its partial file, locked
  with ``flock`` while in use so that two builders sharing a cache do not write the same one).
  A server that ignores ``Range`` (answers 200) restarts the file from its first byte.
- Corrupt data: when the bytes came from one response, a sha256 mismatch fails at once (the
  usual causes, a wrong lock or a tampered mirror, do not go away by downloading gigabytes
  again; TCP and TLS already catch transit errors). When they were assembled from more than
  one response (a resumed transfer, a partial file left by an earlier run), the file is
  downloaded once more from scratch, in one response, before the mismatch is reported: a stale
  partial file or a server whose file changed between the pieces must not fail the build.
- Cancellation (another download failed, or Ctrl-C) is checked between the chunks of a body as
  they arrive, during backoff, and before a file enters the cache; a read blocked on a silent
  server waits for its ``timeout``. A cancelled download removes its partial file and raises
  :class:`Cancelled`, which builder.fetch never shows.

Content is requested with ``Accept-Encoding: identity`` and read raw: the bytes hashed are the
bytes the server stores, never a decoded form of them.
"""

from __future__ import annotations

import contextlib
import email.utils
import fcntl
import hashlib
import io
import os
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Protocol
from urllib.parse import unquote, urlsplit
from urllib.request import url2pathname

import httpx

from builder.artifacts import Artifact, describe
from builder.cache import Cache
from signing.errors import AirgapError, ArtifactError, FetchError

DEFAULT_RETRIES: Final = 3
DEFAULT_BACKOFF_S: Final = 0.5
DEFAULT_MAX_BYTES: Final = 16 << 30  # for a file whose lock gives no size: 16 GiB
MAX_BACKOFF_S: Final = 30.0
MAX_REQUESTS: Final = 64  # per file, however much progress each one made
CHUNK_SIZE: Final = 1 << 20  # file:// copies
RETRY_STATUSES: Final = frozenset({408, 429})  # and every 5xx

_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class Meter(Protocol):
    """Where a download reports its progress (builder.fetch shows it, or not)."""

    def start(self, artifact: Artifact, total: int | None) -> int: ...
    def cached(self, size: int) -> None: ...
    def total(self, task: int, total: int) -> None: ...
    def advance(self, task: int, n: int) -> None: ...
    def finish(self, task: int) -> None: ...


class Cancelled(Exception):  # noqa: N818 - a signal between threads, never shown
    """Another download failed (or Ctrl-C): stop, clean up, return nothing."""


class _Retry(Exception):  # noqa: N818 - control flow inside one download
    """A transient failure: try again after backoff (``reason`` says what happened)."""

    def __init__(self, reason: str, *, after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.after = after


class _Restart(Exception):  # noqa: N818 - control flow inside one download
    """Discard the partial bytes and download from the first byte (not a failed try)."""


@dataclass(frozen=True)
class DownloadOptions:
    """The limits of one download (builder.fetch.fetch_all takes them as arguments)."""

    retries: int = DEFAULT_RETRIES
    backoff: float = DEFAULT_BACKOFF_S
    max_bytes: int = DEFAULT_MAX_BYTES  # the bound when the lock gives no size


@dataclass
class _Partial:
    """The partial file of one download and the hash of the bytes in it."""

    fh: io.BufferedRandom
    have: int = 0
    pieces: int = 0  # responses that contributed bytes
    stale: bool = False  # holds bytes an earlier run left
    hasher: hashlib._Hash = field(default_factory=hashlib.sha256)

    @property
    def spliced(self) -> bool:
        """Whether the bytes came from more than one response, or partly from an earlier run."""
        return self.pieces > 1 or self.stale

    def reset(self) -> None:
        self.fh.seek(0)
        self.fh.truncate()
        self.have = 0
        self.pieces = 0
        self.stale = False
        self.hasher = hashlib.sha256()

    def load(self) -> None:
        """Hash the bytes an earlier run left in the file (resume from there)."""
        self.fh.seek(0)
        self.hasher = hashlib.file_digest(self.fh, "sha256")
        self.have = self.fh.tell()
        self.pieces = 0
        self.stale = self.have > 0

    def write(self, chunk: bytes) -> None:
        self.fh.write(chunk)
        self.hasher.update(chunk)
        self.have += len(chunk)

    def digest(self) -> str:
        return self.hasher.hexdigest()


class Downloader:
    """Fetches one artifact at a time into the cache; shared by the pool's threads."""

    def __init__(
        self,
        cache: Cache,
        client: httpx.Client,
        meter: Meter,
        cancel: threading.Event,
        options: DownloadOptions,
    ) -> None:
        self.cache = cache
        self.client = client
        self.meter = meter
        self.cancel = cancel
        self.options = options

    def fetch(self, artifact: Artifact) -> Path:
        hit = self.cache.lookup(artifact.sha256, artifact)
        if hit is not None:
            self.meter.cached(hit.stat().st_size)
            return hit
        scheme = urlsplit(artifact.url).scheme.lower()
        if scheme not in ("http", "https", "file"):
            raise FetchError(f"cannot fetch {artifact.url}: unsupported URL scheme {scheme!r}")
        self._check_cancel()
        with _locked_partial(self.cache, artifact.sha256, self.cancel) as fh:
            # Another process may have added it while this one waited for the lock.
            hit = self.cache.lookup(artifact.sha256, artifact)
            if hit is not None:
                self.cache.partial(artifact.sha256).unlink()  # ours: locked, same inode
                self.meter.cached(hit.stat().st_size)
                return hit
            part = _Partial(fh)
            part.load()
            task = self.meter.start(artifact, artifact.size)
            try:
                self.meter.advance(task, part.have)
                if scheme == "file":
                    self._copy_file(artifact, part, task)
                else:
                    self._download(artifact, part, task)
                self._check_cancel()
                fh.flush()
                partial = self.cache.partial(artifact.sha256)
                path = self.cache.add(partial, artifact.sha256, verified=True)
            finally:
                self.meter.finish(task)
            return path

    def _check_cancel(self) -> None:
        if self.cancel.is_set():
            raise Cancelled

    def _mismatch(self, artifact: Artifact, part: _Partial) -> ArtifactError:
        size = ""
        if artifact.size is not None and artifact.size != part.have:
            size = f" ({part.have} bytes, the lock says {artifact.size})"
        return ArtifactError(
            f"{describe(artifact)}: sha256 {part.digest()} does not match the lock's "
            f"{artifact.sha256.lower()}{size}"
        )

    def _bound(self, artifact: Artifact) -> int:
        """The most bytes this artifact may have: the lock's size, else the maximum."""
        return artifact.size if artifact.size is not None else self.options.max_bytes

    def _too_big(self, artifact: Artifact, got: int, *, announced: bool) -> AirgapError:
        """The refusal of a transfer over the bound: the URL, its bytes and the bound."""
        what = f"{artifact.url} {'announced' if announced else 'sent'} {got} bytes"
        how = "refused" if announced else "cut off"
        if artifact.size is not None:
            return ArtifactError(
                f"{describe(artifact)}: {what}, more than the lock's size of {artifact.size} "
                f"bytes; the download was {how}"
            )
        return FetchError(
            f"cannot fetch {artifact.url}: {what}, more than the maximum of "
            f"{self.options.max_bytes} bytes for a file whose lock gives no size; the download "
            f"was {how}"
        )

    def _write(self, artifact: Artifact, part: _Partial, task: int, chunk: bytes) -> None:
        """Add a chunk to the partial file, unless it would take the file over the bound."""
        self._check_cancel()
        if part.have + len(chunk) > self._bound(artifact):
            raise self._too_big(artifact, part.have + len(chunk), announced=False)
        part.write(chunk)
        self.meter.advance(task, len(chunk))

    def _copy_file(self, artifact: Artifact, part: _Partial, task: int) -> None:
        split = urlsplit(artifact.url)
        if split.netloc not in ("", "localhost"):
            raise FetchError(f"cannot fetch {artifact.url}: file:// URL on host {split.netloc}")
        source = Path(url2pathname(unquote(split.path)))
        part.reset()
        try:
            with source.open("rb") as src:
                while chunk := src.read(CHUNK_SIZE):
                    self._write(artifact, part, task, chunk)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise FetchError(f"cannot fetch {artifact.url}: {reason}") from None
        if part.digest() != artifact.sha256.lower():
            raise self._mismatch(artifact, part)

    def _download(self, artifact: Artifact, part: _Partial, task: int) -> None:
        """Request until the partial file holds the whole body, then check its sha256."""
        want = artifact.sha256.lower()
        failures = 0  # consecutive tries that failed without delivering bytes
        requests = 0
        fresh_retry_done = False
        while True:
            self._check_cancel()
            if requests == MAX_REQUESTS:
                raise FetchError(f"cannot fetch {artifact.url}: gave up after {requests} requests")
            requests += 1
            before = part.have
            try:
                self._request(artifact, part, task)
            except _Restart:
                self.meter.advance(task, -part.have)
                part.reset()
                continue
            except _Retry as retry:
                made_progress = part.have > before
                failures = 0 if made_progress else failures + 1
                if failures > self.options.retries:
                    raise FetchError(
                        f"cannot fetch {artifact.url}: {retry.reason} (after {requests} tries)"
                    ) from None
                if not made_progress:
                    self._sleep(self._delay(failures, retry.after))
                continue
            if part.digest() == want:
                return
            if part.spliced and not fresh_retry_done:
                fresh_retry_done = True  # assembled from pieces: once more, in one piece
                self.meter.advance(task, -part.have)
                part.reset()
                continue
            raise self._mismatch(artifact, part)

    def _delay(self, failures: int, after: float | None) -> float:
        delay = self.options.backoff * 2.0 ** (failures - 1)
        if after is not None:
            delay = max(delay, after)
        return min(delay, MAX_BACKOFF_S)

    def _sleep(self, seconds: float) -> None:
        if self.cancel.wait(seconds):
            raise Cancelled

    def _request(self, artifact: Artifact, part: _Partial, task: int) -> None:
        """One GET: from byte ``part.have`` on (a Range request) or the whole file.

        Returns when the body was read to its end; raises :class:`_Retry` (transient),
        :class:`_Restart` (start over from byte 0) or :class:`FetchError` (permanent).
        """
        if part.have and part.have == artifact.size:
            return  # a complete partial file from an earlier run: only its hash is left
        if artifact.size is not None and part.have > artifact.size:
            raise _Restart
        headers = {"Accept-Encoding": "identity"}
        if part.have:
            headers["Range"] = f"bytes={part.have}-"
        try:
            with self.client.stream("GET", artifact.url, headers=headers) as response:
                status = response.status_code
                if status == 416 and part.have:
                    raise _Restart  # the partial is longer than the file (or the file changed)
                if status >= 500 or status in RETRY_STATUSES:
                    raise _Retry(
                        f"HTTP {status} {response.reason_phrase}",
                        after=_retry_after(response.headers.get("Retry-After")),
                    )
                if status not in (200, 206):
                    raise FetchError(
                        f"cannot fetch {artifact.url}: HTTP {status} {response.reason_phrase}"
                    )
                if status == 200 and part.have:
                    self.meter.advance(task, -part.have)  # Range ignored: start over
                    part.reset()
                if status == 206:
                    self._check_range(response, part)
                total = self._total(response, part)
                if total is not None and total > self._bound(artifact):
                    raise self._too_big(artifact, total, announced=True)
                if total is not None and artifact.size is None:
                    self.meter.total(task, total)
                part.pieces += 1
                for chunk in response.iter_raw():
                    self._write(artifact, part, task, chunk)
        except httpx.TransportError as exc:
            raise _Retry(_reason(exc)) from None
        except OSError as exc:  # writing the partial file
            raise FetchError(
                f"cannot fetch {artifact.url}: cannot write {self.cache.tmp}: {exc.strerror or exc}"
            ) from None

    @staticmethod
    def _check_range(response: httpx.Response, part: _Partial) -> None:
        match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
        if match is None or int(match.group(1)) != part.have:
            raise _Restart  # not the range asked for: do not splice it in

    @staticmethod
    def _total(response: httpx.Response, part: _Partial) -> int | None:
        if response.status_code == 206:
            match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
            if match is not None and match.group(3) != "*":
                return int(match.group(3))
        length = response.headers.get("Content-Length", "")
        return part.have + int(length) if length.isdigit() else None


def _retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    if value.strip().isdigit():
        return float(value.strip())
    with contextlib.suppress(TypeError, ValueError):
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time())
    return None


def _reason(exc: httpx.TransportError) -> str:
    """One line for a transport failure: what kind, and the OS's words when there are any."""
    kind = {
        httpx.ConnectError: "cannot connect",
        httpx.ConnectTimeout: "connect timed out",
        httpx.ReadTimeout: "read timed out",
        httpx.RemoteProtocolError: "connection cut",
        httpx.ReadError: "read failed",
    }.get(type(exc), type(exc).__name__)
    detail = " ".join(str(exc).split())
    return f"{kind} ({detail})" if detail else kind


@contextlib.contextmanager
def _locked_partial(
    cache: Cache, sha256: str, cancel: threading.Event
) -> Iterator[io.BufferedRandom]:
    """Open (or create) the partial file of ``sha256``, exclusively locked against other
    processes; remove it on any exception. The caller renames it into the cache on success.

    The lock is taken on the file itself; after taking it the path is checked to still name
    the locked file (another process may have renamed it into the cache or removed it while
    this one waited), else it starts over.
    """
    cache.tmp.mkdir(parents=True, exist_ok=True)
    path = cache.partial(sha256)
    while True:
        fh = path.open("a+b")
        try:
            while True:
                try:
                    fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if cancel.wait(0.05):
                        raise Cancelled from None
            try:
                same = path.stat().st_ino == os.fstat(fh.fileno()).st_ino
            except FileNotFoundError:
                same = False
        except BaseException:
            fh.close()
            raise
        if same:
            break
        fh.close()
    try:
        yield fh
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    finally:
        fh.close()  # closing releases the lock, after the rename or the removal
