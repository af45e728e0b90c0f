"""Root metadata: which keys exist, which roles they fill, and how trust passes to a new root.

Modelled on TUF's root role. A host trusts one root; that root names the keys of two roles,
``root`` (may sign the next root) and ``bundle`` (may sign bundles), each with a threshold. A
new root replaces the trusted one only if it is the very next version and a threshold of BOTH
the old and the new root keys signed it, so a stolen minority of keys can neither forge a root
nor strand hosts on one that the new keys never agreed to.

Parsing is strict and exact (no unknown fields, keyids that are the hash of their keys, sorted
key lists) so that the bytes a signer signed are the only bytes that verify. Expiry is left to
the caller: only it has a clock it trusts.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from types import MappingProxyType
from typing import Any

from signing.bounded import quote
from signing.canonical import (
    decode_canonical,
    encode_canonical,
    format_time,
    is_int,
    normalize_time,
)
from signing.canonical import parse_time as _parse_time
from signing.errors import FormatError, RotationError, SignatureError
from signing.keys import PublicKey, SigningKey
from signing.threshold import (
    Role,
    Signature,
    is_keyid,
    parse_signatures,
    short_keyid,
    signatures_to_list,
    verify_threshold,
)

__all__ = [
    "BUNDLE_ROLE",
    "ROOT_ROLE",
    "ROLES",
    "SPEC_VERSION",
    "Role",
    "Root",
    "Signature",
    "SignedRoot",
    "parse_signatures",
    "sign_root",
    "signatures_to_list",
    "verify_root",
    "verify_rotation",
    "verify_threshold",
]

ROOT_ROLE = "root"
BUNDLE_ROLE = "bundle"
ROLES = frozenset({ROOT_ROLE, BUNDLE_ROLE})
SPEC_VERSION = "1"
_FIELDS = frozenset({"_type", "spec_version", "version", "expires", "keys", "roles"})


@dataclass(frozen=True)
class Root:
    """The keys and roles a host trusts. Immutable: ``keys`` and ``roles`` are read-only views.

    Not hashable (its mappings are not); compare with ``==`` or use :attr:`SignedRoot.fingerprint`.
    """

    version: int
    expires: datetime
    keys: Mapping[str, PublicKey]
    roles: Mapping[str, Role]

    def __post_init__(self) -> None:
        if not is_int(self.version) or self.version < 1:
            raise FormatError("root: version must be an integer >= 1")
        object.__setattr__(self, "expires", normalize_time(self.expires))
        if not isinstance(self.keys, Mapping) or not isinstance(self.roles, Mapping):
            raise FormatError("root: keys and roles must be mappings")
        # Checked before sorting: a non-string keyid would make sorted() raise TypeError.
        if not all(isinstance(keyid, str) for keyid in [*self.keys, *self.roles]):
            raise FormatError("root: keyids and role names must be strings")
        keys = dict(sorted(self.keys.items()))
        for keyid, key in keys.items():
            if not isinstance(key, PublicKey):
                raise FormatError(f"root: key {quote(keyid)} is not a PublicKey")
            if keyid != key.keyid:
                raise FormatError(
                    f"root: keyid {short_keyid(str(keyid))} does not match its key"
                    f" (whose keyid is {short_keyid(key.keyid)})"
                )
        roles = dict(sorted(self.roles.items()))
        if set(roles) != ROLES:
            raise FormatError(
                f"root: roles must be exactly {sorted(ROLES)}, got {quote(sorted(roles))}"
            )
        for name, role in roles.items():
            if not isinstance(role, Role):
                raise FormatError(f"root: role {quote(name)} is not a Role")
            for keyid in role.keyids:
                if keyid not in keys:
                    raise FormatError(
                        f"root: role '{name}' names keyid {short_keyid(keyid)},"
                        " which is not among the root keys"
                    )
        object.__setattr__(self, "keys", MappingProxyType(keys))
        object.__setattr__(self, "roles", MappingProxyType(roles))

    def role(self, name: str) -> Role:
        """The role called ``name`` (``"root"`` or ``"bundle"``)."""
        return self.roles[name]

    def is_expired(self, now: datetime) -> bool:
        """True when ``now`` (an aware datetime) is at or past :attr:`expires`."""
        return normalize_time(now) >= self.expires  # whole seconds: same answer as untruncated

    def to_signed_dict(self) -> dict[str, Any]:
        """The ``signed`` part of root metadata, ready for :func:`encode_canonical`."""
        return {
            "_type": "root",
            "spec_version": SPEC_VERSION,
            "version": self.version,
            "expires": format_time(self.expires),
            "keys": {keyid: key.to_metadata() for keyid, key in self.keys.items()},
            "roles": {name: role.to_dict() for name, role in self.roles.items()},
        }

    @classmethod
    def from_signed_dict(cls, value: object) -> Root:
        """Parse the ``signed`` part of root metadata strictly; FormatError on any deviation."""
        if not isinstance(value, dict):
            raise FormatError("root: signed must be an object")
        if set(value) != _FIELDS:
            raise FormatError(f"root: signed must have exactly the fields {sorted(_FIELDS)}")
        if value["_type"] != "root":
            raise FormatError(f"root: _type must be 'root', got {quote(value['_type'])}")
        if value["spec_version"] != SPEC_VERSION:
            raise FormatError(f"root: spec_version must be {SPEC_VERSION!r}")
        version = value["version"]
        if not is_int(version) or version < 1:
            raise FormatError("root: version must be an integer >= 1")
        expires = _parse_time(value["expires"], what="root expires")

        raw_keys = value["keys"]
        if not isinstance(raw_keys, dict):
            raise FormatError("root: keys must be an object")
        keys: dict[str, PublicKey] = {}
        for keyid, raw_key in raw_keys.items():
            if not is_keyid(keyid):
                raise FormatError("root: keyids must be 64 lowercase hex digits")
            keys[keyid] = PublicKey.from_metadata(raw_key, what=f"root key {short_keyid(keyid)}")

        raw_roles = value["roles"]
        if not isinstance(raw_roles, dict):
            raise FormatError("root: roles must be an object")
        if set(raw_roles) != ROLES:
            raise FormatError(f"root: roles must be exactly {sorted(ROLES)}")
        roles = {
            name: Role.from_dict(raw_role, what=f"root role '{name}'")
            for name, raw_role in raw_roles.items()
        }
        return cls(version=version, expires=expires, keys=keys, roles=roles)


@dataclass(frozen=True)
class SignedRoot:
    """A root and the signatures over its canonical bytes."""

    root: Root
    signatures: tuple[Signature, ...]

    def __post_init__(self) -> None:
        signatures = tuple(self.signatures)
        if not all(isinstance(sig, Signature) for sig in signatures):
            raise FormatError("root: signatures must be Signature objects")
        object.__setattr__(self, "signatures", signatures)

    @property
    def signed_bytes(self) -> bytes:
        """The bytes every signature covers: canonical JSON of :meth:`Root.to_signed_dict`."""
        return encode_canonical(self.root.to_signed_dict())

    @property
    def fingerprint(self) -> str:
        """SHA-256 (hex) of :attr:`signed_bytes`: names this root independently of signatures."""
        return hashlib.sha256(self.signed_bytes).hexdigest()

    def to_bytes(self) -> bytes:
        """Canonical JSON ``{"signed": ..., "signatures": [...]}``, no trailing newline."""
        return encode_canonical(
            {
                "signed": self.root.to_signed_dict(),
                "signatures": signatures_to_list(self.signatures),
            }
        )

    @classmethod
    def from_bytes(
        cls, data: bytes, *, max_length: int = 1 << 20, what: str = "root"
    ) -> SignedRoot:
        """Parse root metadata bytes; FormatError if too long, not canonical or not exact.

        Checks form only: call :func:`verify_root` or :func:`verify_rotation` to trust it.
        """
        if not isinstance(data, bytes | bytearray | memoryview):
            raise FormatError(f"{what}: expected bytes, got {type(data).__name__}")
        if len(data) > max_length:
            raise FormatError(f"{what}: {len(data)} bytes is more than the limit of {max_length}")
        value = decode_canonical(data, what=what)
        if not isinstance(value, dict) or set(value) != {"signed", "signatures"}:
            raise FormatError(f"{what}: must be an object with exactly signed, signatures")
        try:
            root = Root.from_signed_dict(value["signed"])
        except FormatError as exc:
            if what == "root":
                raise
            raise FormatError(f"{what}: {exc}") from None
        signatures = parse_signatures(value["signatures"], what=what)
        signed = cls(root, signatures)
        if signed.signed_bytes != encode_canonical(value["signed"]):  # pragma: no cover
            raise FormatError(f"{what}: signed part does not re-encode to the same bytes")
        return signed

    def with_signature(self, key: SigningKey) -> SignedRoot:
        """A copy signed by ``key`` too, replacing any signature that keyid already had."""
        keyid = key.keyid
        kept = tuple(sig for sig in self.signatures if sig.keyid != keyid)
        return SignedRoot(self.root, (*kept, Signature(keyid, key.sign(self.signed_bytes))))


def sign_root(root: Root, keys: Iterable[SigningKey]) -> SignedRoot:
    """``root`` signed by each of ``keys``."""
    signed = SignedRoot(root, ())
    for key in keys:
        signed = signed.with_signature(key)
    return signed


def verify_root(signed: SignedRoot, *, what: str = "root") -> frozenset[str]:
    """Check that a threshold of the root's OWN root role signed it (first trust of a root).

    Returns the keyids that counted; raises UnsignedError or SignatureError otherwise.
    """
    return verify_threshold(
        signed.signed_bytes,
        signed.signatures,
        keys=signed.root.keys,
        role=signed.root.roles[ROOT_ROLE],
        what=what,
        role_name=ROOT_ROLE,
    )


def verify_rotation(trusted: Root, new: SignedRoot) -> Root:
    """Return ``new.root`` if it may replace ``trusted``; RotationError otherwise.

    It must be version ``trusted.version + 1`` and be signed by a threshold of the trusted
    root's root role AND by a threshold of its own root role. Expiry is not checked here.
    """
    version = new.root.version
    if version != trusted.version + 1:
        raise RotationError(
            f"root rotation: version {version} does not follow trusted version {trusted.version}"
        )
    prefix = f"root rotation to version {version}"
    if not new.signatures:
        raise RotationError(f"{prefix}: the new root carries no signatures")
    message = new.signed_bytes
    checks = (
        (
            trusted,
            f"not signed by a threshold of the trusted root (version {trusted.version}) keys",
        ),
        (new.root, f"not signed by a threshold of its own (version {version}) root keys"),
    )
    for root, failure in checks:
        try:
            verify_threshold(
                message,
                new.signatures,
                keys=root.keys,
                role=root.roles[ROOT_ROLE],
                what=f"{prefix}: {failure}",
                role_name=ROOT_ROLE,
            )
        except SignatureError as exc:
            raise RotationError(str(exc)) from exc
    return new.root
