"""Where each piece of a GGUF file lies: a strict reader of its header, cut into regions.

A GGUF file is a fixed header (magic ``GGUF``, version, tensor count, metadata count), the
metadata key-value pairs, one info record per tensor (name, shape, type, offset relative to
the data section), padding up to the alignment, and the tensor data. :func:`read_layout`
reads the header (never the tensor data) and returns the file as consecutive
:class:`Region` s that cover it exactly, each with an identity that survives edits elsewhere
in the file: a metadata pair by its key, a tensor info by the tensor's name, tensor data by
name, shape and type. builder/ggufdiff.py diffs two files region by region with it
(docs/adr/0019-gguf-aware-deltas.md).

Why our own reader and not ``gguf.GGUFReader``: that one maps the whole file and builds
numpy views of every field and tensor (seconds and hundreds of MB of page tables for a large
model, for bytes we never look at); we need only byte ranges, without numpy, and a refusal
with one line (:class:`NotGGUFError`) for anything odd, which makes the caller fall back to
a block diff rather than guess.

:func:`rewrite_string_metadata` writes a copy of a GGUF with one string value set (a chat
template edit): it moves every tensor's absolute offset, the case a block diff cannot follow.
"""

from __future__ import annotations

import io
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Final

from signing.errors import InputError

MAGIC: Final = b"GGUF"
VERSIONS: Final = (2, 3)  # version 1 had 32-bit counts and is long gone
DEFAULT_ALIGNMENT: Final = 32
ALIGNMENT_KEY: Final = "general.alignment"
MAX_KEY_BYTES: Final = 1 << 16
MAX_STRING_BYTES: Final = 1 << 28  # a chat template or a merges line; far above real ones
MAX_DIMS: Final = 8
MAX_ARRAY_DEPTH: Final = 4
HEADER_BYTES: Final = 24

_STRING, _ARRAY, _UINT32 = 8, 9, 4
# Fixed-size value types of GGUF metadata: uint8, int8, uint16, int16, uint32, int32,
# float32, bool, uint64, int64, float64.
_FIXED: Final = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


class NotGGUFError(InputError):
    """A file is not a GGUF file this reader accepts (the diff then falls back to blocks)."""


@dataclass(frozen=True)
class Region:
    """A byte range of the file and what it is: ``ident`` is stable across edits elsewhere
    (``("kv", key)``, ``("tensor_info", name)``, ``("tensor", name, shape, type)``,
    ``("header",)``, ``("padding",)``, ``("gap",)``)."""

    ident: tuple[object, ...]
    offset: int
    length: int

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int  # relative to the data section


@dataclass(frozen=True)
class GGUFLayout:
    """A GGUF file's header, read strictly, and its regions in file order."""

    version: int
    alignment: int
    data_offset: int
    size: int
    keys: tuple[str, ...]
    tensors: tuple[TensorInfo, ...]
    regions: tuple[Region, ...]

    def region(self, ident: tuple[object, ...]) -> Region:
        for region in self.regions:
            if region.ident == ident:
                return region
        raise KeyError(ident)


