"""An in-memory bundle simulator for attack and property tests.

In the spirit of python-tuf's ``RepositorySimulator``: the simulator holds the keys (root and
bundle), the signed root a host trusts, and builds bundle bytes in memory with full control
over every byte, so that each attack test changes exactly ONE thing of an otherwise valid
bundle and re-signs (or deliberately does not).

The bytes come from the same pieces the real builder uses (``builder.pack.tar_header``, the
member names and format marker of ``signing.bundle``, ``signing.manifest``'s signature
block); ``test_attacks.test_simulator_matches_the_builder`` proves that an unmodified
simulated bundle is byte-identical to ``builder.pack.write_bundle``'s output.

Raw tar helpers (:func:`ustar_header`, :func:`pax_member`, :func:`gnu_longname_member`)
write headers with arbitrary fields and a correct checksum unless told otherwise, to craft
the oddities the strict reader must refuse.

:class:`Host` drives the real ``appliance.installer.Appliance`` on a host directory and takes
:func:`snapshot_host` pictures of its state, to prove a refused install changed nothing.
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
import tarfile
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Final, TypeVar

import pytest

from appliance.installer import Appliance, InstallOptions
from appliance.slots import SlotInfo
from builder.pack import DEFAULT_SIGNATURE_SPACE, tar_header
from signing.bundle import (
    FORMAT_MAGIC,
    FORMAT_MEMBER,
    MANIFEST_MEMBER,
    PAYLOAD_PREFIX,
    SIGNATURES_MEMBER,
)
from signing.chunks import ChunkedDigest
from signing.keys import SigningKey
from signing.manifest import BundleManifest, Entry, EnvironmentSpec, encode_signature_block
from signing.metadata import BUNDLE_ROLE, ROOT_ROLE, Role, Root, Signature, SignedRoot, sign_root
from signing.tarstream import BLOCK, padded

T = TypeVar("T")

USTAR_MAGIC: Final = b"ustar\x0000"
GNU_MAGIC: Final = b"ustar  \x00"
END_MARKER: Final = bytes(2 * BLOCK)
TEN_GIB: Final = 10 << 30

DEFAULT_FILES: Final[Mapping[str, bytes]] = {
    "model/tiny.gguf": b"GGUF\x03\x00\x00\x00" + bytes(range(256)) * 3 + b"tail",
    "recipe.toml": b'name = "demo"\nversion = "1.0.0"\n\n[runtime]\nbackend = "llama.cpp"\n',
}
DEFAULT_RUNTIME: Final[Mapping[str, Any]] = {"backend": "llama.cpp", "context_size": 256}


# -- raw tar pieces ---------------------------------------------------------------------------


def _text_field(value: str | bytes, width: int, what: str) -> bytes:
    raw = value.encode("utf-8") if isinstance(value, str) else value
    if len(raw) > width:
        raise ValueError(f"{what} of {len(raw)} bytes does not fit in {width}")
    return raw.ljust(width, b"\x00")


def _octal_field(value: int, width: int) -> bytes:
    return f"{value:0{width - 1}o}".encode("ascii") + b"\x00"


def ustar_header(
    name: str | bytes,
    size: int = 0,
    *,
    typeflag: bytes = b"0",
    prefix: str | bytes = b"",
    linkname: str | bytes = b"",
    mode: int = 0o644,
    magic: bytes = USTAR_MAGIC,
    size_field: bytes | None = None,
    checksum: int | bytes | None = None,
    devmajor: int | None = None,
) -> bytes:
    """One 512-byte header with arbitrary fields.

    ``size_field`` replaces the 12-byte size field verbatim (base-256, no terminator, junk);
    ``checksum`` is computed correctly when None, written as octal when an int, verbatim when
    bytes (8 bytes). With the defaults the result equals ``builder.pack.tar_header``.
    """
    if size_field is None:
        size_field = _octal_field(size, 12)
    if len(size_field) != 12 or len(magic) != 8 or len(typeflag) != 1:
        raise ValueError("size_field is 12 bytes, magic 8, typeflag 1")
    dev = bytes(8) if devmajor is None else _octal_field(devmajor, 8)
    block = b"".join(
        [
            _text_field(name, 100, "name"),
            _octal_field(mode, 8),
            _octal_field(0, 8),  # uid
            _octal_field(0, 8),  # gid
            size_field,
            _octal_field(0, 12),  # mtime
            b" " * 8,  # checksum, counted as spaces
            typeflag,
            _text_field(linkname, 100, "linkname"),
            magic,
            bytes(32),  # uname
            bytes(32),  # gname
            dev,  # devmajor
            bytes(8),  # devminor
            _text_field(prefix, 155, "prefix"),
        ]
    ).ljust(BLOCK, b"\x00")
    if checksum is None:
        checksum = sum(block)
    field_bytes = (
        checksum if isinstance(checksum, bytes) else f"{checksum:06o}".encode("ascii") + b"\x00 "
    )
    if len(field_bytes) != 8:
        raise ValueError("the checksum field is 8 bytes")
    return block[:148] + field_bytes + block[156:]


def octal_size(value: int) -> bytes:
    """A 12-byte size field in octal, without the terminator when 11 digits do not suffice."""
    return f"{value:011o}".encode() + b"\x00" if value < 8**11 else f"{value:012o}".encode()


def base256(value: int, width: int = 12) -> bytes:
    """GNU base-256 encoding of ``value`` in a ``width``-byte numeric field."""
    return bytes([0x80]) + value.to_bytes(width - 1, "big")


def set_checksum(header: bytes) -> bytes:
    """``header`` with its checksum field recomputed (after editing other fields)."""
    block = header[:148] + b" " * 8 + header[156:]
    return block[:148] + f"{sum(block):06o}".encode("ascii") + b"\x00 " + block[156:]


@dataclass(frozen=True)
class Member:
    """One tar member as raw pieces: what precedes the data, the data, what follows it.

    ``header`` None means the builder's own header for ``name`` and ``len(data)``; anything
    else is written verbatim (one block, or several: a pax or GNU header and then the real
    one). ``padding`` None means zero bytes up to the next block boundary.
    """

    name: str
    data: bytes = b""
    header: bytes | None = None
    padding: bytes | None = None

    def encode(self) -> bytes:
        header = tar_header(self.name, len(self.data)) if self.header is None else self.header
        pad = self.padding
        if pad is None:
            pad = bytes(padded(len(self.data)) - len(self.data))
        return header + self.data + pad


def assemble(members: Iterable[Member], *, end: bytes = END_MARKER, trailer: bytes = b"") -> bytes:
    """The archive: each member, then the end-of-archive marker, then ``trailer``."""
    out = io.BytesIO()
    for member in members:
        out.write(member.encode())
    out.write(end)
    out.write(trailer)
    return out.getvalue()


def pax_member(name: str, data: bytes, pax_headers: Mapping[str, str]) -> Member:
    """A member as Python's tarfile writes it in PAX format: an 'x' header, then the file."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    info.pax_headers = dict(pax_headers)
    header = info.tobuf(format=tarfile.PAX_FORMAT, encoding="utf-8", errors="strict")
    return Member(name, data, header=header)


