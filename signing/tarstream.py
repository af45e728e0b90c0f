"""A strict, sequential reader of POSIX ustar archives (docs/bundle-format.md, section 1).

Why not :mod:`tarfile`: it applies pax and GNU long-name overrides silently, follows links on
extraction, accepts base-256 and signed checksums, and reads ahead. A bundle needs the opposite:
every header is checked as it arrives, anything but a plain regular file is named and refused,
and nothing is read past what the caller asked for. This module does no file system I/O; it
reads from any binary stream and raises :class:`~signing.errors.FormatError` on anything odd.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Protocol

from signing.bounded import quote
from signing.errors import FormatError

BLOCK: Final = 512
_ZERO_BLOCK: Final = bytes(BLOCK)
_USTAR_MAGIC: Final = b"ustar\x0000"
_TYPE_NAMES: Final = {
    b"1": "hard link",
    b"2": "symbolic link",
    b"3": "character device",
    b"4": "block device",
    b"5": "directory",
    b"6": "fifo",
    b"7": "contiguous file",
    b"x": "pax extended header",
    b"g": "pax global header",
    b"L": "GNU long name",
    b"K": "GNU long link name",
    b"S": "GNU sparse file",
    b"V": "GNU volume label",
}


class ReadableStream(Protocol):
    def readinto(self, buffer: memoryview, /) -> int | None: ...


@dataclass(frozen=True)
class MemberHeader:
    """A validated header of a regular-file member."""

    index: int
    name: str
    size: int
    data_offset: int

    @property
    def padded_size(self) -> int:
        return padded(self.size)


def padded(size: int) -> int:
    """Bytes a member of ``size`` data bytes occupies, rounded up to whole blocks."""
    return -(-size // BLOCK) * BLOCK


class TarReader:
    """Reads headers and data in order, never seeking, never reading ahead."""

    def __init__(self, stream: ReadableStream, *, max_trailing_bytes: int) -> None:
        self._stream = stream
        self._max_trailing = max_trailing_bytes
        self._offset = 0
        self._index = 0
        self._block = bytearray(BLOCK)
        self._pending: MemberHeader | None = None
        self._remaining = 0

    @property
    def offset(self) -> int:
        """Bytes consumed from the stream so far."""
        return self._offset

    def next_header(self) -> MemberHeader | None:
        """Return the next member's header, or None at the end-of-archive marker."""
        if self._remaining:
            raise RuntimeError("next_header() called before the current member was read")
        if self._pending is not None:
            self._skip_padding(self._pending)
            self._pending = None
        block = memoryview(self._block)
        self._read_exact(block, what=f"header of member {self._index}")
        if block == _ZERO_BLOCK:
            self._read_exact(block, what="end-of-archive marker")
            if block != _ZERO_BLOCK:
                raise FormatError(f"bundle: lone zero block before member {self._index}")
            return None
        header = self._parse_header(bytes(block))
        self._pending = header
        self._remaining = header.size
        self._index += 1
        return header

    def read_into(self, buffer: memoryview) -> None:
        """Fill ``buffer`` with the next bytes of the current member's data."""
        if len(buffer) > self._remaining:
            raise RuntimeError("read past the end of the current member")
        name = self._pending.name if self._pending else "?"
        self._read_exact(buffer, what=f"member {quote(name)}")
        self._remaining -= len(buffer)

    def transfer(self, length: int, move: Callable[[int], int]) -> None:
        """Let ``move`` take the next ``length`` bytes of the current member's data itself.

        For a caller that moves data without reading it into Python (a kernel copy from the
        bundle file, docs/bundle-format.md step I5): ``move(n)`` must take at most ``n`` bytes
        from the stream's current position, advance that position by what it took, and return
        that count, 0 at the end of the stream. The accounting and the truncation check are
        those of :meth:`read_into`, so the headers and padding that follow are read from the
        right place and a short bundle fails with the same error.
        """
        if length > self._remaining:
            raise RuntimeError("read past the end of the current member")
        name = self._pending.name if self._pending else "?"
        got = 0
        try:
            while got < length:
                n = move(length - got)
                if n <= 0:
                    raise FormatError(
                        f"bundle: truncated in member {quote(name)} (at byte {self._offset + got})"
                    )
                if n > length - got:
                    raise RuntimeError(f"moved {n} bytes, asked for at most {length - got}")
                got += n
        finally:
            # What was moved is consumed, even when ``move`` failed half-way.
            self._offset += got
            self._remaining -= got

    def read_member(self, header: MemberHeader) -> bytes:
        """Read a whole (small, already size-checked) member's data."""
        data = bytearray(header.size)
        self.read_into(memoryview(data))
        return bytes(data)

    def finish(self) -> None:
        """After the end marker, allow only zero padding (bounded), then end of stream."""
        chunk = bytearray(64 * 1024)
        view = memoryview(chunk)
        seen = 0
        while True:
            n = self._stream.readinto(view) or 0
            if n == 0:
                return
            seen += n
            if seen > self._max_trailing or view[:n] != bytes(n):
                raise FormatError("bundle: data after the end-of-archive marker")

    def _skip_padding(self, header: MemberHeader) -> None:
        pad = header.padded_size - header.size
        if pad:
            view = memoryview(self._block)[:pad]
            self._read_exact(view, what=f"padding of member {quote(header.name)}")
            if view != bytes(pad):
                raise FormatError(f"bundle: non-zero padding after member {quote(header.name)}")

    def _read_exact(self, buffer: memoryview, *, what: str) -> None:
        got = 0
        size = len(buffer)
        while got < size:
            n = self._stream.readinto(buffer[got:]) or 0
            if n == 0:
                raise FormatError(f"bundle: truncated in {what} (at byte {self._offset + got})")
            got += n
        self._offset += size

    def _parse_header(self, block: bytes) -> MemberHeader:
        where = f"member {self._index}"
        stored = _parse_octal(block[148:156], what=f"{where} checksum")
        computed = sum(block[:148]) + 8 * 0x20 + sum(block[156:])
        if stored != computed:
            raise FormatError(f"bundle: bad header checksum in {where}")
        # The type is judged before the magic, so that a GNU or pax extension header is named
        # as such, whatever magic its writer used.
        typeflag = block[156:157]
        if typeflag not in (b"0", b"\x00"):
            kind = _TYPE_NAMES.get(typeflag, f"type {typeflag!r}")
            label = _display_name(block)
            raise FormatError(f"bundle: member {label} is a {kind}; only regular files allowed")
        if block[257:265] != _USTAR_MAGIC:
            raise FormatError(f"bundle: {where} is not a POSIX ustar header")
        name = _parse_name(block, where=where)
        if block[157:257] != bytes(100):
            raise FormatError(f"bundle: member {quote(name)} has a link name")
        size = _parse_octal(block[124:136], what=f"size of member {quote(name)}")
        return MemberHeader(index=self._index, name=name, size=size, data_offset=self._offset)


def _parse_name(block: bytes, *, where: str) -> str:
    raw_name = _nul_terminated(block[0:100], what=f"{where} name")
    prefix = _nul_terminated(block[345:500], what=f"{where} name prefix")
    raw = prefix + b"/" + raw_name if prefix else raw_name
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise FormatError(f"bundle: {where} name is not UTF-8") from None


def _display_name(block: bytes) -> str:
    """The member's name for an error message, however malformed the header is."""
    raw = block[0:100].split(b"\x00", 1)[0]
    return quote(raw.decode("utf-8", "replace"))


def _nul_terminated(field: bytes, *, what: str) -> bytes:
    value, _, rest = field.partition(b"\x00")
    if rest.strip(b"\x00"):
        raise FormatError(f"bundle: {what} has data after its terminator")
    return value


def _parse_octal(field: bytes, *, what: str) -> int:
    if field[:1] and field[0] & 0x80:
        raise FormatError(f"bundle: {what} uses base-256 encoding")
    digits = field.rstrip(b"\x00 ").lstrip(b" ")
    if not digits or any(c not in b"01234567" for c in digits):
        raise FormatError(f"bundle: {what} is not an octal number")
    return int(digits, 8)
