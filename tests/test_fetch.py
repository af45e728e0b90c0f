"""builder.fetch against a real HTTP server on loopback (tests/localhttp.py) and real files.

Nothing of the project is mocked. Retries use a tiny backoff (``backoff=0.01``) so that the
retry tests stay fast; the decisions they pin are documented in builder/fetch.py.
"""

from __future__ import annotations

import hashlib
import os
import socket
import stat
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from localhttp import Fault, LocalServer

from builder.artifacts import Artifact
from builder.cache import CACHE_ENV, Cache
from builder.fetch import fetch_all, fetch_one
from signing.errors import ArtifactError, FetchError, InputError

FAST = {"backoff": 0.01, "progress": False}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def publish(
    server: LocalServer, name: str, data: bytes, *, version: str = "1.0", sized: bool = True
) -> Artifact:
    """Put ``data`` under the server's ``files/`` and return the artifact a lock would have."""
    filename = f"{name}-{version}-py3-none-any.whl"
    path = server.root / "files" / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return Artifact(
        name=name,
        version=version,
        filename=filename,
        url=f"{server.url}/files/{filename}",
        sha256=sha(data),
        size=len(data) if sized else None,
    )


def url_path(artifact: Artifact) -> str:
    return "/files/" + artifact.filename


def leftovers(cache: Cache) -> list[Path]:
    """Everything in the cache's tmp directory (partial files, staged files)."""
    return sorted(cache.tmp.iterdir()) if cache.tmp.exists() else []


def entries(cache: Cache) -> list[Path]:
    store = cache.root / "sha256"
    return sorted(p for p in store.rglob("*") if p.is_file()) if store.exists() else []


@pytest.fixture
def cache(tmp_path: Path) -> Cache:
    return Cache(tmp_path / "cache")


# -- the happy path ---------------------------------------------------------------------------


def test_parallel_fetch_of_several_files(local_server: LocalServer, cache: Cache) -> None:
    """Four downloads must be in flight at once: each answer waits at a barrier of four,
    which a sequential fetch would never pass (it breaks after 5 s and the fetch fails)."""
    barrier = threading.Barrier(4, timeout=5)
    blobs = {f"pkg{i}": os.urandom(50_000 * (i + 1)) for i in range(4)}
    arts = [publish(local_server, name, data) for name, data in blobs.items()]
    by_path = {url_path(a): blobs[a.name] for a in arts}

    def gated(path: str, _headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        barrier.wait()
        return 200, {}, by_path[path]

    local_server.route("/files/", gated)
    got = fetch_all(arts, cache, jobs=4, retries=0, **FAST)

    assert list(got) == [a.sha256 for a in arts]
    for art in arts:
        path = got[art.sha256]
        assert path == cache.root / "sha256" / art.sha256[:2] / art.sha256
        assert path.read_bytes() == blobs[art.name]
        assert not path.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)
        assert local_server.count(url_path(art)) == 1
    assert leftovers(cache) == []


def test_many_files_with_fewer_jobs_and_unknown_sizes(
    local_server: LocalServer, cache: Cache
) -> None:
    arts = [publish(local_server, f"p{i}", os.urandom(i * 1000), sized=False) for i in range(12)]
    got = fetch_all(arts, cache, jobs=3, **FAST)
    assert len(got) == 12
    for art in arts:
        assert sha(got[art.sha256].read_bytes()) == art.sha256
    assert len(entries(cache)) == 12


def test_cache_hit_makes_no_request(local_server: LocalServer, cache: Cache) -> None:
    arts = [publish(local_server, f"p{i}", os.urandom(10_000)) for i in range(3)]
    first = fetch_all(arts, cache, **FAST)
    assert len(local_server.requests) == 3
    local_server.requests.clear()

    again = fetch_all(arts, cache, **FAST)

    assert again == first
    assert local_server.requests == []


def test_duplicate_artifacts_are_fetched_once(local_server: LocalServer, cache: Cache) -> None:
    data = os.urandom(20_000)
    art = publish(local_server, "dup", data)
    same_bytes_other_name = Artifact(
        name="dup-alias",
        version="1.0",
        filename="dup_alias-1.0-py3-none-any.whl",
        url=art.url,
        sha256=art.sha256.upper(),  # the same digest, spelled differently
    )
    got = fetch_all([art, art, same_bytes_other_name], cache, **FAST)
    assert list(got) == [art.sha256]
    assert got[art.sha256].read_bytes() == data
    assert local_server.count(url_path(art)) == 1


def test_fetch_one_and_empty_input(local_server: LocalServer, cache: Cache) -> None:
    data = os.urandom(3000)
    art = publish(local_server, "one", data)
    assert fetch_one(art, cache, backoff=0.01, progress=False).read_bytes() == data
    assert fetch_all([], cache, **FAST) == {}