def gnu_longname_member(name: str, data: bytes, *, gnu_magic: bool = True) -> Member:
    """A member with a GNU 'L' long-name header (as GNU tar writes it, or with ustar magic)."""
    if gnu_magic:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mode = 0o644
        header = info.tobuf(format=tarfile.GNU_FORMAT, encoding="utf-8", errors="strict")
        return Member(name, data, header=header)
    long = name.encode("utf-8") + b"\x00"
    head = ustar_header("././@LongLink", len(long), typeflag=b"L")
    body = long + bytes(padded(len(long)) - len(long))
    return Member(name, data, header=head + body + ustar_header(name[-99:], len(data)))


def header_offsets(data: bytes) -> list[int]:
    """Offsets of the member headers of a well-formed archive (stops at the end marker)."""
    offsets = []
    pos = 0
    while pos + BLOCK <= len(data) and data[pos : pos + BLOCK] != bytes(BLOCK):
        offsets.append(pos)
        size = int(data[pos + 124 : pos + 136].rstrip(b"\x00 ") or b"0", 8)
        pos += BLOCK + padded(size)
    return offsets


# -- the simulator ----------------------------------------------------------------------------


def make_keys(count: int) -> list[SigningKey]:
    """``count`` fresh keys, sorted by keyid."""
    return sorted((SigningKey.generate() for _ in range(count)), key=lambda k: k.keyid)


