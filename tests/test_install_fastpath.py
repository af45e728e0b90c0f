"""Step I5's two data paths (docs/bundle-format.md, docs/adr/0008-install-copy-path.md).

A bundle given as a regular file is installed by ``CopyingSink``: the kernel copies each
member's data into the staged file (``copy_file_range``, else ``sendfile``, else plain
``read``/``write``) and the staged bytes are read back and hashed; a pipe (``install -``) goes
through ``StagingSink``. These tests check that the right path is taken, that every fallback
stores exactly the signed bytes, that the refusals and their messages are those of the
streaming path, and that abort semantics, progress and the strict reader's accounting hold.
tests/test_attacks.py runs every attack through both paths.
"""

from __future__ import annotations

import dataclasses
import errno
import io
import os
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from simulator import Host, from_pipe, header_offsets

from appliance import staging
from appliance.installer import Appliance, InstallOptions
from appliance.staging import CopyingSink, StagingSink
from signing.bundle import Limits, open_bundle, read_head
from signing.errors import FormatError, PayloadError
from signing.tarstream import BLOCK, TarReader

OPTIONS = InstallOptions(skip_health_check=True)
# Small windows and chunks, so a member spans several windows and each window several chunks.
SMALL = Limits(chunk_bytes=1024, copy_window_bytes=3000)
FILES = {
    "model/a.bin": os.urandom(10_000) + b"end",
    "model/b.bin": os.urandom(5000),
    "model/empty.bin": b"",
    "recipe.toml": b'name = "demo"\n',
}
MODES = ["copy_file_range", "sendfile", "read/write"]


# -- harness ----------------------------------------------------------------------------------


class Spy:
    """Records which sink each install used, and how it finally copied."""

    def __init__(self) -> None:
        self.sinks: list[StagingSink | CopyingSink] = []

    @property
    def kinds(self) -> list[str]:
        return [type(s).__name__ for s in self.sinks]

    @property
    def modes(self) -> list[str]:
        return [s.mode for s in self.sinks if isinstance(s, CopyingSink)]


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> Spy:
    recorder = Spy()
    original = staging.payload_sink

    def recording(payload_dir: Path, stream: io.FileIO, limits: Limits) -> Any:
        sink = original(payload_dir, stream, limits)
        recorder.sinks.append(sink)
        return sink

    monkeypatch.setattr(staging, "payload_sink", recording)
    return recorder


