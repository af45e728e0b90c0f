"""Writing bundles deterministically, and co-signing them in place.

Determinism (invariant 6): members in manifest order, POSIX ustar headers with mtime 0,
uid/gid 0, empty owner names and mode 0644, no pax or GNU extensions, and the archive ends
with exactly two zero blocks. The same manifest, signatures and payload give the same bytes.

Co-signing (``appliance-builder sign``) rewrites only the fixed-size signature block; its cost
does not depend on the payload size (docs/bundle-format.md, section 3).
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Final

from signing.bundle import (
    FORMAT_MAGIC,
    FORMAT_MEMBER,
    MANIFEST_MEMBER,
    PAYLOAD_PREFIX,
    SIGNATURES_MEMBER,
    Limits,
    open_bundle,
    read_head,
)
from signing.chunks import ChunkedDigest
from signing.errors import InputError
from signing.keys import SigningKey
from signing.manifest import (
    BundleManifest,
    decode_signature_block,
    encode_signature_block,
)
from signing.metadata import Signature
from signing.tarstream import BLOCK, padded

DEFAULT_SIGNATURE_SPACE: Final = 16 * 1024
_COPY_CHUNK: Final = 1 << 20


@dataclass(frozen=True)
class PayloadFile:
    """A file that goes into the payload: its path in the bundle, where it lies on the builder,
    its entry kind, and its sha256 when that is known already (a package fetched and checked
    against its lock), so that the build does not read and hash it once more before writing.
    ``write_bundle`` hashes every byte it copies either way."""

    entry_path: str
    source: Path
    kind: str
    sha256: str | None = None


def tar_header(name: str, size: int) -> bytes:
    """The one deterministic ustar header used for every member."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    try:
        return info.tobuf(format=tarfile.USTAR_FORMAT, encoding="utf-8", errors="strict")
    except ValueError as exc:
        raise InputError(f"cannot store {name!r} in a ustar header: {exc}") from None


def sign_manifest(manifest_bytes: bytes, keys: Iterable[SigningKey]) -> list[Signature]:
    return [Signature(keyid=k.keyid, sig=k.sign(manifest_bytes)) for k in keys]


def write_bundle(
    out: Path,
    manifest: BundleManifest,
    sources: Mapping[str, Path],
    signatures: Iterable[Signature],
    *,
    signature_space: int = DEFAULT_SIGNATURE_SPACE,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Write the bundle to ``out`` atomically (temp file, fsync, rename).

    ``sources`` maps each entry path to the file holding its bytes. Every file is hashed again
    while it is copied, so a file that changed since the manifest was made is caught here.
    """
    tmp = out.with_name(f".{out.name}.partial")
    try:
        with tmp.open("wb") as fh:
            _write_member(fh, FORMAT_MEMBER, FORMAT_MAGIC)
            _write_member(fh, MANIFEST_MEMBER, manifest.to_bytes())
            block = encode_signature_block(signatures, space=signature_space)
            _write_member(fh, SIGNATURES_MEMBER, block)
            for entry in manifest.carried_entries:  # a delta's others are in its base
                source = sources[entry.path]
                fh.write(tar_header(PAYLOAD_PREFIX + entry.path, entry.size))
                digest = _copy_file(source, fh, entry.size, progress)
                if (digest.hexdigest(), digest.chunks()) != (entry.sha256, entry.chunks):
                    raise InputError(f"{source} changed while the bundle was being written")
                fh.write(bytes(padded(entry.size) - entry.size))
            fh.write(bytes(2 * BLOCK))
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)


def cosign_in_place(
    bundle: Path, keys: Iterable[SigningKey]
) -> tuple[BundleManifest, tuple[str, ...]]:
    """Add (or refresh) signatures over the manifest, touching only the signature block.

    The manifest is parsed first, so that nobody signs bytes that are not a valid manifest.
    Returns the manifest signed and the keyids that now sign the bundle.
    """
    limits = Limits()
    try:
        fh = bundle.open("r+b")
    except OSError as exc:
        raise InputError(f"cannot open {bundle}: {exc.strerror}") from None
    with fh:
        head = read_head(open_bundle(fh, limits), limits)
        manifest = BundleManifest.from_bytes(head.manifest_bytes)
        existing = {s.keyid: s for s in decode_signature_block(head.signature_block)}
        for sig in sign_manifest(head.manifest_bytes, keys):
            existing[sig.keyid] = sig
        block = encode_signature_block(existing.values(), space=len(head.signature_block))
        fh.seek(head.signature_offset)
        fh.write(block)
        fh.flush()
        os.fsync(fh.fileno())
    return manifest, tuple(sorted(existing))


def hash_file(path: Path) -> tuple[int, str, tuple[str, ...]]:
    """Size, sha256 and chunk hashes of a file (hashed again as write_bundle copies it)."""
    digest = ChunkedDigest()
    try:
        with path.open("rb") as fh:
            while chunk := fh.read(_COPY_CHUNK):
                digest.update(chunk)
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}") from None
    return digest.size, digest.hexdigest(), digest.chunks()


def _write_member(fh: BinaryIO, name: str, data: bytes) -> None:
    fh.write(tar_header(name, len(data)))
    fh.write(data)
    fh.write(bytes(padded(len(data)) - len(data)))


def _copy_file(
    source: Path, fh: BinaryIO, size: int, progress: Callable[[int], None] | None
) -> ChunkedDigest:
    digest = ChunkedDigest()
    copied = 0
    with source.open("rb") as src:
        while chunk := src.read(_COPY_CHUNK):
            copied += len(chunk)
            if copied > size:
                break
            digest.update(chunk)
            fh.write(chunk)
            if progress is not None:
                progress(len(chunk))
    if copied != size:
        raise InputError(f"{source} changed size while the bundle was being written")
    return digest
