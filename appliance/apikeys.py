"""API keys for the REST server: ``DIR/api-keys.json``, hashes only, written atomically (0600).

A key is shown once, when it is made, and never stored: the file keeps its SHA-256. A plain
hash (no salt, no slow KDF) is enough because keys are 256-bit random strings, not passwords:
there is nothing to guess. :meth:`KeyStore.verify` compares the presented key's hash with every
stored hash in constant time and never stops at the first match, so neither the timing nor the
order of the file says which key (or how much of one) matched.
"""

from __future__ import annotations

import builtins
import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from appliance.fsutil import atomic_write
from appliance.slots import HostPaths
from signing.canonical import format_time
from signing.errors import InputError, IntegrityError, StateError

KEY_PREFIX: Final = "sk-air-"
FILE_MODE: Final = 0o600
_FORMAT_VERSION: Final = 1
_NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_SHA256_RE: Final = re.compile(r"[0-9a-f]{64}")


def key_file(root: Path) -> Path:
    """Where the keys of the appliance whose root directory is ``root`` live (the layout is
    appliance.slots's)."""
    return HostPaths(root).api_keys


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class ApiKey:
    name: str
    sha256: str
    created: str

    def to_json(self) -> dict[str, str]:
        return {"name": self.name, "sha256": self.sha256, "created": self.created}


class KeyStore:
    """The key file of one appliance. Every method reads the file afresh."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def add(self, name: str) -> str:
        """Make a key called ``name`` and return it; this is the only time it is ever seen."""
        if not _NAME_RE.fullmatch(name):
            raise InputError(
                f"key name {name!r} must be 1-64 letters, digits, '.', '_' or '-', "
                "starting with a letter or digit"
            )
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        with self._locked():
            keys = self.list()
            if any(k.name == name for k in keys):
                raise InputError(f"an API key named {name!r} exists already; revoke it first")
            created = format_time(datetime.now(UTC).replace(microsecond=0))
            self._save([*keys, ApiKey(name=name, sha256=hash_key(key), created=created)])
        return key

    def revoke(self, name: str) -> None:
        with self._locked():
            keys = self.list()
            kept = [k for k in keys if k.name != name]
            if len(kept) == len(keys):
                raise InputError(f"no API key named {name!r}")
            self._save(kept)

    def list(self) -> builtins.list[ApiKey]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise StateError(f"cannot read API key file {self.path}: {exc.strerror}") from None
        return _parse(raw, self.path)

    def verify(self, presented: str) -> str | None:
        """The name of the stored key equal to ``presented``, or None."""
        return match_key(self.list(), presented)

    def _save(self, keys: builtins.list[ApiKey]) -> None:
        doc = {"version": _FORMAT_VERSION, "keys": [k.to_json() for k in keys]}
        data = json.dumps(doc, indent=2, sort_keys=True).encode("utf-8") + b"\n"
        atomic_write(self.path, data, mode=FILE_MODE)
        # atomic_write's mode is masked by the umask; a key file must never be group-readable.
        self.path.chmod(FILE_MODE)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialise read-modify-write cycles of concurrent ``keys add``/``revoke`` runs."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


def match_key(keys: builtins.list[ApiKey], presented: str) -> str | None:
    """Constant-time lookup: every stored hash is compared, whatever matched before."""
    digest = hash_key(presented).encode("ascii")
    found: str | None = None
    for key in keys:
        if hmac.compare_digest(digest, key.sha256.encode("ascii")) and found is None:
            found = key.name
    return found


def _parse(raw: bytes, path: Path) -> builtins.list[ApiKey]:
    try:
        doc: Any = json.loads(raw)
        version = doc["version"]
        keys = [
            ApiKey(name=str(k["name"]), sha256=str(k["sha256"]), created=str(k["created"]))
            for k in doc["keys"]
        ]
    except (ValueError, KeyError, TypeError) as exc:
        raise IntegrityError(f"API key file {path} is damaged: {exc}") from None
    if version != _FORMAT_VERSION:
        raise IntegrityError(f"API key file {path} has unsupported version {version!r}")
    for key in keys:
        if not _SHA256_RE.fullmatch(key.sha256):
            raise IntegrityError(f"API key file {path} is damaged: bad hash for {key.name!r}")
    return keys
