"""The part index of a split bundle (docs/bundle-format.md, section 10) (pure core).

A split bundle is the bundle's bytes cut into numbered parts (``bundle.tar.001``, ...), plus
optional erasure-coded parity parts (``bundle.tar.p001``, ...; :mod:`signing.parity`), plus
this index (``bundle.tar.parts.json``, canonical JSON). The builder writes the index
(builder/split.py) and the host reads it (appliance/parts.py) through this one module, so the
two cannot drift apart.

The index is not signed. Its trust comes from the signed head: it names the sha256 of the
bundle's manifest, which the host compares with the manifest it verified against its trusted
root, and every payload byte is still checked against that manifest. The index decides only
*which part to blame* and *what to rebuild*; it can never make the host accept a byte
(docs/adr/0015-split-bundles.md argues this).

Parsing is strict and total, like the manifest's: anything odd is a
:class:`~signing.errors.FormatError` naming the field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final

from signing.bounded import quote
from signing.canonical import decode_canonical, encode_canonical, exact_fields, is_int
from signing.errors import FormatError

INDEX_TYPE: Final = "bundle-parts"
INDEX_VERSION: Final = 1
INDEX_SUFFIX: Final = ".parts.json"
PARITY_SCHEME: Final = "zfec"
MAX_INDEX_BYTES: Final = 1 << 20
# zfec codes at most 256 blocks per stripe: data parts and parity parts together.
MAX_PARTS: Final = 256
MIN_STRIPE_BYTES: Final = 4 << 10
MAX_STRIPE_BYTES: Final = 16 << 20

_SHA256_RE: Final = re.compile(r"[0-9a-f]{64}")
# A part's file name: one path component, portable to FAT32, ISO 9660 (Joliet) and UDF.
_FILE_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
_LABEL_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+!_-]{0,63}")


def part_file(bundle_file: str, number: int, count: int, *, parity: bool = False) -> str:
    """``bundle.tar.001`` (or ``bundle.tar.p001`` for parity): at least three digits, as
    many as the count needs, so that the names sort in order."""
    width = max(3, len(str(count)))
    return f"{bundle_file}.{'p' if parity else ''}{number:0{width}d}"


@dataclass(frozen=True)
class PartEntry:
    """One part file: its number (from 1), name, size and sha256."""

    number: int
    file: str
    size: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"number": self.number, "file": self.file, "size": self.size, "sha256": self.sha256}


@dataclass(frozen=True)
class Parity:
    """zfec parity over stripes: the data parts are k blocks, the parity parts m - k more.

    Stripe ``t`` holds bytes ``[t * stripe_bytes, (t + 1) * stripe_bytes)`` of every data part
    (zero-padded past a part's end), cut to the first (largest) part's size; parity part ``j``
    holds block ``k + j - 1`` of every stripe. Any k good blocks of a stripe give its data
    blocks back, so any ``len(parts)`` bad parts can be rebuilt.
    """

    stripe_bytes: int
    parts: tuple[PartEntry, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "scheme": PARITY_SCHEME,
            "stripe_bytes": self.stripe_bytes,
            "parts": [p.to_dict() for p in self.parts],
        }


@dataclass(frozen=True)
class PartIndex:
    """What a split consists of, and which bundle it belongs to."""

    bundle_file: str
    bundle_size: int
    name: str
    version: str
    manifest_sha256: str
    part_size: int
    parts: tuple[PartEntry, ...]
    parity: Parity | None = None

    def __post_init__(self) -> None:
        _check_index(self)

    @property
    def parity_count(self) -> int:
        return len(self.parity.parts) if self.parity else 0

    @property
    def index_file(self) -> str:
        return self.bundle_file + INDEX_SUFFIX

    def all_parts(self) -> tuple[PartEntry, ...]:
        return self.parts + (self.parity.parts if self.parity else ())

    def to_dict(self) -> dict[str, Any]:
        return {
            "_type": INDEX_TYPE,
            "format_version": INDEX_VERSION,
            "bundle": {
                "file": self.bundle_file,
                "size": self.bundle_size,
                "name": self.name,
                "version": self.version,
                "manifest_sha256": self.manifest_sha256,
            },
            "part_size": self.part_size,
            "parts": [p.to_dict() for p in self.parts],
            "parity": self.parity.to_dict() if self.parity else None,
        }

    def to_bytes(self) -> bytes:
        return encode_canonical(self.to_dict()) + b"\n"

    @classmethod
    def from_bytes(cls, data: bytes) -> PartIndex:
        if len(data) > MAX_INDEX_BYTES:
            raise FormatError(f"part index: {len(data)} bytes, limit {MAX_INDEX_BYTES}")
        if not data.endswith(b"\n"):
            raise FormatError("part index: does not end with a newline")
        raw = decode_canonical(data[:-1], what="part index")
        top = _exact(
            raw,
            "part index",
            {"_type", "format_version", "bundle", "part_size", "parts", "parity"},
        )
        if top["_type"] != INDEX_TYPE:
            raise FormatError(f"part index: _type is {quote(top['_type'])}, not {INDEX_TYPE!r}")
        if top["format_version"] != INDEX_VERSION or not is_int(top["format_version"]):
            raise FormatError(
                f"part index: unsupported format_version {quote(top['format_version'])}"
            )
        bundle = _exact(
            top["bundle"], "bundle", {"file", "size", "name", "version", "manifest_sha256"}
        )
        parity = None
        if top["parity"] is not None:
            raw_parity = _exact(top["parity"], "parity", {"scheme", "stripe_bytes", "parts"})
            if raw_parity["scheme"] != PARITY_SCHEME:
                raise FormatError(
                    f"part index: unknown parity scheme {quote(raw_parity['scheme'])}"
                )
            parity = Parity(
                stripe_bytes=_int(raw_parity["stripe_bytes"], "parity.stripe_bytes"),
                parts=_entries(raw_parity["parts"], "parity.parts"),
            )
        return cls(
            bundle_file=_text(bundle["file"], "bundle.file", _FILE_RE),
            bundle_size=_int(bundle["size"], "bundle.size"),
            name=_text(bundle["name"], "bundle.name", _LABEL_RE),
            version=_text(bundle["version"], "bundle.version", _LABEL_RE),
            manifest_sha256=_text(bundle["manifest_sha256"], "bundle.manifest_sha256", _SHA256_RE),
            part_size=_int(top["part_size"], "part_size"),
            parts=_entries(top["parts"], "parts"),
            parity=parity,
        )


def _check_index(index: PartIndex) -> None:
    """The rules that make an index describe exactly one bundle's bytes."""
    k = len(index.parts)
    if not index.parts:
        raise FormatError("part index: no parts")
    if index.part_size < 1 or index.bundle_size < 1:
        raise FormatError("part index: part_size and bundle.size must be at least 1")
    if k + index.parity_count > MAX_PARTS:
        raise FormatError(
            f"part index: {k} parts and {index.parity_count} parity parts; at most {MAX_PARTS} "
            "together (use larger parts)"
        )
    if -(-index.bundle_size // index.part_size) != k:
        raise FormatError(
            f"part index: {k} parts of {index.part_size} bytes cannot hold "
            f"{index.bundle_size} bytes"
        )
    _check_numbers(index.parts, "parts")
    for entry in index.parts:
        want = min(index.part_size, index.bundle_size - (entry.number - 1) * index.part_size)
        if entry.size != want:
            raise FormatError(
                f"part index: part {entry.number} is {entry.size} bytes; the split makes it {want}"
            )
    files = [p.file for p in index.all_parts()]
    if len(set(files)) != len(files) or index.index_file in files:
        raise FormatError("part index: two parts (or a part and the index) share a file name")
    if index.parity is not None:
        parity = index.parity
        if not parity.parts:
            raise FormatError("part index: parity with no parity parts")
        if not MIN_STRIPE_BYTES <= parity.stripe_bytes <= MAX_STRIPE_BYTES:
            raise FormatError(
                f"part index: parity stripe of {parity.stripe_bytes} bytes; "
                f"{MIN_STRIPE_BYTES} to {MAX_STRIPE_BYTES} allowed"
            )
        _check_numbers(parity.parts, "parity.parts")
        for entry in parity.parts:
            if entry.size != index.parts[0].size:
                raise FormatError(
                    f"part index: parity part {entry.number} is {entry.size} bytes; "
                    f"parity parts are as large as part 1 ({index.parts[0].size})"
                )


def _check_numbers(entries: tuple[PartEntry, ...], what: str) -> None:
    numbers = [e.number for e in entries]
    if numbers != list(range(1, len(entries) + 1)):
        raise FormatError(f"part index: {what} are not numbered 1 to {len(entries)} in order")


def _entries(raw: object, what: str) -> tuple[PartEntry, ...]:
    if not isinstance(raw, list) or len(raw) > MAX_PARTS:
        raise FormatError(f"part index: {what} must be a list of at most {MAX_PARTS} parts")
    entries = []
    for position, item in enumerate(raw):
        where = f"{what}[{position}]"
        fields = _exact(item, where, {"number", "file", "size", "sha256"})
        entries.append(
            PartEntry(
                number=_int(fields["number"], f"{where}.number"),
                file=_text(fields["file"], f"{where}.file", _FILE_RE),
                size=_int(fields["size"], f"{where}.size"),
                sha256=_text(fields["sha256"], f"{where}.sha256", _SHA256_RE),
            )
        )
    return tuple(entries)


def _exact(raw: object, what: str, keys: set[str] | frozenset[str]) -> dict[str, Any]:
    return exact_fields(raw, f"part index: {what}", keys)


def _int(value: object, what: str) -> int:
    if not is_int(value) or value < 0:
        raise FormatError(f"part index: {what} must be an integer >= 0, not {quote(value)}")
    return value


def _text(value: object, what: str, pattern: re.Pattern[str]) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise FormatError(f"part index: {what} is not valid: {quote(value)}")
    return value
