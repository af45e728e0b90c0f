"""Chunk hashes: a large payload file is checked as independent 64 MiB pieces (pure core).

A sha256 is one sequential chain: a 40 GB model hashed as one stream runs at one core's speed
however many cores the host has. The manifest therefore gives every entry larger than
:data:`CHUNK_BYTES` a list of sha256 digests, one per 64 MiB of the file (the last piece
shorter), beside the whole-file sha256 that model hubs and deltas name the file by
(docs/bundle-format.md, section 2.1; docs/adr/0022-chunk-hashes.md). The host checks the
pieces, on every core at once (appliance.hashpool); the signed list binds every byte as the
whole-file digest does, and a mismatch names the region that is bad.

This module only says which byte ranges are checked against which digest (:class:`HashJob`),
computes both kinds of digest in one pass for the builder (:class:`ChunkedDigest`), and words
the refusal. It reads no file.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from signing.bounded import quote

if TYPE_CHECKING:
    from signing.manifest import Entry

# Large enough that a job's set-up is noise next to its hashing (64 MiB is about 40 ms on one
# core with SHA-NI) and a 1 TB file lists 16,384 digests (1.1 MB of manifest); small enough
# that 2 to 128 cores get work from one multi-GB file, and that a bad region is named closely.
CHUNK_BYTES: Final = 64 << 20


def chunk_count(size: int) -> int:
    """How many digests an entry of ``size`` bytes lists: 0 up to one chunk, else one a chunk."""
    return 0 if size <= CHUNK_BYTES else -(-size // CHUNK_BYTES)


@dataclass(frozen=True)
class HashJob:
    """One byte range of an entry and the digest it must have: a whole small file, or one
    chunk of a large one (``index`` of ``count``; ``count`` is 0 for a whole file)."""

    member: str  # the tar member, for messages: "payload/<entry path>"
    offset: int
    length: int
    expected: str
    index: int = 0
    count: int = 0

    def mismatch(self, actual: str) -> str:
        """The refusal, one line; for a whole file exactly the message of a sequential hash."""
        member = quote(self.member)
        if self.count == 0:
            return (
                f"bundle: member {member} sha256 mismatch "
                f"(manifest {self.expected[:16]}..., payload {actual[:16]}...)"
            )
        end = self.offset + self.length
        return (
            f"bundle: member {member} sha256 mismatch in bytes {self.offset}..{end} "
            f"(chunk {self.index + 1} of {self.count}; manifest {self.expected[:16]}..., "
            f"payload {actual[:16]}...)"
        )


def hash_jobs(entry: Entry, *, member: str) -> list[HashJob]:
    """The ranges an entry (tar member ``member``) is checked in, in file order: its chunks,
    or the whole file."""
    if not entry.chunks:
        return [HashJob(member=member, offset=0, length=entry.size, expected=entry.sha256)]
    count = len(entry.chunks)
    return [
        HashJob(
            member=member,
            offset=i * CHUNK_BYTES,
            length=min(CHUNK_BYTES, entry.size - i * CHUNK_BYTES),
            expected=digest,
            index=i,
            count=count,
        )
        for i, digest in enumerate(entry.chunks)
    ]


class ChunkedDigest:
    """The whole-file sha256 and the chunk digests of one stream of bytes, in one pass."""

    def __init__(self) -> None:
        self._whole = hashlib.sha256()
        self._chunk = hashlib.sha256()
        self._in_chunk = 0
        self._size = 0
        self._chunks: list[str] = []

    def update(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        self._whole.update(view)
        self._size += len(view)
        while view:
            take = min(len(view), CHUNK_BYTES - self._in_chunk)
            self._chunk.update(view[:take])
            self._in_chunk += take
            view = view[take:]
            if self._in_chunk == CHUNK_BYTES:
                self._chunks.append(self._chunk.hexdigest())
                self._chunk = hashlib.sha256()
                self._in_chunk = 0

    @property
    def size(self) -> int:
        return self._size

    def hexdigest(self) -> str:
        return self._whole.hexdigest()

    def chunks(self) -> tuple[str, ...]:
        """The chunk digests: none for a file of at most one chunk."""
        if self._size <= CHUNK_BYTES:
            return ()
        tail = [self._chunk.hexdigest()] if self._in_chunk else []
        return (*self._chunks, *tail)
