"""Key files on the online machine: create a key pair safely, read private and public keys.

Private key files are created with mode 0o600 in one step (never world-readable, even
briefly) and never overwritten; every failure to read one is a
:class:`~signing.errors.KeyFileError` with one clear line. The keys themselves (PEM in and
out, signing, keyids) are the shared pure core's (signing.keys); only this half holds private
keys, so only it reads and writes key files.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Final

from signing.errors import FormatError, KeyFileError
from signing.keys import ENCRYPTED_MARKERS, PRIVATE_MARKER, PublicKey, SigningKey

_MAX_KEY_FILE: Final = 64 * 1024


def public_key_path(path: Path) -> Path:
    """Where :func:`write_key_pair` puts the public half of the key at ``path``."""
    return path.with_name(path.name + ".pub")


def _create(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` (never replacing anything) with ``mode`` from the first byte on."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except OSError:
        os.close(fd)
        with contextlib.suppress(OSError):
            path.unlink()  # we created it a moment ago: remove the partial file
        raise
    os.close(fd)


def write_key_pair(path: Path, key: SigningKey, passphrase: bytes | None) -> None:
    """Write the private key to ``path`` (mode 0o600) and its public key beside it (0o644).

    Refuses (KeyFileError) if either file exists; leaves no private file behind on failure.
    """
    pub_path = public_key_path(path)
    private_pem = key.to_pem(passphrase)
    if pub_path.exists() or pub_path.is_symlink():  # checked first, so nothing gets written
        raise KeyFileError(f"key {pub_path} already exists: refusing to overwrite it")
    try:  # O_EXCL alone guards the private file: no window between a check and the create
        _create(path, private_pem, 0o600)
    except FileExistsError:
        raise KeyFileError(f"key {path} already exists: refusing to overwrite it") from None
    except OSError as exc:
        raise KeyFileError(f"key {path}: cannot write: {exc.strerror}") from None
    try:
        _create(pub_path, key.public_key.to_pem(), 0o644)
    except OSError as exc:
        with contextlib.suppress(OSError):
            path.unlink()
        if isinstance(exc, FileExistsError):
            raise KeyFileError(f"key {pub_path} already exists: refusing to overwrite it") from None
        raise KeyFileError(f"key {pub_path}: cannot write: {exc.strerror}") from None


def _read_key_file(path: Path) -> bytes:
    try:
        with path.open("rb") as handle:
            data = handle.read(_MAX_KEY_FILE + 1)
    except FileNotFoundError:
        raise KeyFileError(f"key {path}: no such file") from None
    except OSError as exc:
        raise KeyFileError(f"key {path}: cannot read: {exc.strerror}") from None
    if len(data) > _MAX_KEY_FILE:
        raise KeyFileError(f"key {path}: larger than {_MAX_KEY_FILE} bytes, not a key file")
    return data


def load_signing_key(path: Path, passphrase: bytes | None) -> SigningKey:
    """Read a private key file; KeyFileError with one clear line on any problem."""
    return SigningKey.from_pem(_read_key_file(path), passphrase, what=str(path))


def load_public_key(path: Path) -> PublicKey:
    """Read a public key PEM, or the public half of an unencrypted private key PEM."""
    data = _read_key_file(path)
    if PRIVATE_MARKER in data:
        if any(marker in data for marker in ENCRYPTED_MARKERS):
            raise KeyFileError(
                f"key {path} is an encrypted private key: give its public key file instead"
            )
        return SigningKey.from_pem(data, None, what=str(path)).public_key
    try:
        return PublicKey.from_pem(data)
    except FormatError as exc:
        raise KeyFileError(f"key {path}: {exc}") from None