def test_progress_bar_goes_to_stderr(
    local_server: LocalServer, cache: Cache, capsys: pytest.CaptureFixture[str]
) -> None:
    arts = [publish(local_server, f"bar{i}", os.urandom(100_000)) for i in range(2)]
    fetch_all(arts, cache, progress=True, backoff=0.01)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "fetch 2 files" in captured.err


# -- file:// ---------------------------------------------------------------------------------


def test_file_urls(tmp_path: Path, cache: Cache) -> None:
    data = os.urandom(70_000)
    src = tmp_path / "local dir" / "pkg-1.0.tar.bz2"
    src.parent.mkdir()
    src.write_bytes(data)
    art = Artifact("pkg", "1.0", src.name, src.as_uri(), sha(data), subdir="noarch")
    got = fetch_all([art], cache, **FAST)
    assert got[art.sha256].read_bytes() == data
    assert src.read_bytes() == data  # copied, never moved


def test_file_url_missing_names_the_url(tmp_path: Path, cache: Cache) -> None:
    url = (tmp_path / "nope.whl").as_uri()
    art = Artifact("nope", "1.0", "nope.whl", url, "a" * 64)
    with pytest.raises(FetchError, match=f"cannot fetch {url}: No such file"):
        fetch_all([art], cache, **FAST)
    assert leftovers(cache) == []


def test_file_url_wrong_bytes(tmp_path: Path, cache: Cache) -> None:
    src = tmp_path / "pkg.whl"
    src.write_bytes(b"not what the lock pinned")
    art = Artifact("pkg", "2.0", "pkg.whl", src.as_uri(), "b" * 64)
    with pytest.raises(ArtifactError) as err:
        fetch_all([art], cache, **FAST)
    assert str(err.value) == (
        f"package pkg 2.0 (pkg.whl): sha256 {sha(src.read_bytes())} "
        f"does not match the lock's {'b' * 64}"
    )
    assert entries(cache) == []
    assert leftovers(cache) == []


# -- hashes -----------------------------------------------------------------------------------


def test_tampered_cache_entry_is_named_removed_and_then_refetched(
    local_server: LocalServer, cache: Cache
) -> None:
    """Decision: a tampered entry fails the fetch (naming package and both hashes) and is
    removed; it is not silently replaced. The next run downloads it again."""
    data = os.urandom(40_000)
    art = publish(local_server, "numpy", data, version="2.4.6")
    cached = fetch_all([art], cache, **FAST)[art.sha256]
    cached.chmod(0o644)
    tampered = bytearray(data)
    tampered[1234] ^= 0x01
    cached.write_bytes(tampered)
    local_server.requests.clear()

    with pytest.raises(ArtifactError) as err:
        fetch_all([art], cache, **FAST)

    message = err.value.diagnostics()
    assert "package numpy 2.4.6 (numpy-2.4.6-py3-none-any.whl)" in message
    assert sha(bytes(tampered)) in message
    assert f"the lock's {art.sha256}" in message
    assert "\n" not in str(err.value)
    assert not cached.exists()
    assert local_server.requests == []  # failed on the cache, before any download

    healed = fetch_all([art], cache, **FAST)[art.sha256]
    assert healed.read_bytes() == data
    assert local_server.count(url_path(art)) == 1


def test_lookup_alone_reports_and_removes_a_bad_entry(tmp_path: Path, cache: Cache) -> None:
    data = b"good bytes"
    src = tmp_path / "f"
    src.write_bytes(data)
    path = cache.add(src, sha(data))
    assert not src.exists()
    assert cache.lookup(sha(data)) == path
    assert cache.lookup("c" * 64) is None

    path.chmod(0o644)
    path.write_bytes(b"evil bytes")
    with pytest.raises(ArtifactError, match=f"sha256 {sha(b'evil bytes')}.*{sha(data)}"):
        cache.lookup(sha(data))
    assert not path.exists()
    assert cache.lookup(sha(data)) is None


def test_add_refuses_wrong_bytes(tmp_path: Path, cache: Cache) -> None:
    src = tmp_path / "f"
    src.write_bytes(b"abc")
    with pytest.raises(ArtifactError, match=sha(b"abc")):
        cache.add(src, "d" * 64)
    assert src.read_bytes() == b"abc"
    assert entries(cache) == []


def test_server_serving_wrong_bytes(local_server: LocalServer, cache: Cache) -> None:
    """Decision: a mismatch in bytes that came in one response fails at once (one request)."""
    data = os.urandom(60_000)
    art = publish(local_server, "numpy", data, version="2.4.6")
    local_server.fail(url_path(art), Fault(corrupt=True, times=-1))
    served = bytes([data[0] ^ 0xFF]) + data[1:]

    with pytest.raises(ArtifactError) as err:
        fetch_all([art], cache, **FAST)

    assert str(err.value) == (
        "package numpy 2.4.6 (numpy-2.4.6-py3-none-any.whl): "
        f"sha256 {sha(served)} does not match the lock's {art.sha256}"
    )
    assert local_server.count(url_path(art)) == 1
    assert entries(cache) == []
    assert leftovers(cache) == []


