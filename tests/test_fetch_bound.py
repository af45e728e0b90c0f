"""The downloader's byte bound (builder.download), against the real loopback server.

A transfer stops at the lock's size, or at ``max_bytes`` when the lock gives none: a server
that announces more is refused before its body is read, one that sends more without saying so
is cut off. Either way the error names the URL and both sizes, and the cache is left as it was.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import pytest
from localhttp import Fault, LocalServer

from builder.artifacts import Artifact
from builder.cache import Cache
from builder.fetch import fetch_one
from signing.errors import ArtifactError, FetchError, InputError

BIG = 4 << 20  # far more than one read of the body: a cut-off is visible as such
FAST = {"backoff": 0.01, "progress": False}


def publish(server: LocalServer, data: bytes, *, size: int | None) -> Artifact:
    """``data`` under the server's ``files/``, and a lock's artifact for it with ``size``."""
    path = server.root / "files" / "big-1.0-py3-none-any.whl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return Artifact(
        name="big",
        version="1.0",
        filename=path.name,
        url=f"{server.url}/files/{path.name}",
        sha256=hashlib.sha256(data).hexdigest(),
        size=size,
    )


def untouched(cache: Cache) -> bool:
    """No cache entry and no partial file: the refused download left nothing behind."""
    return not any(p.is_file() for p in cache.root.rglob("*")) if cache.root.exists() else True


@pytest.fixture
def cache(tmp_path: Path) -> Cache:
    return Cache(tmp_path / "cache")


def test_a_server_sending_more_than_the_locks_size_is_cut_off(
    local_server: LocalServer, cache: Cache
) -> None:
    """No Content-Length: the bytes themselves cross the lock's size, and the transfer stops
    there, long before the server's 4 MiB are read."""
    lock_size = 1000
    artifact = publish(local_server, os.urandom(BIG), size=lock_size)
    local_server.fail("/files/big-1.0-py3-none-any.whl", Fault(no_length=True, times=-1))

    with pytest.raises(ArtifactError) as caught:
        fetch_one(artifact, cache, retries=0, **FAST)

    message = caught.value.diagnostics()
    match = re.fullmatch(
        rf"package big 1\.0 \(big-1\.0-py3-none-any\.whl\): {re.escape(artifact.url)} sent "
        rf"(\d+) bytes, more than the lock's size of {lock_size} bytes; the download was cut off",
        message,
    )
    assert match is not None, message
    assert lock_size < int(match[1]) < BIG
    assert caught.value.exit_code == 3
    assert local_server.count("/files/big-1.0-py3-none-any.whl") == 1  # not retried
    assert untouched(cache)


def test_a_server_announcing_more_than_the_locks_size_is_refused_before_the_body(
    local_server: LocalServer, cache: Cache
) -> None:
    artifact = publish(local_server, os.urandom(BIG), size=1000)
    with pytest.raises(ArtifactError) as caught:
        fetch_one(artifact, cache, **FAST)
    assert caught.value.diagnostics() == (
        f"package big 1.0 (big-1.0-py3-none-any.whl): {artifact.url} announced {BIG} bytes, "
        "more than the lock's size of 1000 bytes; the download was refused"
    )
    assert untouched(cache)


def test_without_a_size_in_the_lock_the_configured_maximum_bounds_it(
    local_server: LocalServer, cache: Cache
) -> None:
    artifact = publish(local_server, os.urandom(BIG), size=None)
    local_server.fail("/files/big-1.0-py3-none-any.whl", Fault(no_length=True, times=-1))
    with pytest.raises(FetchError) as caught:
        fetch_one(artifact, cache, max_bytes=2000, retries=0, **FAST)
    message = caught.value.diagnostics()
    assert message.startswith(f"cannot fetch {artifact.url}: {artifact.url} sent ")
    assert message.endswith(
        "bytes, more than the maximum of 2000 bytes for a file whose lock gives no size; "
        "the download was cut off"
    )
    assert untouched(cache)
    # Within the maximum, the same file is fetched as usual.
    local_server.faults.clear()
    path = fetch_one(artifact, cache, max_bytes=BIG, **FAST)
    assert path.stat().st_size == BIG


def test_a_file_url_is_bounded_too(tmp_path: Path, cache: Cache) -> None:
    source = tmp_path / "big-1.0-py3-none-any.whl"
    source.write_bytes(os.urandom(BIG))
    artifact = Artifact(
        "big", "1.0", source.name, source.as_uri(), hashlib.sha256(b"x").hexdigest(), size=10
    )
    with pytest.raises(ArtifactError, match=r"sent \d+ bytes, more than the lock's size of 10 "):
        fetch_one(artifact, cache, **FAST)
    assert untouched(cache)


def test_exactly_the_locks_size_is_accepted(local_server: LocalServer, cache: Cache) -> None:
    data = os.urandom(3000)
    artifact = publish(local_server, data, size=len(data))
    local_server.fail("/files/big-1.0-py3-none-any.whl", Fault(no_length=True))
    assert fetch_one(artifact, cache, **FAST).read_bytes() == data


def test_max_bytes_must_be_positive(cache: Cache) -> None:
    artifact = Artifact("big", "1.0", "big-1.0.whl", "https://x.invalid/b", "a" * 64)
    with pytest.raises(InputError, match="max_bytes must be at least 1, not 0"):
        fetch_one(artifact, cache, max_bytes=0, **FAST)