@dataclass
class RootGeneration:
    """One version of the root and the private keys behind it."""

    signed: SignedRoot
    root_keys: list[SigningKey]
    bundle_keys: list[SigningKey]


class BundleSimulator:
    """Keys, a trusted root, and bundles built byte by byte (see the module docstring).

    ``BundleSimulator(bundle_keys=2, threshold=2, root_keys=1, root_threshold=1)``: fresh
    keys, and root version 1 over them, signed by all root keys, valid for a year from
    ``now`` (the real time, truncated to seconds, unless given).
    """

    def __init__(
        self,
        bundle_keys: int = 2,
        threshold: int = 2,
        root_keys: int = 1,
        root_threshold: int = 1,
        *,
        now: datetime | None = None,
        root_expires: datetime | None = None,
        signature_space: int = DEFAULT_SIGNATURE_SPACE,
    ) -> None:
        self.now = (now or datetime.now(UTC)).replace(microsecond=0)
        self.bundle_keys = make_keys(bundle_keys)
        self.root_keys = make_keys(root_keys)
        self.threshold = threshold
        self.root_threshold = root_threshold
        self.root_expires = root_expires or self.now + timedelta(days=365)
        self.signature_space = signature_space
        root = self.make_root(version=1)
        self.history = [
            RootGeneration(sign_root(root, self.root_keys), self.root_keys, self.bundle_keys)
        ]

    # -- root ---------------------------------------------------------------------------

    @property
    def signed_root(self) -> SignedRoot:
        return self.history[-1].signed

    @property
    def root(self) -> Root:
        return self.signed_root.root

    def root_bytes(self) -> bytes:
        return self.signed_root.to_bytes()

    def make_root(self, *, version: int, expires: datetime | None = None) -> Root:
        """A root naming the simulator's current keys and thresholds."""
        keys = {k.keyid: k.public_key for k in [*self.root_keys, *self.bundle_keys]}
        return Root(
            version=version,
            expires=expires or self.root_expires,
            keys=keys,
            roles={
                ROOT_ROLE: Role(tuple(k.keyid for k in self.root_keys), self.root_threshold),
                BUNDLE_ROLE: Role(tuple(k.keyid for k in self.bundle_keys), self.threshold),
            },
        )

    def rotate(
        self,
        *,
        root_keys: int | None = None,
        bundle_keys: int | None = None,
        signers: Sequence[SigningKey] | None = None,
        version: int | None = None,
        expires: datetime | None = None,
    ) -> bytes:
        """Make the next root with fresh keys and adopt it; return its bytes.

        ``root_keys``/``bundle_keys`` give the number of fresh keys (None keeps the current
        ones, thresholds unchanged). ``signers`` default to the old root keys AND the new
        ones, as a valid rotation needs (docs/bundle-format.md, section 6).
        """
        old = self.history[-1]
        if root_keys is not None:
            self.root_keys = make_keys(root_keys)
        if bundle_keys is not None:
            self.bundle_keys = make_keys(bundle_keys)
        root = self.make_root(version=version or old.signed.root.version + 1, expires=expires)
        if signers is None:
            by_id = {k.keyid: k for k in [*old.root_keys, *self.root_keys]}
            signers = list(by_id.values())
        self.history.append(
            RootGeneration(sign_root(root, signers), self.root_keys, self.bundle_keys)
        )
        return self.signed_root.to_bytes()

    # -- manifests and signatures -------------------------------------------------------

    @property
    def default_signers(self) -> list[SigningKey]:
        return self.bundle_keys[: self.threshold]

    def manifest(
        self,
        name: str = "demo",
        version: str = "1.0.0",
        files: Mapping[str, bytes] | None = None,
        *,
        created: datetime | None = None,
        expires: datetime | None = None,
        runtime: Mapping[str, Any] | None = None,
        model_path: str | None = None,
        environment: EnvironmentSpec | None = None,
    ) -> tuple[BundleManifest, dict[str, bytes]]:
        """A valid manifest over ``files`` (path -> content) and the payload it describes.

        With ``environment``, ``files`` must hold its install list and packages (see
        docs/adr/0007-package-environments.md for the layout).
        """
        payload = dict(sorted((files if files is not None else DEFAULT_FILES).items()))
        if model_path is None:
            model_path = "model/tiny.gguf" if "model/tiny.gguf" in payload else next(iter(payload))
        entries = tuple(
            Entry(
                path=path,
                size=len(data),
                sha256=hashlib.sha256(data).hexdigest(),
                kind=_kind(path, model_path),
                chunks=_chunks(data),
            )
            for path, data in payload.items()
        )
        created = created or self.now - timedelta(hours=1)
        manifest = BundleManifest(
            name=name,
            version=version,
            created=created,
            expires=expires or created + timedelta(days=180),
            runtime=dict(runtime if runtime is not None else DEFAULT_RUNTIME),
            model_path=model_path,
            entries=entries,
            environment=environment,
        )
        return manifest, payload

    def sign(
        self, manifest_bytes: bytes, signers: Iterable[SigningKey] | None = None
    ) -> list[Signature]:
        keys = self.default_signers if signers is None else signers
        return [Signature(k.keyid, k.sign(manifest_bytes)) for k in keys]

    def signature_block(
        self,
        manifest_bytes: bytes,
        signers: Iterable[SigningKey] | None = None,
        *,
        signatures: Iterable[Signature] | None = None,
    ) -> bytes:
        sigs = self.sign(manifest_bytes, signers) if signatures is None else signatures
        return encode_signature_block(sigs, space=self.signature_space)

    # -- bundles ------------------------------------------------------------------------

    def members(
        self,
        manifest: BundleManifest,
        payload: Mapping[str, bytes],
        signers: Iterable[SigningKey] | None = None,
        *,
        manifest_bytes: bytes | None = None,
        signature_block: bytes | None = None,
    ) -> list[Member]:
        """The members of a bundle, in order: format, manifest, signatures, payload.

        ``manifest_bytes`` replaces the manifest member's content (signatures are made over
        it unless ``signature_block`` is given verbatim).
        """
        raw = manifest.to_bytes() if manifest_bytes is None else manifest_bytes
        block = self.signature_block(raw, signers) if signature_block is None else signature_block
        head = [
            Member(FORMAT_MEMBER, FORMAT_MAGIC),
            Member(MANIFEST_MEMBER, raw),
            Member(SIGNATURES_MEMBER, block),
        ]
        body = [Member(PAYLOAD_PREFIX + e.path, payload[e.path]) for e in manifest.entries]
        return head + body

    def bundle_bytes(
        self,
        manifest: BundleManifest,
        payload: Mapping[str, bytes],
        signers: Iterable[SigningKey] | None = None,
        members: Sequence[Member] | None = None,
        *,
        end: bytes = END_MARKER,
        trailer: bytes = b"",
        **kwargs: Any,
    ) -> bytes:
        """The bundle's bytes; ``members`` (a full, explicit list) replaces the default ones."""
        if members is None:
            members = self.members(manifest, payload, signers, **kwargs)
        return assemble(members, end=end, trailer=trailer)

    def bundle(self, version: str = "1.0.0", **kwargs: Any) -> bytes:
        """Shortcut: a valid, threshold-signed bundle of ``version``."""
        manifest, payload = self.manifest(version=version, **kwargs)
        return self.bundle_bytes(manifest, payload)