def force_mode(monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    """Make the kernel refuse the copies above ``mode``, as another file system would."""

    def refuse(code: int) -> Callable[..., int]:
        def refused(*_: object, **__: object) -> int:
            raise OSError(code, os.strerror(code))

        return refused

    if mode in ("sendfile", "read/write"):
        monkeypatch.setattr(os, "copy_file_range", refuse(errno.EXDEV))
    if mode == "read/write":
        monkeypatch.setattr(os, "sendfile", refuse(errno.EINVAL))


def install(host: Host, data: bytes, *, limits: Limits | None = None, source: str = "file") -> Any:
    app = Appliance(host.root, limits=limits)
    if source == "pipe":
        return from_pipe(data, lambda: app.install("-", OPTIONS))
    return app.install(str(host.write(data)), OPTIONS)


def refusal(host: Host, data: bytes, *, limits: Limits | None = None, source: str = "file") -> str:
    """Install ``data``: it must be refused, leave nothing staged, and be audited."""
    before = host.snapshot()
    with pytest.raises((FormatError, PayloadError)) as info:
        install(host, data, limits=limits, source=source)
    assert host.snapshot() == before
    assert host.staging_entries() == []
    record = host.last_audit()
    assert (record["event"], record["outcome"]) == ("install", "refused")
    return f"{type(info.value).__name__}: {info.value}"


@pytest.fixture
def bundle(host: Host) -> bytes:
    return host.sim.bundle("1.0.0", files=FILES)


# -- which path, and what it stores -------------------------------------------------------------


@pytest.mark.parametrize("limits", [None, SMALL], ids=["default", "small-windows"])
@pytest.mark.parametrize("mode", MODES)
def test_file_installs_through_the_kernel_copy(
    host: Host, bundle: bytes, spy: Spy, *, monkeypatch: pytest.MonkeyPatch, mode: str, limits: Any
) -> None:
    force_mode(monkeypatch, mode)
    slot = install(host, bundle, limits=limits)
    assert spy.kinds == ["CopyingSink"]
    assert spy.modes == [mode]
    assert host.active_payload() == FILES
    assert slot.version == "1.0.0"
    for path in FILES:
        assert (host.root / "current" / "payload" / path).stat().st_mode & 0o777 == 0o644
    assert host.staging_entries() == []


def test_pipe_installs_through_the_writer_thread(host: Host, bundle: bytes, spy: Spy) -> None:
    install(host, bundle, limits=SMALL, source="pipe")
    assert spy.kinds == ["StagingSink"]
    assert host.active_payload() == FILES


def test_a_regular_file_on_stdin_takes_the_kernel_copy(
    host: Host, bundle: bytes, spy: Spy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``install - < bundle.tar``: standard input is the file itself, not a pipe."""
    path = host.write(bundle)
    with path.open("rb") as fh:
        monkeypatch.setattr(sys, "stdin", fh)
        Appliance(host.root).install("-", OPTIONS)
    assert spy.kinds == ["CopyingSink"]
    assert host.active_payload() == FILES


def test_a_zero_copy_window_keeps_the_streaming_path(host: Host, bundle: bytes, spy: Spy) -> None:
    install(host, bundle, limits=Limits(copy_window_bytes=0))
    assert spy.kinds == ["StagingSink"]
    assert host.active_payload() == FILES


def test_a_bundle_on_another_file_system(host: Host, bundle: bytes, spy: Spy) -> None:
    """A bundle on a tmpfs (a USB stick would be vfat): from Linux 5.19 on, copy_file_range
    refuses to cross file systems (EXDEV) and sendfile copies instead; before, it copies."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK):
        pytest.skip("no writable /dev/shm")
    host.root.mkdir(parents=True, exist_ok=True)
    if shm.stat().st_dev == host.root.stat().st_dev:
        pytest.skip("/dev/shm is on the same file system as the host root")
    path = shm / f"airgap-fastpath-{os.getpid()}.tar"
    try:
        path.write_bytes(bundle)
        Appliance(host.root).install(str(path), OPTIONS)
    finally:
        path.unlink(missing_ok=True)
    assert spy.kinds == ["CopyingSink"]
    assert spy.modes[0] in ("copy_file_range", "sendfile")
    assert host.active_payload() == FILES


def test_a_kernel_copy_that_copies_nothing_falls_back_to_reading(
    host: Host, bundle: bytes, spy: Spy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Some file systems answer copy_file_range with 0 before the end of the file."""
    monkeypatch.setattr(os, "copy_file_range", lambda *_, **__: 0)
    install(host, bundle, limits=SMALL)
    assert spy.modes == ["read/write"]
    assert host.active_payload() == FILES


def test_an_unexpected_copy_error_is_not_a_fallback(
    host: Host, bundle: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing(*_: object, **__: object) -> int:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "copy_file_range", failing)
    before = host.snapshot()
    with pytest.raises(Exception, match="Input/output error"):
        install(host, bundle)
    assert host.snapshot() == before
    assert host.staging_entries() == []
    assert host.last_audit()["outcome"] == "failed"


# -- the same refusals, with the same messages, on every path ----------------------------------


def _cases(sim_bundle: bytes) -> dict[str, bytes]:
    offsets = header_offsets(sim_bundle)
    a_data = offsets[3] + BLOCK  # first payload member: model/a.bin
    b_header = offsets[4]
    return {
        "tampered first byte": _flip(sim_bundle, a_data),
        "tampered byte in a later window": _flip(sim_bundle, a_data + 9000),
        "tampered last byte of a member": _flip(sim_bundle, a_data + 10_002),
        "non-zero padding": _flip(sim_bundle, a_data + 10_003),
        "truncated mid-data": sim_bundle[: a_data + 7000],
        "truncated at a window edge": sim_bundle[: a_data + 3000],
        "truncated before a header": sim_bundle[:b_header],
        "truncated in the end marker": sim_bundle[: len(sim_bundle) - 700],
        "trailing data": sim_bundle + b"junk",
        "trailing zeros beyond the limit": sim_bundle + bytes((1 << 20) + BLOCK),
        "a member dropped": sim_bundle[:b_header] + sim_bundle[offsets[5] :],
    }


def _flip(data: bytes, offset: int) -> bytes:
    return data[:offset] + bytes([data[offset] ^ 0x01]) + data[offset + 1 :]


@pytest.mark.parametrize("limits", [None, SMALL], ids=["default", "small-windows"])
@pytest.mark.parametrize("mode", MODES)
def test_refusals_match_the_streaming_path(
    host: Host, bundle: bytes, monkeypatch: pytest.MonkeyPatch, mode: str, limits: Any
) -> None:
    for name, data in _cases(bundle).items():
        streamed = refusal(host, data, limits=limits, source="pipe")
        with monkeypatch.context() as patch:
            force_mode(patch, mode)
            copied = refusal(host, data, limits=limits)
        assert copied == streamed, name
    assert "truncated in member 'payload/model/a.bin' (at byte" in refusal(
        host, _cases(bundle)["truncated mid-data"]
    )


# -- abort semantics, progress --------------------------------------------------------------


def test_a_refused_member_is_never_fsynced(
    host: Host, bundle: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def recording(fd: int) -> None:
        synced.append(str(Path(f"/proc/self/fd/{fd}").readlink()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording)
    data = _cases(bundle)["tampered byte in a later window"]
    refusal(host, data, limits=SMALL)
    assert [p for p in synced if "/staging/" in p] == []


def test_interrupt_mid_copy_removes_staging(
    host: Host, bundle: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = os.copy_file_range
    calls = 0

    def interrupted(*args: Any, **kwargs: Any) -> int:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(os, "copy_file_range", interrupted)
    before = host.snapshot()
    with pytest.raises(KeyboardInterrupt):
        install(host, bundle, limits=SMALL)
    assert host.snapshot() == before
    assert host.staging_entries() == []
    record = host.last_audit()
    assert (record["outcome"], record["error"]) == ("failed", "interrupted")


def test_the_fsync_thread_leaves_signals_to_the_main_thread(host: Host, bundle: bytes) -> None:
    seen: list[set[int]] = []
    real = staging.leave_signals_to_the_main_thread

    def recording() -> None:
        real()
        seen.append(set(signal.pthread_sigmask(signal.SIG_BLOCK, [])))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(staging, "leave_signals_to_the_main_thread", recording)
        install(host, bundle)
    assert seen and all({signal.SIGINT, signal.SIGTERM} <= s for s in seen)


class Recorder:
    def __init__(self) -> None:
        self.total = -1
        self.advanced: list[int] = []

    def start(self, total: int, description: str) -> None:
        self.total = total

    def advance(self, amount: int) -> None:
        self.advanced.append(amount)


@pytest.mark.parametrize("source", ["file", "pipe"])
def test_progress_counts_every_payload_byte(host: Host, bundle: bytes, source: str) -> None:
    recorder = Recorder()
    app = Appliance(host.root, limits=SMALL)
    if source == "pipe":
        from_pipe(bundle, lambda: app.install("-", OPTIONS, progress=recorder))
    else:
        app.install(str(host.write(bundle)), OPTIONS, progress=recorder)
    assert recorder.total == sum(len(v) for v in FILES.values())
    assert sum(recorder.advanced) == recorder.total
    assert max(recorder.advanced) <= max(SMALL.chunk_bytes, SMALL.copy_window_bytes)


def test_the_copy_sink_holds_one_chunk_whatever_the_window(tmp_path: Path) -> None:
    """Memory: one buffer of ``chunk_bytes`` (for the read/write fallback); the window is
    copied in the kernel."""
    with (tmp_path / "src").open("wb") as fh:
        fh.write(b"x")
    fd = os.open(tmp_path / "src", os.O_RDONLY)
    try:
        sink = CopyingSink(tmp_path / "p", fd, Limits(copy_window_bytes=1 << 30))
        assert len(sink._move_view) == Limits().chunk_bytes
    finally:
        os.close(fd)


# -- the strict reader's side: TarReader.transfer --------------------------------------------


@pytest.fixture
def reader(bundle: bytes) -> Iterator[tuple[TarReader, io.BytesIO]]:
    stream = io.BytesIO(bundle)
    tar = open_bundle(stream, Limits())
    read_head(tar, Limits())
    yield tar, stream


def test_transfer_accounts_like_read_into(reader: tuple[TarReader, io.BytesIO]) -> None:
    tar, stream = reader
    header = tar.next_header()
    assert header is not None and header.name == "payload/model/a.bin"
    moved: list[int] = []

    def move(count: int) -> int:
        n = min(count, 777)
        stream.seek(n, io.SEEK_CUR)
        moved.append(n)
        return n

    tar.transfer(header.size, move)
    assert sum(moved) == header.size
    assert tar.offset == header.data_offset + header.size
    following = tar.next_header()  # padding checked, next header parsed from the right place
    assert following is not None and following.name == "payload/model/b.bin"


def test_transfer_reports_truncation_as_read_into_does(
    reader: tuple[TarReader, io.BytesIO],
) -> None:
    tar, _ = reader
    header = tar.next_header()
    assert header is not None
    with pytest.raises(FormatError) as info:
        tar.transfer(header.size, lambda count: 0)
    assert str(info.value) == (
        f"bundle: truncated in member 'payload/model/a.bin' (at byte {header.data_offset})"
    )


def test_transfer_refuses_to_go_past_the_member(reader: tuple[TarReader, io.BytesIO]) -> None:
    tar, _ = reader
    header = tar.next_header()
    assert header is not None
    with pytest.raises(RuntimeError, match="past the end"):
        tar.transfer(header.size + 1, lambda count: count)
    with pytest.raises(RuntimeError, match="asked for at most"):
        tar.transfer(10, lambda count: count + 1)


# -- verify of a bundle file: hashed in place on every core ----------------------------------


def verify_refusal(host: Host, data: bytes, *, source: str, limits: Limits | None = None) -> str:
    app = Appliance(host.root, limits=limits)
    with pytest.raises((FormatError, PayloadError)) as info:
        if source == "pipe":
            from_pipe(data, lambda: app.verify("-"))
        else:
            app.verify(str(host.write(data)))
    return f"{type(info.value).__name__}: {info.value}"


@pytest.mark.parametrize("threads", [1, 2, 5])
def test_verify_hashes_a_file_in_place_and_refuses_as_the_pipe_does(
    host: Host, bundle: bytes, monkeypatch: pytest.MonkeyPatch, threads: int
) -> None:
    used: list[str] = []
    real = staging.verify_sink

    def recording(stream: io.FileIO, limits: Limits) -> Any:
        manager = real(stream, limits)
        sink = manager.__enter__()
        used.append(type(sink).__name__)
        manager.__exit__(None, None, None)
        return real(stream, limits)

    monkeypatch.setattr(staging, "verify_sink", recording)
    limits = dataclasses.replace(SMALL, hash_threads=threads)
    verified = Appliance(host.root, limits=limits).verify(str(host.write(bundle)))
    assert verified.manifest.name == "demo"
    for name, data in _cases(bundle).items():
        streamed = verify_refusal(host, data, source="pipe", limits=limits)
        assert verify_refusal(host, data, source="file", limits=limits) == streamed, name
    assert set(used) == {"InPlaceSink", "DiscardSink"}
