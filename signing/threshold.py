"""Threshold signatures: M valid signatures out of a role's N keys, or refuse.

This is the one place that decides whether signed bytes are trusted, so its rules are few and
strict: a keyid counts at most once however often it appears, keys outside the role never count,
invalid signatures never count, and a failure says in one line exactly why the count fell short
(duplicates, unknown keys, bad signatures), in a stable order, so operators can act on it;
the first few problems are named and the rest counted, so the line stays short whatever the input.

Signatures are always over canonical bytes; this module never parses what they cover.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from signing.bounded import listing
from signing.canonical import is_int
from signing.errors import FormatError, SignatureError, UnsignedError
from signing.keys import PublicKey

KEYID_RE = re.compile(r"\A[0-9a-f]{64}\Z")
_SIG_RE = re.compile(r"\A[0-9a-f]{128}\Z")
_SHORT = 12


def short_keyid(keyid: str) -> str:
    """The first 12 hex digits of a keyid, as messages show it."""
    return keyid[:_SHORT]


def is_keyid(value: object) -> bool:
    """True for a well-formed keyid: 64 lowercase hex digits."""
    return isinstance(value, str) and KEYID_RE.match(value) is not None


@dataclass(frozen=True)
class Signature:
    """One Ed25519 signature and the keyid of the key that made it."""

    keyid: str
    sig: bytes

    def __post_init__(self) -> None:
        if not is_keyid(self.keyid):
            raise FormatError("signature keyid must be 64 lowercase hex digits")
        if not isinstance(self.sig, bytes) or len(self.sig) != 64:
            raise FormatError("an Ed25519 signature is 64 bytes")

    def to_dict(self) -> dict[str, str]:
        return {"keyid": self.keyid, "sig": self.sig.hex()}

    @classmethod
    def from_dict(cls, value: object, *, what: str) -> Signature:
        """Parse ``{"keyid": ..., "sig": ...}`` strictly; FormatError prefixed with ``what``."""
        if not isinstance(value, dict):
            raise FormatError(f"{what}: signature must be an object")
        if set(value) != {"keyid", "sig"}:
            raise FormatError(f"{what}: signature must have exactly the fields ['keyid', 'sig']")
        keyid, sig = value["keyid"], value["sig"]
        if not is_keyid(keyid):
            raise FormatError(f"{what}: signature keyid must be 64 lowercase hex digits")
        if not isinstance(sig, str) or _SIG_RE.match(sig) is None:
            raise FormatError(f"{what}: signature sig must be 128 lowercase hex digits")
        return cls(keyid, bytes.fromhex(sig))


def parse_signatures(value: object, *, what: str) -> tuple[Signature, ...]:
    """Parse a JSON list of signature objects (duplicates are kept; counting handles them)."""
    if not isinstance(value, list):
        raise FormatError(f"{what}: signatures must be a list")
    return tuple(
        Signature.from_dict(item, what=f"{what} signature {index}")
        for index, item in enumerate(value)
    )


def signatures_to_list(sigs: Iterable[Signature]) -> list[dict[str, str]]:
    """Signatures as JSON objects, sorted by keyid (then signature) so output is deterministic."""
    return [sig.to_dict() for sig in sorted(sigs, key=lambda s: (s.keyid, s.sig))]


@dataclass(frozen=True)
class Role:
    """Who may sign: a set of keyids and how many of them must sign.

    ``keyids`` is kept sorted, so two roles with the same keys compare equal.
    """

    keyids: tuple[str, ...]
    threshold: int

    def __post_init__(self) -> None:
        keyids = tuple(self.keyids)
        if not all(is_keyid(keyid) for keyid in keyids):
            raise FormatError("role keyids must be 64 lowercase hex digits each")
        if len(set(keyids)) != len(keyids):
            raise FormatError("role keyids must be unique")
        threshold = self.threshold
        if not is_int(threshold):
            raise FormatError("role threshold must be an integer")
        if not 1 <= threshold <= len(keyids):
            raise FormatError(
                f"role threshold {threshold} must be between 1 and its {len(keyids)} keys"
            )
        object.__setattr__(self, "keyids", tuple(sorted(keyids)))

    def to_dict(self) -> dict[str, object]:
        return {"keyids": list(self.keyids), "threshold": self.threshold}

    @classmethod
    def from_dict(cls, value: object, *, what: str) -> Role:
        """Parse ``{"keyids": [...], "threshold": n}`` strictly (keyids sorted, unique)."""
        if not isinstance(value, dict) or set(value) != {"keyids", "threshold"}:
            raise FormatError(f"{what}: role must be an object with exactly keyids, threshold")
        keyids, threshold = value["keyids"], value["threshold"]
        if not isinstance(keyids, list) or not all(is_keyid(k) for k in keyids):
            raise FormatError(f"{what}: keyids must be a list of 64-hex-digit keyids")
        if keyids != sorted(set(keyids)):
            raise FormatError(f"{what}: keyids must be sorted and unique")
        if not is_int(threshold):
            raise FormatError(f"{what}: threshold must be an integer")
        try:
            return cls(tuple(keyids), threshold)
        except FormatError as exc:
            raise FormatError(f"{what}: {exc}") from None


def verify_threshold(
    message: bytes,
    signatures: Sequence[Signature],
    *,
    keys: Mapping[str, PublicKey],
    role: Role,
    what: str,
    role_name: str | None = None,
) -> frozenset[str]:
    """Return the keyids whose valid signatures of ``message`` count toward ``role``.

    Raises UnsignedError when there are no signatures at all, and SignatureError (one line:
    the count, then each problem by keyid, sorted) when fewer than ``role.threshold`` count.
    A keyid counts only if it is in the role, its key in ``keys`` really has that keyid, and
    one of its signatures verifies; it counts once however many times it appears.
    """
    if not signatures:
        raise UnsignedError(f"{what} carries no signatures")
    by_keyid: dict[str, list[bytes]] = {}
    for signature in signatures:
        by_keyid.setdefault(signature.keyid, []).append(signature.sig)
    occurrences = Counter(signature.keyid for signature in signatures)

    counted: set[str] = set()
    details: list[str] = []
    for keyid in sorted(by_keyid):
        short = short_keyid(keyid)
        key = keys.get(keyid)
        known = keyid in role.keyids and key is not None and key.keyid == keyid
        valid = known and key is not None and any(key.verify(s, message) for s in by_keyid[keyid])
        if valid:
            counted.add(keyid)
        times = occurrences[keyid]
        if times > 1:
            suffix = ", counted once" if valid else ""
            details.append(f"keyid {short} appears {times} times{suffix}")
        if not known:
            details.append(f"unknown keyid {short}")
        elif not valid:
            details.append(f"invalid signature by keyid {short}")

    if len(counted) < role.threshold:
        line = f"{what}: {len(counted)} of {role.threshold} required signatures"
        if role_name is not None:
            line += f" from role '{role_name}'"
        # Bounded: a block of thousands of signatures by unknown keys must not become a
        # message (and an audit record) of thousands of problems.
        if details:
            line += "; " + listing(details)
        raise SignatureError(line)
    return frozenset(counted)