class _Cursor:
    """Reads a header with its position known; every short read is a refusal."""

    def __init__(self, stream: BinaryIO, size: int, name: str) -> None:
        self._stream = stream
        self.size = size
        self.name = name
        self.pos = 0

    def fail(self, why: str) -> NotGGUFError:
        return NotGGUFError(f"{self.name} is not a GGUF file this reader accepts: {why}")

    def read(self, count: int) -> bytes:
        if count > self.size - self.pos:
            raise self.fail(f"it ends inside its header (byte {self.pos} + {count})")
        data = self._stream.read(count)
        if len(data) != count:
            raise self.fail(f"short read at byte {self.pos}")
        self.pos += count
        return data

    def skip(self, count: int) -> None:
        if count > self.size - self.pos:
            raise self.fail(f"it ends inside its header (byte {self.pos} + {count})")
        self._stream.seek(count, io.SEEK_CUR)
        self.pos += count

    def u32(self) -> int:
        value: int = struct.unpack("<I", self.read(4))[0]
        return value

    def u64(self) -> int:
        value: int = struct.unpack("<Q", self.read(8))[0]
        return value

    def string(self, limit: int, what: str) -> bytes:
        length = self.u64()
        if length > limit:
            raise self.fail(f"{what} of {length} bytes at byte {self.pos - 8}")
        return self.read(length)

    def skip_string(self) -> None:
        length = self.u64()
        if length > MAX_STRING_BYTES:
            raise self.fail(f"a string of {length} bytes at byte {self.pos - 8}")
        self.skip(length)

    def skip_value(self, value_type: int, depth: int) -> None:
        if value_type in _FIXED:
            self.skip(_FIXED[value_type])
        elif value_type == _STRING:
            self.skip_string()
        elif value_type == _ARRAY:
            if depth >= MAX_ARRAY_DEPTH:
                raise self.fail(f"arrays nested deeper than {MAX_ARRAY_DEPTH} levels")
            item_type, count = self.u32(), self.u64()
            if item_type in _FIXED:
                self.skip(count * _FIXED[item_type])  # refused at once if it cannot fit
                return
            if count > (self.size - self.pos) // 8:  # each string or array takes 8 bytes at least
                raise self.fail(f"an array of {count} items at byte {self.pos - 12}")
            for _ in range(count):
                self.skip_value(item_type, depth + 1)
        else:
            raise self.fail(f"unknown value type {value_type} at byte {self.pos - 4}")


def read_layout(path: Path) -> GGUFLayout:
    """The regions of the GGUF file at ``path``; :class:`NotGGUFError` for anything else."""
    try:
        with path.open("rb", buffering=1 << 20) as stream:
            size = os.fstat(stream.fileno()).st_size
            return _read(_Cursor(stream, size, path.name))
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}") from None