def _chunks(data: bytes) -> tuple[str, ...]:
    """The chunk hashes the builder writes for a file larger than one chunk."""
    digest = ChunkedDigest()
    digest.update(data)
    return digest.chunks()


def _kind(path: str, model_path: str) -> str:
    if path == model_path or path.startswith(model_path + "/"):
        return "model"
    if path.startswith(("env/wheels/", "env/conda/")):
        return "package"
    if path.startswith("env/"):
        return "lock"
    if path == "sbom.cdx.json":
        return "sbom"
    if path.startswith("program/"):
        return "program"
    if path.endswith(".toml"):
        return "recipe"
    return "file"


# -- driving a host ---------------------------------------------------------------------------


def snapshot_host(root: Path) -> dict[str, Any]:
    """What a refused operation must leave untouched.

    The ``current`` link, the list of slots, the sha256 and mode of every file (and the
    target of every link) under ``slots/``, and the bytes of the state and trusted root.
    """
    current = root / "current"
    files: dict[str, str] = {}
    slots_dir = root / "slots"
    for dirpath, dirnames, filenames in os.walk(slots_dir):
        base = Path(dirpath)
        for name in sorted([*dirnames, *filenames]):
            path = base / name
            rel = path.relative_to(root).as_posix()
            if path.is_symlink():
                files[rel] = "link:" + path.readlink().as_posix()
            elif path.is_file():
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                files[rel] = f"{path.stat().st_mode:o}:{digest}"
            else:
                files[rel] = "dir"

    def digest_of(path: Path) -> str | None:
        return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None

    return {
        "current": current.readlink().as_posix() if current.is_symlink() else None,
        "slots": sorted(p.name for p in slots_dir.iterdir()) if slots_dir.is_dir() else [],
        "files": files,
        "state": digest_of(root / "state.json"),
        "trust": digest_of(root / "trust" / "root.json"),
    }


