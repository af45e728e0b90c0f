"""A file patch from a base file to a new one, per GGUF region where both are GGUF
(docs/adr/0019-gguf-aware-deltas.md; the format: signing/patchformat.py).

For two GGUF files, each region of the new file (builder.gguflayout: the fixed header, each
metadata pair, each tensor info, the padding, each tensor's data) that the base holds with the
same bytes becomes a copy from the base; the rest is carried as literal bytes. A region is
looked up first by its identity (a pair's key; a tensor's name, shape and type), then by its
content (length and sha256), so a renamed or moved tensor is still found. Identity never
decides alone: only equal sha256 makes a copy. A chat-template edit moves every tensor's
absolute offset, which defeats a block diff (RAUC's, or :func:`_block_regions`), but not this
one: it carries the one metadata pair that changed.

A file that is not GGUF (or that the strict reader refuses) is diffed in fixed blocks: each
aligned block of the new file that equals some aligned block of the base is copied. The
result says which method ran and why.

Both files are read twice at most, a MiB at a time; memory does not grow with their size.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from builder.gguflayout import NotGGUFError, Region, read_layout
from signing.errors import InputError
from signing.patchformat import FileRef, Method, Op, Patch

CHUNK: Final = 1 << 20
BLOCK_BYTES: Final = 1 << 20
"""The block of the fallback diff: small enough to keep a small edit small, large enough that
a 40 GB file is 40,000 operations at most."""


@dataclass(frozen=True)
class Delta:
    """A patch and why it was made the way it was (for the build log and ``inspect``)."""

    patch: Patch
    reason: str

    @property
    def carried_bytes(self) -> int:
        return self.patch.literal.size

    @property
    def ratio(self) -> float:
        """Literal bytes over the target's size."""
        return self.patch.literal.size / max(self.patch.target.size, 1)


@dataclass(frozen=True)
class _Hashed:
    region: Region
    sha256: str


def diff_files(
    base: Path,
    new: Path,
    *,
    patch: Path,
    literal: Path,
    block_bytes: int = BLOCK_BYTES,
    gguf_aware: bool = True,
) -> Delta:
    """The patch that makes ``new`` from ``base``, written to ``patch`` (canonical JSON) and
    its literal bytes to ``literal`` (both new files). GGUF-aware where both files are GGUF
    (module docstring); ``gguf_aware=False`` diffs in blocks whatever they are (to compare)."""
    delta = make_delta(
        base, new, literal_out=literal, block_bytes=block_bytes, gguf_aware=gguf_aware
    )
    try:
        with patch.open("xb") as out:
            out.write(delta.patch.to_bytes())
    except OSError as exc:
        raise InputError(f"cannot write the patch {patch}: {exc.strerror}") from None
    return delta


def make_delta(
    base: Path,
    new: Path,
    *,
    literal_out: Path,
    block_bytes: int = BLOCK_BYTES,
    gguf_aware: bool = True,
) -> Delta:
    """:func:`diff_files` without the patch file: the :class:`Delta` holds the patch."""
    why_not = "" if gguf_aware else "GGUF-aware diff turned off"
    method: Method = "gguf"
    if gguf_aware:
        try:
            base_regions: list[Region] = list(read_layout(base).regions)
            new_regions: list[Region] = list(read_layout(new).regions)
        except NotGGUFError as exc:
            why_not = exc.diagnostics()
    if why_not:
        base_regions = list(_block_regions(_size(base), block_bytes))
        new_regions = list(_block_regions(_size(new), block_bytes))
        method = "blocks"
    base_hashed, base_ref = _hash_regions(base, base_regions)
    new_hashed, new_ref = _hash_regions(new, new_regions)
    by_ident = {h.region.ident: h for h in base_hashed}
    by_content = {(h.region.length, h.sha256): h for h in base_hashed}
    plan: list[tuple[Region, Region | None]] = []  # each new region, and its base copy if any
    for hashed in new_hashed:
        same = by_ident.get(hashed.region.ident)
        if method == "blocks" or same is None or same.sha256 != hashed.sha256:
            same = by_content.get((hashed.region.length, hashed.sha256))
        plan.append((hashed.region, same.region if same is not None else None))
    ops, literal_ref = _write_literal(new, plan, literal_out)
    copied = sum(1 for _, source in plan if source is not None)
    if not any(op.kind == "copy" for op in ops):
        method = "literal"
    made = Patch(method=method, base=base_ref, target=new_ref, literal=literal_ref, ops=ops)
    basis = "GGUF regions" if not why_not else f"{block_bytes}-byte blocks, not GGUF ({why_not})"
    reason = (
        f"{method}: {basis}: {copied} of {len(plan)} copied from the base, "
        f"{literal_ref.size} of {new_ref.size} bytes carried"
    )
    return Delta(patch=made, reason=reason)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}") from None


