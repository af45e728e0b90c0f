"""Split a bundle into parts sized for the medium, with optional parity (``appliance-builder
split``; docs/bundle-format.md, section 10; docs/adr/0015-split-bundles.md).

The parts are plain byte ranges of the bundle (``cat bundle.tar.0* > bundle.tar`` joins them
back), so nothing about the bundle changes and no key is needed: whoever carries the bundle
can split it, after its last co-signature. Deterministic: the same bundle, size and parity
give the same files, byte for byte.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Final

from signing.bundle import Limits, open_bundle, read_head
from signing.errors import AirgapError, InputError
from signing.manifest import BundleManifest
from signing.parity import StripeCoder, stripe_count, stripe_span
from signing.partindex import MAX_PARTS, Parity, PartEntry, PartIndex, part_file

# FAT32 holds files up to 4 GiB - 1 byte; 4095 MiB leaves room and keeps parts aligned.
DEFAULT_PART_SIZE: Final = 4095 << 20
FAT32_LIMIT: Final = (4 << 30) - 1
DEFAULT_STRIPE_BYTES: Final = 64 << 10
MIN_PART_SIZE: Final = 64 << 10
_CHUNK: Final = 1 << 20
_SIZE_RE: Final = re.compile(r"([0-9]+)([KMGT]?)(i?B)?", re.IGNORECASE)
_UNITS: Final = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}


def parse_size(text: str) -> int:
    """``4095M``, ``4G``, ``700MiB``, ``123456``: binary units (K = 1024 bytes)."""
    match = _SIZE_RE.fullmatch(text.strip())
    if match is None:
        raise InputError(f"--size {text!r} is not a size (examples: 4095M, 4G, 8000MiB)")
    return int(match.group(1)) << _UNITS[match.group(2).upper()]


def split_bundle(
    bundle: Path,
    out_dir: Path,
    *,
    part_size: int = DEFAULT_PART_SIZE,
    parity: int = 0,
    stripe_bytes: int = DEFAULT_STRIPE_BYTES,
    progress: Callable[[int], None] | None = None,
) -> PartIndex:
    """Write ``bundle``'s parts, parity parts and part index into ``out_dir``."""
    if part_size < MIN_PART_SIZE:
        raise InputError(f"--size must be at least {MIN_PART_SIZE} bytes (64K)")
    if parity < 0:
        raise InputError("--parity must be 0 or more")
    try:
        fh = bundle.open("rb")
    except OSError as exc:
        raise InputError(f"cannot open {bundle}: {exc.strerror}") from None
    with fh:
        size = os.fstat(fh.fileno()).st_size
        limits = Limits()
        try:
            head = read_head(open_bundle(fh, limits), limits)
            manifest = BundleManifest.from_bytes(head.manifest_bytes)
        except AirgapError as exc:
            raise InputError(f"{bundle} is not a bundle: {exc.diagnostics()}") from None
        count = -(-size // part_size)
        if count + parity > MAX_PARTS:
            raise InputError(
                f"{count} parts and {parity} parity parts; at most {MAX_PARTS} together: "
                f"use a larger --size (at least {-(-size // (MAX_PARTS - parity))} bytes)"
            )
        out_dir.mkdir(parents=True, exist_ok=True)
        fd = fh.fileno()
        parts = tuple(
            _write_part(
                fd,
                out_dir,
                number=n,
                file=part_file(bundle.name, n, count),
                offset=(n - 1) * part_size,
                length=min(part_size, size - (n - 1) * part_size),
                progress=progress,
            )
            for n in range(1, count + 1)
        )
        parity_info = None
        if parity:
            parity_info = _write_parity(
                fd,
                out_dir,
                bundle_file=bundle.name,
                parts=parts,
                part_size=part_size,
                parity=parity,
                stripe_bytes=stripe_bytes,
            )
    index = PartIndex(
        bundle_file=bundle.name,
        bundle_size=size,
        name=manifest.name,
        version=manifest.version,
        manifest_sha256=hashlib.sha256(head.manifest_bytes).hexdigest(),
        part_size=part_size,
        parts=parts,
        parity=parity_info,
    )
    _replace(out_dir / index.index_file, [index.to_bytes()])
    return index


def _write_part(
    fd: int,
    out_dir: Path,
    *,
    number: int,
    file: str,
    offset: int,
    length: int,
    progress: Callable[[int], None] | None,
) -> PartEntry:
    digest = hashlib.sha256()
    target = out_dir / file
    tmp = target.with_name(f".{file}.tmp")
    with tmp.open("wb") as out:
        done = 0
        while done < length:
            data = os.pread(fd, min(_CHUNK, length - done), offset + done)
            if not data:
                raise InputError(f"bundle shrank while it was split (at byte {offset + done})")
            digest.update(data)
            out.write(data)
            done += len(data)
            if progress is not None:
                progress(len(data))
        out.flush()
        os.fsync(out.fileno())
    tmp.replace(target)
    return PartEntry(number=number, file=file, size=length, sha256=digest.hexdigest())


def _write_parity(
    fd: int,
    out_dir: Path,
    *,
    bundle_file: str,
    parts: tuple[PartEntry, ...],
    part_size: int,
    parity: int,
    stripe_bytes: int,
) -> Parity:
    coder = StripeCoder(len(parts), parity)
    first = parts[0].size
    files = [part_file(bundle_file, j, parity, parity=True) for j in range(1, parity + 1)]
    digests = [hashlib.sha256() for _ in files]
    tmps = [out_dir / f".{f}.tmp" for f in files]
    outs = [t.open("wb") for t in tmps]
    try:
        for t in range(stripe_count(first, stripe_bytes)):
            start, length = stripe_span(t, first, stripe_bytes)
            blocks = []
            for part in parts:
                have = max(0, min(length, part.size - start))
                data = os.pread(fd, have, (part.number - 1) * part_size + start) if have else b""
                blocks.append(data + bytes(length - len(data)))
            for out, digest, block in zip(outs, digests, coder.encode(blocks), strict=True):
                digest.update(block)
                out.write(block)
        for out in outs:
            out.flush()
            os.fsync(out.fileno())
    finally:
        for out in outs:
            out.close()
    for tmp, file in zip(tmps, files, strict=True):
        tmp.replace(out_dir / file)
    return Parity(
        stripe_bytes=stripe_bytes,
        parts=tuple(
            PartEntry(number=j, file=f, size=first, sha256=d.hexdigest())
            for j, (f, d) in enumerate(zip(files, digests, strict=True), start=1)
        ),
    )


def _replace(target: Path, pieces: list[bytes]) -> None:
    tmp = target.with_name(f".{target.name}.tmp")
    with tmp.open("wb") as out:
        for piece in pieces:
            out.write(piece)
        out.flush()
        os.fsync(out.fileno())
    tmp.replace(target)
