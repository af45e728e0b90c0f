"""Downloading locked artifacts, by hash, into a content-addressed cache (ADR 0007, "Fetch").

:func:`fetch_all` downloads a lock's :class:`~builder.artifacts.Artifact` values in parallel
(a thread pool sharing one ``httpx.Client``) into a :class:`Cache`, and returns where each one
is, by sha256. The lock's sha256 is the only thing that decides whether bytes are accepted:

- A download streams into a partial file under the cache's ``tmp/`` while it is hashed, and
  enters the cache (an atomic rename, read-only) only when its sha256 equals the lock's.
  Otherwise :class:`~signing.errors.ArtifactError` names the package and both hashes, and
  nothing is left behind: no partial file, no cache entry.
- A cache hit is re-hashed before it is used. A cached file that no longer matches (tampered
  or damaged) is an :class:`~signing.errors.ArtifactError` naming the package and both hashes;
  the bad entry is removed, so the next run downloads it afresh. A tampered cache is a sign of
  trouble on the builder: it is reported, never silently healed.

Transfers (``http://``, ``https://``; ``file://`` is copied):

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
- On the first failure, the other downloads stop (checked between the chunks of a body as
  they arrive, during backoff, and before a file enters the cache; a read blocked on a silent
  server waits for its ``timeout``), their partial files are removed, and that first failure
  is raised. Ctrl-C does the same.

Duplicate sha256s in the input are fetched once. Content is requested with
``Accept-Encoding: identity`` and read raw: the bytes hashed are the bytes the server stores,
never a decoded form of them.
"""

from __future__ import annotations

import contextlib
import email.utils
import fcntl
import hashlib
import io
import os
import re
import shutil
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Protocol
from urllib.parse import unquote, urlsplit
from urllib.request import url2pathname

import httpx
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from builder.artifacts import Artifact
from signing.errors import AirgapError, ArtifactError, FetchError, InputError

CACHE_ENV: Final = "AIRGAP_APPLIANCE_CACHE"
DEFAULT_JOBS: Final = 8
DEFAULT_RETRIES: Final = 3
DEFAULT_BACKOFF_S: Final = 0.5
MAX_BACKOFF_S: Final = 30.0
MAX_REQUESTS: Final = 64  # per file, however much progress each one made
CHUNK_SIZE: Final = 1 << 20  # file:// copies
RETRY_STATUSES: Final = frozenset({408, 429})  # and every 5xx
USER_AGENT: Final = "airgap-appliance-builder"

_HEX64 = re.compile(r"[0-9a-f]{64}")
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


def default_cache_root() -> Path:
    """``$AIRGAP_APPLIANCE_CACHE``, else ``~/.cache/airgap-appliance``."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "airgap-appliance"


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file's bytes."""
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def describe(artifact: Artifact) -> str:
    """``package numpy 2.4.6 (numpy-2.4.6-....whl)``: how every message names an artifact."""
    return f"package {artifact.name} {artifact.version} ({artifact.filename})"


def _check_sha256(sha256: str) -> str:
    digest = sha256.lower()
    if not _HEX64.fullmatch(digest):
        raise InputError(f"{sha256!r} is not a sha256 hex digest")
    return digest


# -- the cache ------------------------------------------------------------------------------