def test_wrong_size_is_named_too(local_server: LocalServer, cache: Cache) -> None:
    art = publish(local_server, "short", b"x" * 100)
    lying = Artifact(art.name, art.version, art.filename, art.url, "e" * 64, size=150)
    with pytest.raises(ArtifactError, match=r"\(100 bytes, the lock says 150\)$"):
        fetch_all([lying], cache, **FAST)


def test_bad_sha256_in_input_is_refused(cache: Cache) -> None:
    art = Artifact("x", "1", "x.whl", "http://127.0.0.1:9/x.whl", "../" + "a" * 61)
    with pytest.raises(InputError, match="not a sha256"):
        fetch_all([art], cache, **FAST)


# -- resuming -------------------------------------------------------------------------------


def test_cut_connection_is_resumed_with_range(local_server: LocalServer, cache: Cache) -> None:
    data = os.urandom(1_000_000)
    art = publish(local_server, "big", data)
    local_server.fail(url_path(art), Fault(cut_after=300_000))

    got = fetch_all([art], cache, retries=1, **FAST)

    assert got[art.sha256].read_bytes() == data
    assert [r for r in local_server.requests if r[1] == url_path(art)] == [
        ("GET", url_path(art), None),
        ("GET", url_path(art), "bytes=300000-"),
    ]
    assert leftovers(cache) == []


def test_cuts_that_make_progress_do_not_use_up_retries(
    local_server: LocalServer, cache: Cache
) -> None:
    data = os.urandom(100_000)
    art = publish(local_server, "flaky", data)
    local_server.fail(url_path(art), Fault(cut_after=10_000, times=5))
    got = fetch_all([art], cache, retries=1, **FAST)
    assert got[art.sha256].read_bytes() == data
    ranges = [r[2] for r in local_server.requests if r[1] == url_path(art)]
    assert ranges == [None, *(f"bytes={n * 10_000}-" for n in range(1, 6))]


def test_partial_file_from_an_earlier_run_is_resumed(
    local_server: LocalServer, cache: Cache
) -> None:
    data = os.urandom(200_000)
    art = publish(local_server, "resume", data)
    cache.tmp.mkdir(parents=True)
    cache.partial(art.sha256).write_bytes(data[:123_456])

    got = fetch_all([art], cache, **FAST)

    assert got[art.sha256].read_bytes() == data
    assert local_server.requests == [("GET", url_path(art), "bytes=123456-")]
    assert leftovers(cache) == []


def test_bad_partial_file_is_downloaded_again_from_scratch(
    local_server: LocalServer, cache: Cache
) -> None:
    """Decision: bytes assembled from pieces that do not match get one fresh, whole try."""
    data = os.urandom(200_000)
    art = publish(local_server, "stale", data)
    cache.tmp.mkdir(parents=True)
    cache.partial(art.sha256).write_bytes(os.urandom(50_000))

    got = fetch_all([art], cache, **FAST)

    assert got[art.sha256].read_bytes() == data
    assert local_server.requests == [
        ("GET", url_path(art), "bytes=50000-"),
        ("GET", url_path(art), None),
    ]


def test_spliced_mismatch_that_persists_names_both_hashes(
    local_server: LocalServer, cache: Cache
) -> None:
    data = os.urandom(80_000)
    art = publish(local_server, "always-bad", data)
    cache.tmp.mkdir(parents=True)
    cache.partial(art.sha256).write_bytes(data[:1000])
    local_server.fail(url_path(art), Fault(corrupt=True, times=-1))
    served = bytes([data[0] ^ 0xFF]) + data[1:]

    with pytest.raises(ArtifactError, match=f"sha256 {sha(served)} .* lock's {art.sha256}"):
        fetch_all([art], cache, **FAST)

    assert [r[2] for r in local_server.requests] == ["bytes=1000-", None]
    assert leftovers(cache) == []
    assert entries(cache) == []


class _NoRangeServer:
    """A server that ignores Range (always 200, the whole file); its first answer is cut."""

    def __init__(self, data: bytes, cut_after: int) -> None:
        self.ranges: list[str | None] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_: object) -> None:
                pass

            def do_GET(self) -> None:
                outer.ranges.append(self.headers.get("Range"))
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if len(outer.ranges) == 1:
                    self.wfile.write(data[:cut_after])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host!s}:{port}"


@pytest.fixture
def no_range_server() -> Iterator[tuple[_NoRangeServer, bytes]]:
    data = os.urandom(300_000)
    server = _NoRangeServer(data, cut_after=100_000)
    server.thread.start()
    yield server, data
    server.httpd.shutdown()
    server.httpd.server_close()


