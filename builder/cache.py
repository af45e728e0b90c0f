"""The builder's content-addressed store of verified files (docs/adr/0007-package-environments.md).

``root/sha256/<first 2 hex>/<hex>``, under ``$AIRGAP_APPLIANCE_CACHE`` or
``~/.cache/airgap-appliance``. The rules that make it safe to share between runs and builders:

- A file enters only through :meth:`Cache.add`: hashed first (unless the caller hashed those
  very bytes), made read-only, fsynced, then renamed into place, so a reader sees the whole
  file or none.
- Every :meth:`Cache.lookup` re-hashes the file. A cached file that no longer matches (tampered
  or damaged) is removed and reported as an :class:`~signing.errors.ArtifactError` naming the
  package and both hashes: a tampered cache is a sign of trouble on the builder, reported,
  never silently healed.
- Partial downloads live in ``root/tmp`` (same file system, so that adding one is a rename);
  builder.download owns what is written there and locks it while in use.

Other caches of the builder (built wheels, hub snapshots) live under :func:`default_cache_root`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Final

from builder.artifacts import Artifact, describe
from signing.errors import ArtifactError, InputError

CACHE_ENV: Final = "AIRGAP_APPLIANCE_CACHE"

_HEX64 = re.compile(r"[0-9a-f]{64}")


def default_cache_root() -> Path:
    """``$AIRGAP_APPLIANCE_CACHE``, else ``~/.cache/airgap-appliance``."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "airgap-appliance"


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file's bytes."""
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def write_atomically(dest: Path, data: bytes) -> None:
    """Replace ``dest`` with ``data``: a uniquely named temporary file beside it (builders that
    share a cache run at once), fsynced, mode 0644 (not mkstemp's 0600: what the builder
    writes is read by everyone), renamed over ``dest``; removed again on any failure."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        tmp.chmod(0o644)
        tmp.replace(dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def check_sha256(sha256: str) -> str:
    """``sha256`` in lower case; InputError when it is not a sha256 hex digest."""
    digest = sha256.lower()
    if not _HEX64.fullmatch(digest):
        raise InputError(f"{sha256!r} is not a sha256 hex digest")
    return digest


class Cache:
    """A content-addressed store of verified files: ``root/sha256/<first 2 hex>/<hex>``.

    Files enter it only through :meth:`add` (atomically, read-only) and are re-hashed by
    every :meth:`lookup`. Partial downloads live in ``root/tmp`` (same file system, so that
    adding one is a rename).
    """

    def __init__(self, root: Path | None = None) -> None:
        self.root = (root if root is not None else default_cache_root()).expanduser()
        self.tmp = self.root / "tmp"

    def __repr__(self) -> str:
        return f"Cache({str(self.root)!r})"

    def path(self, sha256: str) -> Path:
        """Where the file with this sha256 is (or would be) stored."""
        digest = check_sha256(sha256)
        return self.root / "sha256" / digest[:2] / digest

    def partial(self, sha256: str) -> Path:
        """The partial file a download of this sha256 writes to (and resumes from)."""
        return self.tmp / f"{check_sha256(sha256)}.part"

    def lookup(self, sha256: str, artifact: Artifact | None = None) -> Path | None:
        """The cached file with this sha256, after re-hashing it; ``None`` when not cached.

        A cached file whose bytes no longer hash to ``sha256`` is removed and reported:
        :class:`ArtifactError` naming ``artifact`` (or the cache path) and both hashes.
        """
        path = self.path(sha256)
        try:
            got = sha256_file(path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ArtifactError(f"cannot read cached file {path}: {exc.strerror}") from None
        want = sha256.lower()
        if got == want:
            return path
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        who = describe(artifact) if artifact is not None else f"cached file {path}"
        raise ArtifactError(
            f"{who}: cached copy {path} has sha256 {got}, which does not match the lock's "
            f"{want}; the entry was removed (run again to download it afresh)"
        )

    def add(self, path: Path, sha256: str, *, verified: bool = False) -> Path:
        """Move ``path`` into the cache as the file with this sha256; return its cache path.

        The file is hashed first unless ``verified`` (the caller hashed these very bytes):
        a mismatch raises :class:`ArtifactError` and leaves ``path`` where it is. The move is
        atomic (a rename within the cache's file system, after an fsync): a reader sees the
        whole file or none. An existing entry is replaced by the same bytes.
        """
        target = self.path(sha256)
        want = sha256.lower()
        if not verified and (got := sha256_file(path)) != want:
            raise ArtifactError(f"{path}: sha256 {got} does not match the expected {want}")
        self.tmp.mkdir(parents=True, exist_ok=True)
        if path.parent.resolve() != self.tmp.resolve():
            staged = self.tmp / f"{want}.{os.getpid()}.{threading.get_ident()}.add"
            shutil.move(path, staged)
            path = staged
        try:
            _seal(path)
            target.parent.mkdir(parents=True, exist_ok=True)
            path.replace(target)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return target


def _seal(path: Path) -> None:
    """Make a file read-only and durable before it is renamed into the cache."""
    path.chmod(0o444)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