@dataclass
class Host:
    """A host directory driven through the real ``Appliance`` API."""

    root: Path
    bundles: Path
    sim: BundleSimulator
    _count: int = 0

    @property
    def appliance(self) -> Appliance:
        return Appliance(self.root)

    def trust_init(self) -> str:
        return self.appliance.trust_init(
            self.sim.root_bytes(), fingerprint=self.sim.signed_root.fingerprint
        )

    def write(self, data: bytes, name: str | None = None) -> Path:
        self._count += 1
        self.bundles.mkdir(parents=True, exist_ok=True)
        path = self.bundles / (name or f"bundle-{self._count}.tar")
        path.write_bytes(data)
        return path

    def install(self, data: bytes, options: InstallOptions | None = None) -> SlotInfo:
        # Simulated payloads are not models: the health check is tested in tests/test_health.py.
        options = options or InstallOptions(skip_health_check=True)
        return self.appliance.install(str(self.write(data)), options)

    def snapshot(self) -> dict[str, Any]:
        return snapshot_host(self.root)

    def audit_records(self) -> list[dict[str, Any]]:
        return list(self.appliance.audit.records())

    def last_audit(self) -> dict[str, Any]:
        records = self.audit_records()
        assert records, "the audit log is empty"
        return records[-1]

    def staging_entries(self) -> list[str]:
        staging = self.root / "staging"
        return sorted(p.name for p in staging.iterdir()) if staging.is_dir() else []

    def active_payload(self) -> dict[str, bytes]:
        """Path -> bytes of every payload file of the active slot."""
        base = self.root / "current" / "payload"
        return {
            p.relative_to(base).as_posix(): p.read_bytes()
            for p in sorted(base.rglob("*"))
            if p.is_file()
        }


