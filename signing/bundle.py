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
from signing.errors import FormatError, PayloadError
from signing.manifest import BundleManifest, Entry, check_relative_path
from signing.tarstream import MemberHeader, ReadableStream, TarReader

FORMAT_MEMBER: Final = "format"
FORMAT_MAGIC: Final = b"airgap-appliance-bundle 1\n"
MANIFEST_MEMBER: Final = "manifest.json"
SIGNATURES_MEMBER: Final = "signatures.json"
PAYLOAD_PREFIX: Final = "payload/"


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


@runtime_checkable
class CopySink(Protocol):
    """A sink that moves payload bytes from the bundle itself (a kernel copy, step I5) and
    hands back the bytes as it stored them, to be hashed."""

    def begin(self, entry: Entry) -> None: ...

    def take(self, tar: TarReader, length: int) -> memoryview:
        """Store the member's next bytes, at most ``length``, moving them with
        :meth:`TarReader.transfer`; return exactly the bytes stored, read back, for hashing.

        The view is valid until the next call.
        """

    def end(self, entry: Entry) -> None:
        """The entry's bytes all arrived and matched their signed sha256."""


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
    sink: PayloadSink | CopySink,
    *,
    limits: Limits,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Steps V6 to V9: each member must be the next entry; hash it while the sink stores it.

    A :class:`CopySink` moves the data bytes itself; every header, the padding and the end of
    the archive are still read and checked here, by the same strict reader, in the same order.
    """
    entries = manifest.entries
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
        _stream_member(tar, entry, sink, limits=limits, progress=progress)
    header = tar.next_header()
    if header is not None:
        _check_member_name(header, expected=None, position=len(entries), names=names, seen=seen)
    tar.finish()


def open_bundle(stream: ReadableStream, limits: Limits) -> TarReader:
    return TarReader(stream, max_trailing_bytes=limits.max_trailing_bytes)


def _stream_member(
    tar: TarReader,
    entry: Entry,
    sink: PayloadSink | CopySink,
    *,
    limits: Limits,
    progress: Callable[[int], None] | None,
) -> None:
    digest = hashlib.sha256()
    sink.begin(entry)
    remaining = entry.size
    if isinstance(sink, CopySink):
        while remaining:
            stored = sink.take(tar, remaining)
            length = len(stored)
            if not 0 < length <= remaining:  # pragma: no cover - a broken sink
                raise RuntimeError(f"sink took {length} bytes of {remaining}")
            digest.update(stored)
            remaining -= length
            if progress is not None:
                progress(length)
    else:
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
    if actual != entry.sha256:
        raise PayloadError(
            f"bundle: member {quote(PAYLOAD_PREFIX + entry.path)} sha256 mismatch "
            f"(manifest {entry.sha256[:16]}..., payload {actual[:16]}...)"
        )
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