class Cache:
    """A content-addressed store of verified files: ``root/sha256/<first 2 hex>/<hex>``.

    Files enter it only through :meth:`add` (atomically, read-only) and are re-hashed by
    every :meth:`lookup`. Partial downloads live in ``root/tmp`` (same file system, so that
    adding one is a rename).
    """

    def __init__(self, root: Path | None = None) -> None:
        self.root = (root if root is not None else default_cache_root()).expanduser()
        self.tmp = self.root / "tmp"

    def __repr__(self) -> str:
        return f"Cache({str(self.root)!r})"

    def path(self, sha256: str) -> Path:
        """Where the file with this sha256 is (or would be) stored."""
        digest = _check_sha256(sha256)
        return self.root / "sha256" / digest[:2] / digest

    def partial(self, sha256: str) -> Path:
        """The partial file a download of this sha256 writes to (and resumes from)."""
        return self.tmp / f"{_check_sha256(sha256)}.part"

    def lookup(self, sha256: str, artifact: Artifact | None = None) -> Path | None:
        """The cached file with this sha256, after re-hashing it; ``None`` when not cached.

        A cached file whose bytes no longer hash to ``sha256`` is removed and reported:
        :class:`ArtifactError` naming ``artifact`` (or the cache path) and both hashes.
        """
        path = self.path(sha256)
        try:
            got = sha256_file(path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ArtifactError(f"cannot read cached file {path}: {exc.strerror}") from None
        want = sha256.lower()
        if got == want:
            return path
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        who = describe(artifact) if artifact is not None else f"cached file {path}"
        raise ArtifactError(
            f"{who}: cached copy {path} has sha256 {got}, which does not match the lock's "
            f"{want}; the entry was removed (run again to download it afresh)"
        )

    def add(self, path: Path, sha256: str, *, verified: bool = False) -> Path:
        """Move ``path`` into the cache as the file with this sha256; return its cache path.

        The file is hashed first unless ``verified`` (the caller hashed these very bytes):
        a mismatch raises :class:`ArtifactError` and leaves ``path`` where it is. The move is
        atomic (a rename within the cache's file system, after an fsync): a reader sees the
        whole file or none. An existing entry is replaced by the same bytes.
        """
        target = self.path(sha256)
        want = sha256.lower()
        if not verified and (got := sha256_file(path)) != want:
            raise ArtifactError(f"{path}: sha256 {got} does not match the expected {want}")
        self.tmp.mkdir(parents=True, exist_ok=True)
        if path.parent.resolve() != self.tmp.resolve():
            staged = self.tmp / f"{want}.{os.getpid()}.{threading.get_ident()}.add"
            shutil.move(path, staged)
            path = staged
        try:
            _seal(path)
            target.parent.mkdir(parents=True, exist_ok=True)
            path.replace(target)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return target


def _seal(path: Path) -> None:
    """Make a file read-only and durable before it is renamed into the cache."""
    path.chmod(0o444)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
                        raise _Cancelled from None
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


# -- progress -------------------------------------------------------------------------------


class _Meter(Protocol):
    def start(self, artifact: Artifact, total: int | None) -> TaskID: ...
    def cached(self, size: int) -> None: ...
    def total(self, task: TaskID, total: int) -> None: ...
    def advance(self, task: TaskID, n: int) -> None: ...
    def finish(self, task: TaskID) -> None: ...


class _NoMeter:
    def start(self, artifact: Artifact, total: int | None) -> TaskID:
        return TaskID(0)

    def cached(self, size: int) -> None:
        pass

    def total(self, task: TaskID, total: int) -> None:
        pass

    def advance(self, task: TaskID, n: int) -> None:
        pass

    def finish(self, task: TaskID) -> None:
        pass


class _RichMeter:
    """A rich progress display on stderr: one bar for all bytes, one per active download."""

    def __init__(self, artifacts: Sequence[Artifact]) -> None:
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=False,
        )
        known = [a.size for a in artifacts if a.size is not None]
        self.overall = self.progress.add_task(
            f"fetch {len(artifacts)} files",
            total=sum(known) if len(known) == len(artifacts) else None,
        )

    def __enter__(self) -> _RichMeter:
        self.progress.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.progress.stop()

    def start(self, artifact: Artifact, total: int | None) -> TaskID:
        return self.progress.add_task(f"  {artifact.filename}", total=total)

    def cached(self, size: int) -> None:
        self.progress.advance(self.overall, size)

    def total(self, task: TaskID, total: int) -> None:
        self.progress.update(task, total=total)

    def advance(self, task: TaskID, n: int) -> None:
        self.progress.advance(task, n)
        self.progress.advance(self.overall, n)

    def finish(self, task: TaskID) -> None:
        self.progress.remove_task(task)


# -- one download ---------------------------------------------------------------------------


class _Cancelled(Exception):  # noqa: N818 - a signal between threads, never shown
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
class _Options:
    retries: int
    backoff: float


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