class GuardedStream:
    """A bundle stream that may go on forever, and fails the test if read too far.

    Serves ``prefix``, then ``filler`` repeated without end, from :meth:`readinto` (for the
    pure core: ``TarReader``). Any read that would take the total past ``budget`` raises
    AssertionError (not an AirgapError, so nothing turns it into a refusal): proof that a
    limit was enforced *before* reading.
    """

    def __init__(self, prefix: bytes, *, budget: int, filler: bytes = b"\x00") -> None:
        self._prefix = prefix
        self._filler = filler
        self.budget = budget
        self.consumed = 0

    def readinto(self, buffer: memoryview | bytearray) -> int:
        view = memoryview(buffer).cast("B")
        want = len(view)
        if self.consumed + want > self.budget:
            raise AssertionError(
                f"read of {want} bytes at offset {self.consumed} goes past the budget of "
                f"{self.budget} bytes: the reader did not enforce its limit before reading"
            )
        view[:] = self.bytes_at(self.consumed, want)
        self.consumed += want
        return want

    def bytes_at(self, start: int, length: int) -> bytes:
        head = self._prefix[start : start + length]
        rest = length - len(head)
        if not rest:
            return head
        offset = (max(start, len(self._prefix)) - len(self._prefix)) % len(self._filler)
        repeat = self._filler * (rest // len(self._filler) + 2)
        return head + repeat[offset : offset + rest]


class PipeSource:
    """A :class:`GuardedStream`'s bytes fed through a real pipe, as ``appliance install -``
    reads a data diode: a thread writes ``budget + margin`` bytes (the reader cannot tell
    that from an endless stream without reading past its limit), and :meth:`consumed`
    tells, once the reader is done, how many bytes it took from the pipe.

    Use as a context manager; :meth:`stdin` is what to put in ``sys.stdin``.
    """

    def __init__(self, stream: GuardedStream, *, margin: int = 1 << 20) -> None:
        self._stream = stream
        self._total = stream.budget + margin
        self.written = 0
        self._read_fd, self._write_fd = os.pipe()
        self._thread = threading.Thread(target=self._feed, name="pipe-feeder", daemon=True)
        self._drained: int | None = None

    @property
    def budget(self) -> int:
        return self._stream.budget

    def __enter__(self) -> PipeSource:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._drain()

    def stdin(self) -> Any:
        fd = self._read_fd
        return SimpleNamespace(fileno=lambda: fd)

    def consumed(self) -> int:
        """Bytes the reader took; call after the reader stopped (drains the pipe)."""
        self._drain()
        assert self._drained is not None
        return self.written - self._drained

    def _feed(self) -> None:
        chunk = 64 * 1024
        try:
            while self.written < self._total:
                data = self._stream.bytes_at(self.written, min(chunk, self._total - self.written))
                view = memoryview(data)
                while view:
                    n = os.write(self._write_fd, view)
                    self.written += n
                    view = view[n:]
        except BrokenPipeError:
            pass
        finally:
            os.close(self._write_fd)

    def _drain(self) -> None:
        if self._drained is not None:
            return
        drained = 0
        while chunk := os.read(self._read_fd, 1 << 16):
            drained += len(chunk)
        self._thread.join()
        os.close(self._read_fd)
        self._drained = drained


def from_pipe(data: bytes, run: Callable[[], T]) -> T:
    """``run`` with ``data`` on standard input through a real pipe (``install -``)."""
    read_fd, write_fd = os.pipe()

    def feed() -> None:
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(write_fd, view) :]
        except BrokenPipeError:
            pass  # the reader refused and stopped reading
        finally:
            os.close(write_fd)

    feeder = threading.Thread(target=feed, name="pipe-feeder", daemon=True)
    feeder.start()
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(sys, "stdin", SimpleNamespace(fileno=lambda: read_fd))
            return run()
    finally:
        os.close(read_fd)
        feeder.join()
