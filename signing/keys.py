"""Ed25519 keys: the public half that metadata names, the private half that signs.

One key type only (Ed25519), so no signature scheme is ever negotiated from untrusted input. A
key is named by its keyid, the SHA-256 of its 32 raw public bytes: the name is derived from the
key, so one key cannot be listed under two names and counted twice toward a threshold.

Pure, like the rest of ``signing``: keys from and to PEM bytes. Key *files* are the
builder's (builder/keyfiles.py): only the online half holds private keys.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from signing.errors import FormatError, KeyFileError

KEY_TYPE = "ed25519"
SCHEME = "ed25519"
ENCRYPTED_KEY_HINT = "give --passphrase or set APPLIANCE_KEY_PASSPHRASE"
ENCRYPTED_MARKERS = (b"-----BEGIN ENCRYPTED PRIVATE KEY-----", b"Proc-Type: 4,ENCRYPTED")
PRIVATE_MARKER = b"PRIVATE KEY-----"

_RAW_LENGTH = 32
_SIGNATURE_LENGTH = 64
_HEX64 = re.compile(r"\A[0-9a-f]{64}\Z")


@dataclass(frozen=True)
class PublicKey:
    """An Ed25519 public key: 32 raw bytes."""

    raw: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.raw, bytes) or len(self.raw) != _RAW_LENGTH:
            raise FormatError(f"an Ed25519 public key is {_RAW_LENGTH} bytes")

    @property
    def keyid(self) -> str:
        """SHA-256 (lowercase hex) of the raw public key bytes."""
        return hashlib.sha256(self.raw).hexdigest()

    def verify(self, signature: bytes, message: bytes) -> bool:
        """True if ``signature`` is this key's valid signature of ``message``; never raises."""
        if not isinstance(signature, bytes) or len(signature) != _SIGNATURE_LENGTH:
            return False
        try:
            Ed25519PublicKey.from_public_bytes(self.raw).verify(signature, message)
        except (InvalidSignature, ValueError, TypeError):
            return False
        return True

    def to_metadata(self) -> dict[str, str]:
        """The key as it appears in signed metadata."""
        return {"keytype": KEY_TYPE, "scheme": SCHEME, "public": self.raw.hex()}

    @classmethod
    def from_metadata(cls, value: object, *, what: str) -> PublicKey:
        """Parse :meth:`to_metadata` output strictly; FormatError prefixed with ``what``."""
        if not isinstance(value, dict):
            raise FormatError(f"{what}: key must be an object")
        expected = {"keytype", "scheme", "public"}
        if set(value) != expected:
            raise FormatError(f"{what}: key must have exactly the fields {sorted(expected)}")
        if value["keytype"] != KEY_TYPE:
            raise FormatError(f"{what}: keytype must be {KEY_TYPE!r}")
        if value["scheme"] != SCHEME:
            raise FormatError(f"{what}: scheme must be {SCHEME!r}")
        public = value["public"]
        if not isinstance(public, str) or _HEX64.match(public) is None:
            raise FormatError(f"{what}: public must be 64 lowercase hex digits")
        return cls(bytes.fromhex(public))

    def to_pem(self) -> bytes:
        """SubjectPublicKeyInfo PEM."""
        return Ed25519PublicKey.from_public_bytes(self.raw).public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    @classmethod
    def from_pem(cls, data: bytes) -> PublicKey:
        """Parse a SubjectPublicKeyInfo PEM; FormatError unless it holds an Ed25519 key."""
        try:
            loaded = serialization.load_pem_public_key(data)
        except (ValueError, TypeError):
            raise FormatError("not a PEM public key") from None
        if not isinstance(loaded, Ed25519PublicKey):
            raise FormatError("not an Ed25519 public key")
        return cls(loaded.public_bytes_raw())


class SigningKey:
    """An Ed25519 private key. Its repr never shows key material."""

    __slots__ = ("_private",)

    def __init__(self, private: Ed25519PrivateKey) -> None:
        if not isinstance(private, Ed25519PrivateKey):
            raise KeyFileError("not an Ed25519 private key")
        self._private = private

    @classmethod
    def generate(cls) -> SigningKey:
        """A fresh random key."""
        return cls(Ed25519PrivateKey.generate())

    @property
    def public_key(self) -> PublicKey:
        return PublicKey(self._private.public_key().public_bytes_raw())

    @property
    def keyid(self) -> str:
        return self.public_key.keyid

    def sign(self, message: bytes) -> bytes:
        """The 64-byte Ed25519 signature of ``message``."""
        return self._private.sign(message)

    def to_pem(self, passphrase: bytes | None) -> bytes:
        """PKCS#8 PEM, encrypted with ``passphrase`` when one is given (it must not be empty)."""
        encryption: serialization.KeySerializationEncryption
        if passphrase is None:
            encryption = serialization.NoEncryption()
        elif not passphrase:
            raise KeyFileError("an empty passphrase cannot encrypt a key")
        else:
            encryption = serialization.BestAvailableEncryption(passphrase)
        return self._private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
        )

    @classmethod
    def from_pem(
        cls, data: bytes, passphrase: bytes | None, *, what: str = "PEM data"
    ) -> SigningKey:
        """Load a PKCS#8 (or traditional) PEM private key; KeyFileError naming ``what``."""
        secret = passphrase or None  # an empty passphrase counts as none given
        encrypted = any(marker in data for marker in ENCRYPTED_MARKERS)
        if encrypted and secret is None:
            raise KeyFileError(f"key {what} is encrypted: {ENCRYPTED_KEY_HINT}")
        if not encrypted and secret is not None and PRIVATE_MARKER in data:
            raise KeyFileError(f"key {what} is not encrypted, but a passphrase was given")
        try:
            loaded = serialization.load_pem_private_key(data, secret)
        except (ValueError, TypeError):
            if encrypted:
                raise KeyFileError(f"key {what}: wrong passphrase") from None
            raise KeyFileError(f"key {what}: not a PEM private key") from None
        if not isinstance(loaded, Ed25519PrivateKey):
            raise KeyFileError(f"key {what}: not an Ed25519 private key")
        return cls(loaded)

    def __repr__(self) -> str:
        return f"SigningKey(keyid={self.keyid[:12]})"
