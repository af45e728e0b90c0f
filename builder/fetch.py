"""Fetching a lock's artifacts, by hash, into the content-addressed cache (ADR 0007, "Fetch").

:func:`fetch_all` downloads a lock's :class:`~builder.artifacts.Artifact` values in parallel (a
thread pool sharing one ``httpx.Client``) into a :class:`~builder.cache.Cache`, and returns
where each one is, by sha256. The lock's sha256 is the only thing that decides whether bytes
are accepted. This module schedules and shows progress; one download (retries, resumption, the
byte bound, the hash check) is builder.download's, and its docstring has the rules.

- A cache hit is re-hashed before it is used (builder.cache): a tampered entry is reported.
- Duplicate sha256s in the input are fetched once.
- On the first failure, the other downloads stop, their partial files are removed, and that
  first failure (in input order among those that finished together; AirgapErrors first) is
  raised. Ctrl-C does the same.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Final

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
from builder.cache import Cache, check_sha256
from builder.download import (
    DEFAULT_BACKOFF_S,
    DEFAULT_MAX_BYTES,
    DEFAULT_RETRIES,
    Cancelled,
    Downloader,
    DownloadOptions,
    Meter,
)
from signing.errors import AirgapError, InputError

DEFAULT_JOBS: Final = 8
USER_AGENT: Final = "airgap-appliance-builder"


# -- progress -------------------------------------------------------------------------------


class _NoMeter:
    def start(self, artifact: Artifact, total: int | None) -> int:
        return 0

    def cached(self, size: int) -> None:
        pass

    def total(self, task: int, total: int) -> None:
        pass

    def advance(self, task: int, n: int) -> None:
        pass

    def finish(self, task: int) -> None:
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

    def start(self, artifact: Artifact, total: int | None) -> int:
        return self.progress.add_task(f"  {artifact.filename}", total=total)

    def cached(self, size: int) -> None:
        self.progress.advance(self.overall, size)

    def total(self, task: int, total: int) -> None:
        self.progress.update(TaskID(task), total=total)

    def advance(self, task: int, n: int) -> None:
        self.progress.advance(TaskID(task), n)
        self.progress.advance(self.overall, n)

    def finish(self, task: int) -> None:
        self.progress.remove_task(TaskID(task))


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
    max_bytes: int = DEFAULT_MAX_BYTES,
    client: httpx.Client | None = None,
) -> dict[str, Path]:
    """Fetch every artifact into ``cache``; return ``{sha256: cached path}`` in input order.

    ``jobs`` downloads run at once; ``retries`` is how many times a transient failure is
    retried (first backoff ``backoff`` seconds, doubling); ``timeout`` bounds connecting and
    each read, in seconds; ``max_bytes`` bounds a download whose artifact has no ``size`` (one
    that has is bounded by it). ``progress`` shows a rich progress bar on stderr (``None``:
    when stderr is a terminal). ``client`` replaces the ``httpx.Client`` made here (proxies,
    certificates); it is not closed.

    Raises the first failure: :class:`ArtifactError` (a sha256 mismatch, downloaded or
    cached, or more bytes than the lock's size), :class:`FetchError` (a URL that cannot be
    fetched), after the other downloads have stopped and their partial files were removed.
    builder.download's docstring has the rules.
    """
    if jobs < 1:
        raise InputError(f"jobs must be at least 1, not {jobs}")
    if retries < 0:
        raise InputError(f"retries must not be negative, not {retries}")
    if max_bytes < 1:
        raise InputError(f"max_bytes must be at least 1, not {max_bytes}")
    unique: dict[str, Artifact] = {}
    for artifact in artifacts:
        unique.setdefault(check_sha256(artifact.sha256), artifact)
    if not unique:
        return {}
    show = sys.stderr.isatty() if progress is None else progress
    options = DownloadOptions(retries=retries, backoff=backoff, max_bytes=max_bytes)
    with contextlib.ExitStack() as stack:
        if client is None:
            client = stack.enter_context(_make_client(jobs, timeout))
        meter: Meter = (
            stack.enter_context(_RichMeter(list(unique.values()))) if show else _NoMeter()
        )
        cancel = threading.Event()
        downloader = Downloader(cache, client, meter, cancel, options)
        return _run(downloader, unique, jobs, cancel)
    raise AssertionError("unreachable")  # pragma: no cover - for mypy's flow analysis


def _run(
    downloader: Downloader, unique: dict[str, Artifact], jobs: int, cancel: threading.Event
) -> dict[str, Path]:
    """Run the downloads on a pool; on the first failure (or Ctrl-C) stop the rest, wait for
    them to clean up, and raise that failure."""
    first: BaseException | None = None
    with ThreadPoolExecutor(max_workers=min(jobs, len(unique)), thread_name_prefix="fetch") as pool:
        futures: dict[str, Future[Path]] = {
            sha: pool.submit(downloader.fetch, artifact) for sha, artifact in unique.items()
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
        if (exc := future.exception()) is not None and not isinstance(exc, Cancelled)
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
    max_bytes: int = DEFAULT_MAX_BYTES,
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
        max_bytes=max_bytes,
        client=client,
    )
    return fetched[check_sha256(artifact.sha256)]


__all__ = ["fetch_all", "fetch_one"]