def _read(cur: _Cursor) -> GGUFLayout:
    if cur.read(4) != MAGIC:
        raise cur.fail("no GGUF magic")
    version = cur.u32()
    if version not in VERSIONS:
        raise cur.fail(f"version {version} (this reader knows {list(VERSIONS)}, little-endian)")
    tensor_count, kv_count = cur.u64(), cur.u64()
    # Every pair and every tensor info takes more than 16 bytes: counts beyond that are lies.
    if tensor_count > cur.size // 16 or kv_count > cur.size // 16:
        raise cur.fail(f"{tensor_count} tensors and {kv_count} metadata pairs in {cur.size} bytes")
    regions = [Region(("header",), 0, HEADER_BYTES)]
    keys: list[str] = []
    alignment = DEFAULT_ALIGNMENT
    for _ in range(kv_count):
        start = cur.pos
        key = _text(cur, cur.string(MAX_KEY_BYTES, "a key"), "a key")
        if key in keys:
            raise cur.fail(f"metadata key {key!r} appears twice")
        value_type = cur.u32()
        if key == ALIGNMENT_KEY:
            if value_type != _UINT32:
                raise cur.fail(f"{ALIGNMENT_KEY} is of type {value_type}, not uint32")
            alignment = cur.u32()
            if alignment < 1 or alignment & (alignment - 1):
                raise cur.fail(f"{ALIGNMENT_KEY} {alignment} is not a power of two")
        else:
            cur.skip_value(value_type, 0)
        keys.append(key)
        regions.append(Region(("kv", key), start, cur.pos - start))
    tensors: list[TensorInfo] = []
    names: set[str] = set()
    for _ in range(tensor_count):
        start = cur.pos
        name = _text(cur, cur.string(MAX_KEY_BYTES, "a tensor name"), "a tensor name")
        if name in names:
            raise cur.fail(f"tensor {name!r} appears twice")
        names.add(name)
        n_dims = cur.u32()
        if not 1 <= n_dims <= MAX_DIMS:
            raise cur.fail(f"tensor {name!r} has {n_dims} dimensions")
        shape = tuple(cur.u64() for _ in range(n_dims))
        ggml_type, offset = cur.u32(), cur.u64()
        tensors.append(TensorInfo(name, shape, ggml_type, offset))
        regions.append(Region(("tensor_info", name), start, cur.pos - start))
    data_offset = -(-cur.pos // alignment) * alignment
    if data_offset > cur.size:
        raise cur.fail(f"its data section starts at {data_offset}, past its end ({cur.size})")
    if data_offset > cur.pos:
        regions.append(Region(("padding",), cur.pos, data_offset - cur.pos))
    regions.extend(_data_regions(cur, tensors, data_offset))
    return GGUFLayout(
        version=version,
        alignment=alignment,
        data_offset=data_offset,
        size=cur.size,
        keys=tuple(keys),
        tensors=tuple(tensors),
        regions=tuple(regions),
    )


def _data_regions(cur: _Cursor, tensors: list[TensorInfo], data_offset: int) -> list[Region]:
    """Each tensor's data runs from its offset to the next tensor's (its padding included),
    the last one's to the end of the file: the regions cover the data section exactly, with
    no table of type sizes to keep in step with llama.cpp's."""
    regions = []
    ordered = sorted(tensors, key=lambda t: t.offset)
    position = data_offset
    for index, tensor in enumerate(ordered):
        start = data_offset + tensor.offset
        end = data_offset + ordered[index + 1].offset if index + 1 < len(ordered) else cur.size
        if start > cur.size:
            raise cur.fail(f"tensor {tensor.name!r} starts at {start}, past the end ({cur.size})")
        if end <= start:
            raise cur.fail(f"tensor {tensor.name!r} shares its offset with another")
        if start > position:
            regions.append(Region(("gap",), position, start - position))
        regions.append(
            Region(("tensor", tensor.name, tensor.shape, tensor.ggml_type), start, end - start)
        )
        position = end
    if position < cur.size:
        regions.append(Region(("gap",), position, cur.size - position))
    return regions


def _text(cur: _Cursor, raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise cur.fail(f"{what} at byte {cur.pos - len(raw)} is not UTF-8") from None


def string_pair(key: str, value: str) -> bytes:
    """A GGUF metadata pair holding a string, as the file stores it."""
    key_bytes, value_bytes = key.encode("utf-8"), value.encode("utf-8")
    return (
        struct.pack("<Q", len(key_bytes))
        + key_bytes
        + struct.pack("<IQ", _STRING, len(value_bytes))
        + value_bytes
    )


def rewrite_string_metadata(source: Path, dest: Path, key: str, value: str) -> None:
    """Write ``source`` to ``dest`` with the string metadata ``key`` set to ``value``
    (replaced where it is, else appended after the last pair): the header is rebuilt, the
    tensor data copied unchanged (their offsets are relative to the data section)."""
    if key == ALIGNMENT_KEY:
        raise InputError(f"{ALIGNMENT_KEY} is not a string")
    layout = read_layout(source)
    pair = string_pair(key, value)
    added = key not in layout.keys
    if added and not layout.keys:
        raise InputError(f"{source.name} has no metadata to add {key!r} after")
    with source.open("rb") as src, dest.open("xb") as out:
        header = bytearray(src.read(HEADER_BYTES))
        if added:
            struct.pack_into("<Q", header, 16, len(layout.keys) + 1)
        out.write(header)
        for region in layout.regions:
            kind = region.ident[0]
            if kind in ("kv", "tensor_info"):
                src.seek(region.offset)
                chunk = src.read(region.length)
                out.write(pair if region.ident == ("kv", key) else chunk)
                if added and region.ident == ("kv", layout.keys[-1]):
                    out.write(pair)
        end = out.tell()
        out.write(b"\0" * (-(-end // layout.alignment) * layout.alignment - end))
        src.seek(layout.data_offset)
        remaining = layout.size - layout.data_offset
        while remaining > 0:
            chunk = src.read(min(remaining, 1 << 20))
            if not chunk:
                raise InputError(f"{source.name} changed while it was copied")
            out.write(chunk)
            remaining -= len(chunk)
