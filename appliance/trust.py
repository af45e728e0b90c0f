"""The host's trust store: the root of keys installed out of band, and its rotations.

``initialise`` is the one moment trust is taken on faith, so it shows a fingerprint for the
operator to compare out of band (or checks one given with ``--fingerprint``). Every later root
must be a valid rotation of the trusted one (signing.metadata.verify_rotation).
"""

from __future__ import annotations

import hmac
from datetime import datetime
from pathlib import Path

from appliance.fsutil import atomic_write
from appliance.limits import HOST_LIMITS
from appliance.slots import HostPaths
from signing.bounded import MAX_QUOTED, clip
from signing.canonical import format_time
from signing.errors import ExpiredError, FormatError, InputError, StateError
from signing.metadata import Root, SignedRoot, verify_root, verify_rotation


class TrustStore:
    def __init__(self, paths: HostPaths) -> None:
        self._paths = paths

    def is_initialised(self) -> bool:
        return self._paths.trusted_root.exists()

    def load(self) -> SignedRoot:
        try:
            data = self._paths.trusted_root.read_bytes()
        except FileNotFoundError:
            raise StateError(
                f"no trusted root in {self._paths.root}: run 'appliance trust init root.json'"
            ) from None
        return SignedRoot.from_bytes(data, max_length=HOST_LIMITS.max_root_bytes)

    def initialise(self, data: bytes, *, fingerprint: str | None, now: datetime) -> SignedRoot:
        """Trust ``data`` as the first root: self-signed, unexpired, matching ``fingerprint``."""
        if self.is_initialised():
            raise StateError("a trusted root is already installed; use 'appliance trust update'")
        signed = SignedRoot.from_bytes(data, max_length=HOST_LIMITS.max_root_bytes)
        if fingerprint is not None and not hmac.compare_digest(
            fingerprint.strip().lower(), signed.fingerprint
        ):
            raise InputError(
                f"root fingerprint {signed.fingerprint} does not match the expected "
                f"{clip(fingerprint, MAX_QUOTED)}"
            )
        verify_root(signed)
        check_root_expiry(signed.root, now)
        self._persist(signed)
        return signed

    def rotate(self, data: bytes, *, now: datetime) -> SignedRoot:
        """Trust root v(N+1) only if v(N)'s and its own root thresholds both signed it."""
        trusted = self.load()
        new = SignedRoot.from_bytes(data, max_length=HOST_LIMITS.max_root_bytes)
        verify_rotation(trusted.root, new)
        check_root_expiry(new.root, now)
        self._persist(new)
        return new

    def _persist(self, signed: SignedRoot) -> None:
        data = signed.to_bytes()
        atomic_write(self._paths.root_history / f"{signed.root.version}.root.json", data)
        atomic_write(self._paths.trusted_root, data)


def check_root_expiry(root: Root, now: datetime) -> None:
    if root.is_expired(now):
        raise ExpiredError(f"root version {root.version} expired at {format_time(root.expires)}")


def read_root_file(path: Path) -> bytes:
    try:
        if path.stat().st_size > HOST_LIMITS.max_root_bytes:
            raise FormatError(
                f"{clip(str(path), MAX_QUOTED)}: root metadata larger than "
                f"{HOST_LIMITS.max_root_bytes} bytes"
            )
        return path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read {clip(str(path), MAX_QUOTED)}: {exc.strerror}") from None