def _block_regions(size: int, block_bytes: int) -> Iterator[Region]:
    for offset in range(0, size, block_bytes):
        yield Region(("block",), offset, min(block_bytes, size - offset))


def _hash_regions(path: Path, regions: Iterable[Region]) -> tuple[list[_Hashed], FileRef]:
    """The sha256 of every region and of the whole file, in one pass (the regions are
    consecutive and cover the file: builder.gguflayout guarantees it, blocks by making)."""
    whole = hashlib.sha256()
    hashed = []
    buffer = bytearray(CHUNK)
    position = 0
    try:
        with path.open("rb", buffering=0) as stream:
            for region in regions:
                if region.offset != position:
                    raise InputError(f"{path.name}: regions do not cover the file at {position}")
                one = hashlib.sha256()
                for view in _chunks(stream.readinto, buffer, region.length, path):
                    whole.update(view)
                    one.update(view)
                position = region.end
                hashed.append(_Hashed(region, one.hexdigest()))
            if stream.read(1):
                raise InputError(f"{path.name} grew while it was read")
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}") from None
    return hashed, FileRef(sha256=whole.hexdigest(), size=position)


def _chunks(
    readinto: Callable[[memoryview], int | None], buffer: bytearray, length: int, path: Path
) -> Iterator[memoryview]:
    view = memoryview(buffer)
    while length > 0:
        got = readinto(view[: min(length, len(buffer))]) or 0
        if got == 0:
            raise InputError(f"{path.name} shrank while it was read")
        length -= got
        yield view[:got]


def _write_literal(
    new: Path, plan: list[tuple[Region, Region | None]], literal_out: Path
) -> tuple[tuple[Op, ...], FileRef]:
    """The operations, merged where they continue each other, and the literal file: the new
    file's bytes of every region that is not copied, in order."""
    ops: list[Op] = []
    literal = hashlib.sha256()
    written = 0
    buffer = bytearray(CHUNK)
    try:
        with new.open("rb", buffering=0) as source, literal_out.open("xb") as out:
            for region, copy in plan:
                if copy is not None:
                    last = ops[-1] if ops else None
                    if last and last.kind == "copy" and last.offset + last.length == copy.offset:
                        ops[-1] = Op("copy", last.offset, last.length + copy.length)
                    else:
                        ops.append(Op("copy", copy.offset, copy.length))
                    continue
                source.seek(region.offset)
                for view in _chunks(source.readinto, buffer, region.length, new):
                    out.write(view)
                    literal.update(view)
                if ops and ops[-1].kind == "data":
                    ops[-1] = Op("data", ops[-1].offset, ops[-1].length + region.length)
                else:
                    ops.append(Op("data", written, region.length))
                written += region.length
            out.flush()
            os.fsync(out.fileno())
    except OSError as exc:
        raise InputError(f"cannot write the literal file {literal_out}: {exc.strerror}") from None
    return tuple(ops), FileRef(sha256=literal.hexdigest(), size=written)
