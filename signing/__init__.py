"""Signing: canonical JSON, Ed25519 keys, threshold signatures and TUF-like root metadata.

Shared by both halves of the appliance (``builder`` signs, ``appliance`` verifies) and imports
neither. It is pure: bytes in, frozen typed objects out, and an exception from
:mod:`signing.errors` on anything doubtful. It also holds the bundle format both halves
share: the strict tar reader (:mod:`signing.tarstream`) and the bundle reader
(:mod:`signing.bundle`). Key files are the builder's (builder/keyfiles.py).
"""

from signing.canonical import (
    JSONValue,
    decode_canonical,
    encode_canonical,
    format_time,
    normalize_time,
    parse_time,
)
from signing.errors import (
    AirgapError,
    ExpiredError,
    FormatError,
    InputError,
    IntegrityError,
    KeyFileError,
    PayloadError,
    PolicyError,
    RecipeError,
    RotationError,
    SignatureError,
    StateError,
    UnsignedError,
    VerificationError,
)
from signing.keys import (
    KEY_TYPE,
    PublicKey,
    SigningKey,
)
from signing.metadata import (
    BUNDLE_ROLE,
    ROOT_ROLE,
    Root,
    SignedRoot,
    sign_root,
    verify_root,
    verify_rotation,
)
from signing.threshold import (
    Role,
    Signature,
    parse_signatures,
    signatures_to_list,
    verify_threshold,
)

__all__ = [
    # canonical
    "JSONValue",
    "decode_canonical",
    "encode_canonical",
    "format_time",
    "normalize_time",
    "parse_time",
    # errors
    "AirgapError",
    "ExpiredError",
    "FormatError",
    "InputError",
    "IntegrityError",
    "KeyFileError",
    "PayloadError",
    "PolicyError",
    "RecipeError",
    "RotationError",
    "SignatureError",
    "StateError",
    "UnsignedError",
    "VerificationError",
    # keys
    "KEY_TYPE",
    "PublicKey",
    "SigningKey",
    # metadata and threshold signatures
    "BUNDLE_ROLE",
    "ROOT_ROLE",
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