def test_server_ignoring_range_falls_back_to_a_full_download(
    no_range_server: tuple[_NoRangeServer, bytes], cache: Cache
) -> None:
    server, data = no_range_server
    art = Artifact("norange", "1.0", "norange.bin", f"{server.url}/norange.bin", sha(data))
    got = fetch_all([art], cache, **FAST)
    assert got[art.sha256].read_bytes() == data
    assert server.ranges == [None, "bytes=100000-"]


# -- retries and failures --------------------------------------------------------------------


@pytest.mark.parametrize("status", [503, 500, 429])
def test_transient_status_twice_then_success(
    local_server: LocalServer, cache: Cache, status: int
) -> None:
    data = os.urandom(5000)
    art = publish(local_server, "retry", data)
    local_server.fail(url_path(art), Fault(status=status, times=2))
    got = fetch_all([art], cache, retries=2, **FAST)
    assert got[art.sha256].read_bytes() == data
    assert local_server.count(url_path(art)) == 3


def test_retries_run_out(local_server: LocalServer, cache: Cache) -> None:
    art = publish(local_server, "down", b"data")
    local_server.fail(url_path(art), Fault(status=503, times=-1))
    with pytest.raises(FetchError) as err:
        fetch_all([art], cache, retries=2, **FAST)
    assert str(err.value) == f"cannot fetch {art.url}: HTTP 503 Service Unavailable (after 3 tries)"
    assert local_server.count(url_path(art)) == 3
    assert leftovers(cache) == []


@pytest.mark.parametrize("status", [404, 403])
def test_not_found_fails_at_once(local_server: LocalServer, cache: Cache, status: int) -> None:
    art = publish(local_server, "gone", b"data")
    local_server.fail(url_path(art), Fault(status=status, times=-1))
    with pytest.raises(FetchError, match=f"^cannot fetch {art.url}: HTTP {status} ") as err:
        fetch_all([art], cache, retries=5, **FAST)
    assert "tries" not in str(err.value)
    assert local_server.count(url_path(art)) == 1
    assert leftovers(cache) == []


def test_closed_port_names_the_url(cache: Cache) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/files/x-1.0.whl"
    art = Artifact("x", "1.0", "x-1.0.whl", url, "f" * 64)
    with pytest.raises(FetchError) as err:
        fetch_all([art], cache, retries=1, **FAST)
    message = err.value.diagnostics()
    assert message.startswith(f"cannot fetch {url}: cannot connect")
    assert message.endswith("(after 2 tries)")
    assert err.value.exit_code == 9
    assert leftovers(cache) == []


def test_unsupported_scheme(cache: Cache) -> None:
    art = Artifact("x", "1.0", "x.whl", "ftp://example.invalid/x.whl", "f" * 64)
    with pytest.raises(FetchError, match="unsupported URL scheme 'ftp'"):
        fetch_all([art], cache, **FAST)


def test_first_failure_stops_the_others_and_removes_their_partials(
    local_server: LocalServer, cache: Cache
) -> None:
    """One 404 among slow downloads and one retrying forever with a long backoff: the fetch
    ends with the 404, soon, and leaves no partial file and none of the slow files behind."""
    slow = [publish(local_server, f"slow{i}", os.urandom(400_000)) for i in range(3)]
    slow_paths = {url_path(a): (local_server.root / url_path(a).lstrip("/")) for a in slow}

    def trickle(path: str, _headers: dict[str, str]) -> tuple[int, dict[str, str], bytes] | None:
        if path in slow_paths:
            time.sleep(0.5)
            return 200, {}, slow_paths[path].read_bytes()
        return None

    local_server.route("/files/slow", trickle)
    stuck = publish(local_server, "stuck", b"never")
    local_server.fail(url_path(stuck), Fault(status=503, times=-1))
    missing = publish(local_server, "missing", b"gone")
    local_server.fail(url_path(missing), Fault(status=404, times=-1))

    started = time.monotonic()
    with pytest.raises(FetchError, match="HTTP 404"):
        fetch_all([*slow, stuck, missing], cache, jobs=8, retries=10, backoff=30, progress=False)
    elapsed = time.monotonic() - started

    assert elapsed < 5  # the stuck one would back off for 30 s, the slow ones answer at 0.5 s
    assert local_server.count(url_path(stuck)) == 1
    assert leftovers(cache) == []
    assert entries(cache) == []


# -- the cache's place ------------------------------------------------------------------------


def test_cache_root_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "elsewhere"))
    digest = "ab" + "0" * 62
    assert Cache().path(digest) == tmp_path / "elsewhere" / "sha256" / "ab" / digest
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert Cache().root == tmp_path / "home" / ".cache" / "airgap-appliance"
