"""The file patch of a delta bundle: a target file rebuilt from a base file plus literal bytes
(pure core; docs/adr/0019-gguf-aware-deltas.md).

A patch is canonical JSON that names the base (sha256 and size), the target (sha256 and size),
the literal file that carries the new bytes (sha256 and size), the method that made it, and an
ordered list of operations, each of which appends bytes to the target:

- ``{"copy": [base_offset, length]}``: ``length`` bytes of the base from ``base_offset``;
- ``{"data": [literal_offset, length]}``: ``length`` bytes of the literal file.

The builder writes it (builder/ggufdiff.py), the host applies it (appliance/patching.py), and
both go through this one module. Every patch has exactly one spelling, so the rules are
strict, and each breach is a :class:`~signing.errors.FormatError` naming the field:

- the operations cover the target exactly (their lengths add up to its size);
- every length is at least 1; every copy lies inside the base;
- the data operations read the literal file once, in order, from its start to its end (each
  data offset is the sum of the data lengths before it), so that the host can hash the
  literal file as it streams it;
- neighbours are merged: no two data operations follow each other, and no copy continues the
  copy before it in the base (the builder coalesces them);
- at most :data:`MAX_OPS` operations, at most :data:`MAX_PATCH_BYTES` bytes of JSON.

The patch proves nothing by itself: its trust comes from the signed manifest that lists it
(or the payload member it rebuilds), and the host checks the rebuilt file's sha256 against
the target's, which the manifest names too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final, Literal

from signing.bounded import quote
from signing.canonical import MAX_INT, decode_canonical, encode_canonical, exact_fields, is_int
from signing.errors import FormatError

PATCH_TYPE: Final = "file-patch"
PATCH_VERSION: Final = 1
PATCH_SUFFIX: Final = ".patch.json"
LITERAL_SUFFIX: Final = ".patch.bin"
MAX_OPS: Final = 1_000_000
"""A 70B GGUF has about 700 tensors; a block diff of 40 GB in 1 MiB blocks 40,000 blocks."""
MAX_PATCH_BYTES: Final = 64 << 20
"""A million operations of two 19-digit integers each fit (about 52 bytes per operation)."""

METHODS: Final = ("gguf", "blocks", "literal")
"""How the builder made the patch: per GGUF region (metadata pair, tensor info, tensor data),
per fixed block of a file that is not GGUF, or the whole target as literal bytes."""

Method = Literal["gguf", "blocks", "literal"]
OpKind = Literal["copy", "data"]

_SHA256_RE: Final = re.compile(r"[0-9a-f]{64}")
_TOP_KEYS: Final = frozenset(
    {"_type", "format_version", "method", "base", "target", "literal", "ops"}
)
_FILE_KEYS: Final = frozenset({"sha256", "size"})


@dataclass(frozen=True)
class FileRef:
    """A file by its content: what a patch needs (base), carries (literal) or makes (target)."""

    sha256: str
    size: int

    def __post_init__(self) -> None:
        if not isinstance(self.sha256, str) or not _SHA256_RE.fullmatch(self.sha256):
            raise FormatError(f"patch: {quote(self.sha256)} is not a sha256")
        _int(self.size, "a file's size")

    def to_dict(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "size": self.size}


@dataclass(frozen=True)
class Op:
    """One operation: ``length`` bytes from ``offset`` of the base (copy) or the literal
    file (data), appended to the target."""

    kind: OpKind
    offset: int
    length: int

    def __post_init__(self) -> None:
        if self.kind not in ("copy", "data"):
            raise FormatError(f"patch: unknown operation {quote(self.kind)}")
        _int(self.offset, f"{self.kind} offset")
        _int(self.length, f"{self.kind} length")

    def to_dict(self) -> dict[str, Any]:
        return {self.kind: [self.offset, self.length]}


@dataclass(frozen=True)
class Patch:
    """A checked patch (module docstring); constructing one enforces every rule."""

    method: Method
    base: FileRef
    target: FileRef
    literal: FileRef
    ops: tuple[Op, ...]

    def __post_init__(self) -> None:
        _check_patch(self)

    @property
    def copied_bytes(self) -> int:
        """Target bytes taken from the base (the rest are the literal file's)."""
        return self.target.size - self.literal.size

    def to_dict(self) -> dict[str, Any]:
        return {
            "_type": PATCH_TYPE,
            "format_version": PATCH_VERSION,
            "method": self.method,
            "base": self.base.to_dict(),
            "target": self.target.to_dict(),
            "literal": self.literal.to_dict(),
            "ops": [op.to_dict() for op in self.ops],
        }

    def to_bytes(self) -> bytes:
        return encode_canonical(self.to_dict()) + b"\n"

    @classmethod
    def from_bytes(cls, data: bytes) -> Patch:
        """Parse a patch; FormatError (never TypeError or ValueError) on anything else."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise FormatError(f"patch: expected bytes, got {type(data).__name__}")
        if len(data) > MAX_PATCH_BYTES:
            raise FormatError(f"patch: {len(data)} bytes, limit {MAX_PATCH_BYTES}")
        raw = bytes(data)
        if not raw.endswith(b"\n"):
            raise FormatError("patch: does not end with a newline")
        top = _exact(decode_canonical(raw[:-1], what="patch"), "patch", _TOP_KEYS)
        if top["_type"] != PATCH_TYPE:
            raise FormatError(f"patch: _type is {quote(top['_type'])}, not {PATCH_TYPE!r}")
        if not is_int(top["format_version"]) or top["format_version"] != PATCH_VERSION:
            raise FormatError(f"patch: unsupported format_version {quote(top['format_version'])}")
        method = top["method"]
        if method not in METHODS:  # a list or dict compares unequal to every str: no TypeError
            raise FormatError(f"patch: method {quote(method)} is not one of {list(METHODS)}")
        return cls(
            method=method,
            base=_file(top["base"], "base"),
            target=_file(top["target"], "target"),
            literal=_file(top["literal"], "literal"),
            ops=_ops(top["ops"]),
        )


def _check_patch(patch: Patch) -> None:
    """The rules of the module docstring, for a parsed patch and for one the builder makes."""
    if patch.method not in METHODS:
        raise FormatError(f"patch: method {quote(patch.method)} is not one of {list(METHODS)}")
    if len(patch.ops) > MAX_OPS:
        raise FormatError(f"patch: {len(patch.ops)} operations, limit {MAX_OPS}")
    position = literal = 0
    previous: Op | None = None
    for index, op in enumerate(patch.ops):
        where = f"patch: ops[{index}]"
        if op.length < 1:
            raise FormatError(f"{where} has length {op.length}; at least 1")
        if op.kind == "copy":
            if op.offset + op.length > patch.base.size:
                raise FormatError(
                    f"{where} copies bytes {op.offset} to {op.offset + op.length} of a base of "
                    f"{patch.base.size} bytes"
                )
            if (
                previous is not None
                and previous.kind == "copy"
                and previous.offset + previous.length == op.offset
            ):
                raise FormatError(f"{where} continues the copy before it: merge them")
        else:
            if op.offset != literal:
                raise FormatError(
                    f"{where} reads the literal file at {op.offset}; the literal file is read "
                    f"in order, so it must be {literal}"
                )
            if previous is not None and previous.kind == "data":
                raise FormatError(f"{where} follows another data operation: merge them")
            literal += op.length
        position += op.length
        previous = op
    if position != patch.target.size:
        raise FormatError(
            f"patch: the operations make {position} bytes; the target is {patch.target.size}"
        )
    if literal != patch.literal.size:
        raise FormatError(
            f"patch: the operations read {literal} literal bytes; the literal file is "
            f"{patch.literal.size}"
        )


def _ops(raw: object) -> tuple[Op, ...]:
    if not isinstance(raw, list):
        raise FormatError(f"patch: ops must be a list, not {type(raw).__name__}")
    if len(raw) > MAX_OPS:
        raise FormatError(f"patch: {len(raw)} operations, limit {MAX_OPS}")
    ops = []
    for index, item in enumerate(raw):
        where = f"ops[{index}]"
        if not isinstance(item, dict) or len(item) != 1:
            raise FormatError(f"patch: {where} must be an object with one key, copy or data")
        ((kind, pair),) = item.items()
        if kind not in ("copy", "data"):
            raise FormatError(f"patch: {where} has unknown operation {quote(kind)}")
        if not isinstance(pair, list) or len(pair) != 2:
            raise FormatError(f"patch: {where}.{kind} must be [offset, length], not {quote(pair)}")
        offset, length = (_int(value, f"{where}.{kind}") for value in pair)
        ops.append(Op(kind=kind, offset=offset, length=length))
    return tuple(ops)


def _file(raw: object, what: str) -> FileRef:
    fields = _exact(raw, what, _FILE_KEYS)
    sha256 = fields["sha256"]
    if not isinstance(sha256, str) or not _SHA256_RE.fullmatch(sha256):
        raise FormatError(f"patch: {what}.sha256 is not a sha256: {quote(sha256)}")
    return FileRef(sha256=sha256, size=_int(fields["size"], f"{what}.size"))


def _exact(raw: object, what: str, keys: set[str] | frozenset[str]) -> dict[str, Any]:
    return exact_fields(raw, f"patch: {what}", keys)


def _int(value: object, what: str) -> int:
    if not is_int(value) or not 0 <= value <= MAX_INT:
        raise FormatError(f"patch: {what} must be an integer >= 0, not {quote(value)}")
    return value