class _Fetcher:
    """Fetches one artifact at a time into the cache; shared by the pool's threads."""

    def __init__(
        self,
        cache: Cache,
        client: httpx.Client,
        meter: _Meter,
        cancel: threading.Event,
        options: _Options,
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
            raise _Cancelled

    def _mismatch(self, artifact: Artifact, part: _Partial) -> ArtifactError:
        size = ""
        if artifact.size is not None and artifact.size != part.have:
            size = f" ({part.have} bytes, the lock says {artifact.size})"
        return ArtifactError(
            f"{describe(artifact)}: sha256 {part.digest()} does not match the lock's "
            f"{artifact.sha256.lower()}{size}"
        )

    def _copy_file(self, artifact: Artifact, part: _Partial, task: TaskID) -> None:
        split = urlsplit(artifact.url)
        if split.netloc not in ("", "localhost"):
            raise FetchError(f"cannot fetch {artifact.url}: file:// URL on host {split.netloc}")
        source = Path(url2pathname(unquote(split.path)))
        part.reset()
        try:
            with source.open("rb") as src:
                while chunk := src.read(CHUNK_SIZE):
                    self._check_cancel()
                    part.write(chunk)
                    self.meter.advance(task, len(chunk))
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise FetchError(f"cannot fetch {artifact.url}: {reason}") from None
        if part.digest() != artifact.sha256.lower():
            raise self._mismatch(artifact, part)

    def _download(self, artifact: Artifact, part: _Partial, task: TaskID) -> None:
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
            raise _Cancelled

    def _request(self, artifact: Artifact, part: _Partial, task: TaskID) -> None:
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
                if total is not None and artifact.size is None:
                    self.meter.total(task, total)
                part.pieces += 1
                for chunk in response.iter_raw():
                    self._check_cancel()
                    part.write(chunk)
                    self.meter.advance(task, len(chunk))
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


# -- all of them ----------------------------------------------------------------------------


def fetch_all(
    artifacts: Sequence[Artifact],
    cache: Cache,
    *,
    jobs: int = DEFAULT_JOBS,
    retries: int = DEFAULT_RETRIES,
    progress: bool | None = None,
    timeout: float = 60.0,
    backoff: float = DEFAULT_BACKOFF_S,
    client: httpx.Client | None = None,
) -> dict[str, Path]:
    """Fetch every artifact into ``cache``; return ``{sha256: cached path}`` in input order.

    ``jobs`` downloads run at once; ``retries`` is how many times a transient failure is
    retried (first backoff ``backoff`` seconds, doubling); ``timeout`` bounds connecting and
    each read, in seconds. ``progress`` shows a rich progress bar on stderr (``None``: when
    stderr is a terminal). ``client`` replaces the ``httpx.Client`` made here (proxies,
    certificates); it is not closed.

    Raises the first failure: :class:`ArtifactError` (a sha256 mismatch, downloaded or
    cached), :class:`FetchError` (a URL that cannot be fetched), after the other downloads
    have stopped and their partial files were removed. The module docstring has the rules.
    """
    if jobs < 1:
        raise InputError(f"jobs must be at least 1, not {jobs}")
    if retries < 0:
        raise InputError(f"retries must not be negative, not {retries}")
    unique: dict[str, Artifact] = {}
    for artifact in artifacts:
        unique.setdefault(_check_sha256(artifact.sha256), artifact)
    if not unique:
        return {}
    show = sys.stderr.isatty() if progress is None else progress
    options = _Options(retries=retries, backoff=backoff)
    with contextlib.ExitStack() as stack:
        if client is None:
            client = stack.enter_context(_make_client(jobs, timeout))
        meter: _Meter = (
            stack.enter_context(_RichMeter(list(unique.values()))) if show else _NoMeter()
        )
        cancel = threading.Event()
        fetcher = _Fetcher(cache, client, meter, cancel, options)
        return _run(fetcher, unique, jobs, cancel)
    raise AssertionError("unreachable")  # pragma: no cover - for mypy's flow analysis


def _run(
    fetcher: _Fetcher, unique: dict[str, Artifact], jobs: int, cancel: threading.Event
) -> dict[str, Path]:
    """Run the downloads on a pool; on the first failure (or Ctrl-C) stop the rest, wait for
    them to clean up, and raise that failure."""
    first: BaseException | None = None
    with ThreadPoolExecutor(max_workers=min(jobs, len(unique)), thread_name_prefix="fetch") as pool:
        futures: dict[str, Future[Path]] = {
            sha: pool.submit(fetcher.fetch, artifact) for sha, artifact in unique.items()
        }
        try:
            pending = set(futures.values())
            while pending and first is None:
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                first = _first_failure(done, futures)
        except BaseException:
            cancel.set()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        if first is not None:
            cancel.set()
            pool.shutdown(wait=False, cancel_futures=True)
    # leaving the pool's block waited for the running downloads to stop and clean up
    if first is not None:
        raise first
    return {sha: future.result() for sha, future in futures.items()}


def _first_failure(
    done: set[Future[Path]], futures: dict[str, Future[Path]]
) -> BaseException | None:
    """The failure among ``done`` that comes first in input order (a stable choice when
    several finished together); AirgapErrors before anything else."""
    failed = [
        exc
        for future in futures.values()
        if future in done and not future.cancelled()
        if (exc := future.exception()) is not None and not isinstance(exc, _Cancelled)
    ]
    if not failed:
        return None
    for exc in failed:
        if isinstance(exc, AirgapError):
            return exc
    return failed[0]


@contextlib.contextmanager
def _make_client(jobs: int, timeout: float) -> Iterator[httpx.Client]:
    with httpx.Client(
        timeout=httpx.Timeout(timeout),
        limits=httpx.Limits(max_connections=jobs, max_keepalive_connections=jobs),
        follow_redirects=True,
        headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"},
    ) as client:
        yield client


def fetch_one(
    artifact: Artifact,
    cache: Cache,
    *,
    retries: int = DEFAULT_RETRIES,
    progress: bool | None = None,
    timeout: float = 60.0,
    backoff: float = DEFAULT_BACKOFF_S,
    client: httpx.Client | None = None,
) -> Path:
    """Fetch one artifact into ``cache`` and return its cached path (see :func:`fetch_all`)."""
    fetched = fetch_all(
        [artifact],
        cache,
        jobs=1,
        retries=retries,
        progress=progress,
        timeout=timeout,
        backoff=backoff,
        client=client,
    )
    return fetched[_check_sha256(artifact.sha256)]


__all__ = [
    "CACHE_ENV",
    "Cache",
    "default_cache_root",
    "describe",
    "fetch_all",
    "fetch_one",
    "sha256_file",
]
