"""Trust decisions over a bundle's head: signatures, threshold, expiry, version (pure core).

Takes bytes, a trusted root and a point in time; returns a :class:`VerifiedManifest` or raises.
No clock, disk or network is touched here: the caller decides what "now" is (see
docs/bundle-format.md, "Clocks") and what the highest installed version is.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime

from signing.bundle import BundleHead
from signing.canonical import format_time
from signing.errors import ExpiredError, PolicyError
from signing.manifest import BundleManifest, decode_signature_block
from signing.metadata import BUNDLE_ROLE, Root, verify_threshold


@dataclass(frozen=True)
class VerifiedManifest:
    """A manifest whose bytes a threshold of trusted bundle keys signed, unexpired at ``now``."""

    manifest: BundleManifest
    manifest_bytes: bytes
    manifest_sha256: str
    signers: frozenset[str]


def verify_head(head: BundleHead, *, root: Root, now: datetime) -> VerifiedManifest:
    """Steps V4 and V5 of docs/bundle-format.md."""
    # V4.1: the trusted root itself must be valid now.
    if root.is_expired(now):
        raise ExpiredError(
            f"trusted root version {root.version} expired at {format_time(root.expires)}; "
            "install a newer root with 'appliance trust update'"
        )
    # V4.2: a threshold of the root's bundle keys signed these exact manifest bytes.
    signatures = decode_signature_block(head.signature_block)
    signers = verify_threshold(
        head.manifest_bytes,
        signatures,
        keys=root.keys,
        role=root.roles[BUNDLE_ROLE],
        role_name=BUNDLE_ROLE,
        what="bundle manifest",
    )
    # V5: only signed bytes are parsed into a manifest; then expiry.
    manifest = BundleManifest.from_bytes(head.manifest_bytes)
    if manifest.is_expired(now):
        raise ExpiredError(
            f"bundle {manifest.name} {manifest.version} expired at {format_time(manifest.expires)}"
        )
    return VerifiedManifest(
        manifest=manifest,
        manifest_bytes=head.manifest_bytes,
        manifest_sha256=hashlib.sha256(head.manifest_bytes).hexdigest(),
        signers=signers,
    )


def check_version(manifest: BundleManifest, *, highest: str | None, allow_downgrade: bool) -> None:
    """Step I3: refuse a version <= the highest ever installed under that name."""
    if highest is None or allow_downgrade:
        return
    if manifest.parsed_version <= BundleManifest.parse_version(highest):
        raise PolicyError(
            f"bundle {manifest.name} {manifest.version} is not newer than installed "
            f"version {highest} (downgrade or replay); use --allow-downgrade to force"
        )
