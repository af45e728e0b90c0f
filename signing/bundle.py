"""Reading a bundle: the size-bounded head, then one pass over the payload (pure core).

This module turns a byte stream into verified facts and never touches the file system: where
payload bytes go is the business of a :class:`PayloadSink` (the installer writes them into a
staging slot, ``verify`` discards them). Step numbers refer to docs/bundle-format.md.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Protocol, runtime_checkable

from signing.bounded import quote
from signing.chunks import HashJob, hash_jobs
from signing.errors import FormatError, PayloadError
from signing.manifest import BundleManifest, Entry, check_relative_path
from signing.tarstream import MemberHeader, ReadableStream, TarReader

FORMAT_MEMBER: Final = "format"
PAYLOAD_PREFIX: Final = "payload/"
FORMAT_MAGIC: Final = b"airgap-appliance-bundle 1\n"
MANIFEST_MEMBER: Final = "manifest.json"
SIGNATURES_MEMBER: Final = "signatures.json"


@dataclass(frozen=True)
class Limits:
    """Every bound the reader enforces, in one place (as python-tuf's UpdaterConfig)."""

    max_manifest_bytes: int = 16 << 20
    max_signature_bytes: int = 1 << 20
    max_trailing_bytes: int = 1 << 20
    # 256 KiB chunks stay in cache between hashing and writing; 8 of them in flight.
    chunk_bytes: int = 256 << 10
    buffers: int = 8
    # Install from a bundle file: the kernel copies this much of a member at a time into the
    # staged file, which is then read back in chunks and hashed (step I5, ADR 0008). 0 keeps
    # a bundle file on the streaming path (read, hash, write on a thread), as a pipe is.
    copy_window_bytes: int = 8 << 20
    # Threads that hash payload ranges where they lie (appliance.hashpool); 0: one per core.
    hash_threads: int = 0


@dataclass(frozen=True)
class BundleHead:
    """The signed part of a bundle, as raw bytes, not yet verified."""

    manifest_bytes: bytes
    signature_block: bytes
    signature_offset: int


class PayloadSink(Protocol):
    """Where verified-as-it-goes payload bytes end up."""

    def buffer(self) -> bytearray:
        """A free buffer of at least one chunk; may block until one is returned."""

    def begin(self, entry: Entry) -> None: ...

    def write(self, buffer: bytearray, length: int) -> None:
        """Take ``buffer[:length]``; the sink owns the buffer until it hands it out again."""

    def end(self, entry: Entry) -> None:
        """The entry's bytes all arrived and matched their signed sha256."""


@dataclass(frozen=True)
class Segment:
    """Where placed bytes can be read back: ``length`` bytes at ``offset`` of descriptor
    ``fd``, which the segment owns (a duplicate; :class:`ChunkHasher` closes it)."""

    fd: int
    offset: int
    length: int


@runtime_checkable
class RangeSink(Protocol):
    """A sink that puts payload bytes in place itself (a kernel copy into staging, step I5, or
    past them in the bundle file, for verify) and says where they can be read back, so that
    they are hashed on every core (:class:`ChunkHasher`) rather than in the reading thread."""

    def begin(self, entry: Entry) -> None: ...

    def place(
        self, tar: TarReader, length: int, progress: Callable[[int], None] | None
    ) -> list[Segment]:
        """Put the member's next ``length`` bytes in place, moving them with
        :meth:`TarReader.transfer` (``progress`` hears of each window moved); return where
        they now lie, in order."""

    def end(self, entry: Entry, settled: Callable[[], bool]) -> None:
        """All of the entry's bytes are in place; ``settled`` waits for their hashes (and all
        before them) and says whether they matched."""


class ChunkHasher(Protocol):
    """Hashes placed ranges on other threads; raises the first failure in stream order."""

    def submit(self, job: HashJob, segments: list[Segment]) -> Callable[[], bool]:
        """Check ``segments`` (together ``job.length`` bytes) against ``job.expected``; may
        block while enough work is in flight. Raises an earlier job's failure, if any.

        Returns a wait for this job and every one before it: True if all of them matched.
        """

    def drain(self) -> None:
        """Wait for every job; raise the first failure in stream order."""

    def first_failure(self) -> PayloadError | None:
        """Wait for every job; the first failure in stream order, if any."""


class DiscardSink:
    """A sink for verification only: hashes are checked, bytes go nowhere."""

    def __init__(self, chunk_bytes: int) -> None:
        self._buffer = bytearray(chunk_bytes)

    def buffer(self) -> bytearray:
        return self._buffer

    def begin(self, entry: Entry) -> None:
        pass

    def write(self, buffer: bytearray, length: int) -> None:
        pass

    def end(self, entry: Entry) -> None:
        pass


def read_head(tar: TarReader, limits: Limits) -> BundleHead:
    """Steps V1 to V3: the format marker, the manifest and the signature block, size-bounded."""
    header = _expect_member(tar, FORMAT_MEMBER, max_size=len(FORMAT_MAGIC))
    if tar.read_member(header) != FORMAT_MAGIC:
        raise FormatError("bundle: unknown format marker (not an airgap-appliance bundle v1)")
    header = _expect_member(tar, MANIFEST_MEMBER, max_size=limits.max_manifest_bytes)
    manifest_bytes = tar.read_member(header)
    header = _expect_member(tar, SIGNATURES_MEMBER, max_size=limits.max_signature_bytes)
    signature_block = tar.read_member(header)
    return BundleHead(
        manifest_bytes=manifest_bytes,
        signature_block=signature_block,
        signature_offset=header.data_offset,
    )


def stream_payload(
    tar: TarReader,
    manifest: BundleManifest,
    sink: PayloadSink | RangeSink,
    *,
    limits: Limits,
    progress: Callable[[int], None] | None = None,
    hasher: ChunkHasher | None = None,
) -> None:
    """Steps V6 to V9: each member must be the next entry; hash it while the sink stores it.

    A :class:`RangeSink` with a ``hasher`` puts the data bytes in place itself, and every
    range of :func:`signing.chunks.hash_jobs` is hashed on another thread; every header, the
    padding and the end of the archive are still read and checked here, by the same strict
    reader, in the same order. The refusals are those of a sequential pass: when the reader
    refuses the stream, a bad hash of a member before that point is reported instead, as a
    sequential pass would have stopped there first.
    """
    if isinstance(sink, RangeSink) and hasher is not None:
        try:
            _stream_members(tar, manifest, sink, limits=limits, progress=progress, hasher=hasher)
        except (FormatError, PayloadError) as exc:
            earlier = hasher.first_failure()
            if earlier is not None and earlier is not exc:
                raise earlier from None
            raise
        hasher.drain()
        return
    _stream_members(tar, manifest, sink, limits=limits, progress=progress, hasher=None)


def _stream_members(
    tar: TarReader,
    manifest: BundleManifest,
    sink: PayloadSink | RangeSink,
    *,
    limits: Limits,
    progress: Callable[[int], None] | None,
    hasher: ChunkHasher | None,
) -> None:
    entries = manifest.carried_entries  # a delta's others come from its base slot
    names = {PAYLOAD_PREFIX + e.path: i for i, e in enumerate(entries)}
    seen: set[str] = set()
    for position, entry in enumerate(entries):
        expected = PAYLOAD_PREFIX + entry.path
        header = tar.next_header()
        if header is None:
            raise PayloadError(
                f"bundle: manifest entry {quote(entry.path)} is missing from the payload"
            )
        _check_member_name(header, expected=expected, position=position, names=names, seen=seen)
        seen.add(header.name)
        if header.size != entry.size:
            raise PayloadError(
                f"bundle: member {quote(header.name)} declares {header.size} bytes, "
                f"manifest says {entry.size}"
            )
        if hasher is not None and isinstance(sink, RangeSink):
            _place_member(tar, entry, sink, progress=progress, hasher=hasher)
        else:
            _stream_member(tar, entry, sink, limits=limits, progress=progress)
    header = tar.next_header()
    if header is not None:
        _check_member_name(header, expected=None, position=len(entries), names=names, seen=seen)
    tar.finish()


def open_bundle(stream: ReadableStream, limits: Limits) -> TarReader:
    return TarReader(stream, max_trailing_bytes=limits.max_trailing_bytes)


def _place_member(
    tar: TarReader,
    entry: Entry,
    sink: RangeSink,
    *,
    progress: Callable[[int], None] | None,
    hasher: ChunkHasher,
) -> None:
    sink.begin(entry)
    settled = None
    for job in hash_jobs(entry, member=PAYLOAD_PREFIX + entry.path):
        settled = hasher.submit(job, sink.place(tar, job.length, progress))
    assert settled is not None  # noqa: S101 - hash_jobs gives every entry at least one job
    sink.end(entry, settled)


def _stream_member(
    tar: TarReader,
    entry: Entry,
    sink: PayloadSink | RangeSink,
    *,
    limits: Limits,
    progress: Callable[[int], None] | None,
) -> None:
    """One member through the reading thread: read, hash, hand to the sink (a pipe)."""
    if isinstance(sink, RangeSink):  # pragma: no cover - stream_payload gives it a hasher
        raise TypeError("a RangeSink needs a ChunkHasher")
    jobs = hash_jobs(entry, member=PAYLOAD_PREFIX + entry.path)
    sink.begin(entry)
    for job in jobs:
        digest = hashlib.sha256()
        remaining = job.length
        while remaining:
            buffer = sink.buffer()
            length = min(remaining, limits.chunk_bytes, len(buffer))
            view = memoryview(buffer)[:length]
            tar.read_into(view)
            # hashlib releases the GIL on large updates, so this overlaps the sink's writing.
            digest.update(view)
            sink.write(buffer, length)
            remaining -= length
            if progress is not None:
                progress(length)
        actual = digest.hexdigest()
        if actual != job.expected:
            raise PayloadError(job.mismatch(actual))
    sink.end(entry)


def _expect_member(tar: TarReader, name: str, *, max_size: int) -> MemberHeader:
    header = tar.next_header()
    if header is None:
        raise FormatError(f"bundle: ended before its {quote(name)} member")
    if header.name != name:
        raise FormatError(f"bundle: expected member {quote(name)}, found {quote(header.name)}")
    if header.size > max_size:
        raise FormatError(f"bundle: member {quote(name)} is {header.size} bytes, limit {max_size}")
    return header


def _check_member_name(
    header: MemberHeader,
    *,
    expected: str | None,
    position: int,
    names: dict[str, int],
    seen: set[str],
) -> None:
    name = header.name
    if name == expected:
        return
    check_relative_path(name, what="bundle member")
    if name in seen:
        raise PayloadError(f"bundle: duplicate member {quote(name)}")
    if name not in names:
        raise PayloadError(f"bundle: member {quote(name)} is not in the manifest")
    if expected is None:  # pragma: no cover - every listed name was seen by then
        raise PayloadError(f"bundle: member {quote(name)} after the last manifest entry")
    raise PayloadError(
        f"bundle: member {quote(name)} out of order (expected {quote(expected)}; "
        f"entry {position} missing or members reordered)"
    )
