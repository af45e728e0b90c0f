"""Root metadata, self-signed roots and root rotation, with real Ed25519 keys."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from signing.canonical import encode_canonical
from signing.errors import FormatError, RotationError, SignatureError, UnsignedError
from signing.keys import PublicKey, SigningKey
from signing.metadata import (
    BUNDLE_ROLE,
    ROOT_ROLE,
    Role,
    Root,
    SignedRoot,
    sign_root,
    verify_root,
    verify_rotation,
)

EXPIRES = datetime(2030, 1, 1, tzinfo=UTC)


def _keys(count: int) -> list[SigningKey]:
    return sorted((SigningKey.generate() for _ in range(count)), key=lambda k: k.keyid)


def _short(key: SigningKey) -> str:
    return key.keyid[:12]


def _role(keys: Sequence[SigningKey], threshold: int) -> Role:
    return Role(tuple(k.keyid for k in keys), threshold)


def _root(
    root_keys: Sequence[SigningKey],
    threshold: int,
    *,
    version: int = 1,
    bundle_keys: Sequence[SigningKey] = (),
) -> Root:
    bundle = list(bundle_keys) or list(root_keys)
    everyone = {k.keyid: k.public_key for k in [*root_keys, *bundle]}
    return Root(
        version=version,
        expires=EXPIRES,
        keys=everyone,
        roles={ROOT_ROLE: _role(root_keys, threshold), BUNDLE_ROLE: _role(bundle, 1)},
    )


# --- root metadata ----------------------------------------------------------------------------


def test_root_round_trip_to_bytes() -> None:
    keys = _keys(3)
    signed = sign_root(_root(keys, 2, bundle_keys=_keys(2)), keys[:2])
    data = signed.to_bytes()
    assert not data.endswith(b"\n")
    again = SignedRoot.from_bytes(data)
    assert again == signed
    assert again.to_bytes() == data
    assert again.fingerprint == hashlib.sha256(signed.signed_bytes).hexdigest()
    assert verify_root(again) == frozenset(k.keyid for k in keys[:2])


def test_root_signed_dict_shape() -> None:
    keys = _keys(2)
    root = _root(keys, 2)
    value = root.to_signed_dict()
    assert value == {
        "_type": "root",
        "spec_version": "1",
        "version": 1,
        "expires": "2030-01-01T00:00:00Z",
        "keys": {k.keyid: k.public_key.to_metadata() for k in keys},
        "roles": {
            "bundle": {"keyids": [k.keyid for k in keys], "threshold": 1},
            "root": {"keyids": [k.keyid for k in keys], "threshold": 2},
        },
    }
    assert Root.from_signed_dict(value) == root


def test_root_is_immutable() -> None:
    root = _root(_keys(1), 1)
    with pytest.raises(TypeError):
        root.keys["x"] = root.keys[next(iter(root.keys))]  # type: ignore[index]


def test_root_expires_is_normalized_to_utc_seconds() -> None:
    plus_one = timezone(timedelta(hours=1))
    keys = _keys(1)
    root = Root(
        version=1,
        expires=datetime(2030, 1, 1, 1, 0, 0, 500_000, tzinfo=plus_one),
        keys={keys[0].keyid: keys[0].public_key},
        roles={ROOT_ROLE: _role(keys, 1), BUNDLE_ROLE: _role(keys, 1)},
    )
    assert root.expires == EXPIRES
    assert root.expires.tzinfo is UTC


def test_root_keyid_must_match_key() -> None:
    real, other = _keys(2)
    with pytest.raises(FormatError) as caught:
        Root(
            version=1,
            expires=EXPIRES,
            keys={real.keyid: real.public_key, other.keyid: real.public_key},
            roles={ROOT_ROLE: _role([real, other], 2), BUNDLE_ROLE: _role([real], 1)},
        )
    assert str(caught.value) == (
        f"root: keyid {_short(other)} does not match its key (whose keyid is {_short(real)})"
    )


def test_root_keyid_mismatch_in_bytes_rejected() -> None:
    real, other = _keys(2)
    value = _root([real, other], 2).to_signed_dict()
    value["keys"][other.keyid] = real.public_key.to_metadata()
    data = encode_canonical({"signed": value, "signatures": []})
    with pytest.raises(FormatError) as caught:
        SignedRoot.from_bytes(data)
    assert str(caught.value) == (
        f"root: keyid {_short(other)} does not match its key (whose keyid is {_short(real)})"
    )


def test_role_must_name_known_keys() -> None:
    known, unknown = _keys(2)
    with pytest.raises(FormatError) as caught:
        Root(
            version=1,
            expires=EXPIRES,
            keys={known.keyid: known.public_key},
            roles={ROOT_ROLE: _role([known], 1), BUNDLE_ROLE: _role([unknown], 1)},
        )
    assert str(caught.value) == (
        f"root: role 'bundle' names keyid {_short(unknown)}, which is not among the root keys"
    )


def test_roles_must_be_exactly_root_and_bundle() -> None:
    keys = _keys(1)
    with pytest.raises(FormatError) as caught:
        Root(
            version=1,
            expires=EXPIRES,
            keys={keys[0].keyid: keys[0].public_key},
            roles={ROOT_ROLE: _role(keys, 1)},
        )
    assert str(caught.value) == "root: roles must be exactly ['bundle', 'root'], got ['root']"


def _signed_value() -> dict[str, Any]:
    return _root(_keys(2), 1).to_signed_dict()


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (
            lambda v: v.update(extra=1),
            "root: signed must have exactly the fields"
            " ['_type', 'expires', 'keys', 'roles', 'spec_version', 'version']",
        ),
        (lambda v: v.update(_type="bundle"), "root: _type must be 'root', got 'bundle'"),
        (lambda v: v.update(spec_version="2"), "root: spec_version must be '1'"),
        (lambda v: v.update(version=True), "root: version must be an integer >= 1"),
        (lambda v: v.update(version=0), "root: version must be an integer >= 1"),
        (lambda v: v.update(version="1"), "root: version must be an integer >= 1"),
        (
            lambda v: v.update(expires="2030-01-01"),
            "root expires: time '2030-01-01' is not in the form YYYY-MM-DDTHH:MM:SSZ",
        ),
        (lambda v: v.update(keys=[]), "root: keys must be an object"),
        (lambda v: v["roles"].pop("bundle"), "root: roles must be exactly ['bundle', 'root']"),
        (
            lambda v: v["roles"]["root"].update(keyids=v["roles"]["root"]["keyids"][::-1]),
            "root role 'root': keyids must be sorted and unique",
        ),
        (
            lambda v: v["roles"]["root"].update(threshold=3),
            "root role 'root': role threshold 3 must be between 1 and its 2 keys",
        ),
        (
            lambda v: v["roles"]["root"].update(threshold=False),
            "root role 'root': threshold must be an integer",
        ),
    ],
)
def test_root_parsing_is_strict(mutate: Any, message: str) -> None:
    value = _signed_value()
    mutate(value)
    data = encode_canonical({"signatures": [], "signed": value})
    with pytest.raises(FormatError) as caught:
        SignedRoot.from_bytes(data)
    assert str(caught.value) == message


def test_root_bytes_must_be_canonical_and_bounded() -> None:
    keys = _keys(2)
    data = sign_root(_root(keys, 1), keys[:1]).to_bytes()
    pretty = json.dumps(json.loads(data), indent=1).encode()
    with pytest.raises(FormatError) as caught:
        SignedRoot.from_bytes(pretty)
    assert str(caught.value) == "root: not canonical JSON"
    with pytest.raises(FormatError) as caught:
        SignedRoot.from_bytes(data, max_length=len(data) - 1)
    assert str(caught.value) == (
        f"root: {len(data)} bytes is more than the limit of {len(data) - 1}"
    )
    with pytest.raises(FormatError) as caught:
        SignedRoot.from_bytes(encode_canonical({"signed": {}}))
    assert str(caught.value) == "root: must be an object with exactly signed, signatures"


def test_verify_root_needs_its_own_threshold() -> None:
    keys = _keys(3)
    signed = sign_root(_root(keys, 2), keys[:1])
    with pytest.raises(SignatureError) as caught:
        verify_root(signed)
    assert str(caught.value) == "root: 1 of 2 required signatures from role 'root'"
    with pytest.raises(UnsignedError) as caught_unsigned:
        verify_root(SignedRoot(signed.root, ()))
    assert str(caught_unsigned.value) == "root carries no signatures"


def test_with_signature_replaces_the_same_key() -> None:
    keys = _keys(2)
    signed = sign_root(_root(keys, 2), [keys[0], keys[0], keys[1]])
    assert sorted(s.keyid for s in signed.signatures) == [k.keyid for k in keys]
    assert verify_root(signed) == frozenset(k.keyid for k in keys)


def test_expiry() -> None:
    root = _root(_keys(1), 1)
    assert not root.is_expired(EXPIRES - timedelta(microseconds=1))
    assert root.is_expired(EXPIRES)
    assert root.is_expired(EXPIRES + timedelta(seconds=1))
    assert not root.is_expired(datetime(2030, 1, 1, 0, 59, 59, tzinfo=timezone(timedelta(hours=1))))
    assert root.is_expired(datetime(2030, 1, 1, 1, 0, 0, tzinfo=timezone(timedelta(hours=1))))


# --- rotation ---------------------------------------------------------------------------------


def test_rotation_accepted_with_both_thresholds() -> None:
    old = _keys(3)
    new = _keys(3)
    trusted = _root(old, 2)
    successor = _root(new, 2, version=2)
    signed = sign_root(successor, [old[0], old[1], new[1], new[2]])
    assert verify_rotation(trusted, signed) == successor


def test_rotation_with_overlapping_keys() -> None:
    a, b, c = _keys(3)
    trusted = _root([a, b], 2)
    successor = _root([b, c], 2, version=2)
    signed = sign_root(successor, [a, b, c])
    assert verify_rotation(trusted, signed) == successor


def test_rotation_refused_without_old_threshold() -> None:
    old = _keys(3)
    new = _keys(2)
    signed = sign_root(_root(new, 2, version=2), [old[0], *new])
    with pytest.raises(RotationError) as caught:
        verify_rotation(_root(old, 2), signed)
    assert str(caught.value).startswith(
        "root rotation to version 2: not signed by a threshold of the trusted root (version 1)"
        " keys: 1 of 2 required signatures from role 'root'; "
    )
    assert isinstance(caught.value.__cause__, SignatureError)


def test_rotation_refused_without_new_threshold() -> None:
    old = _keys(2)
    new = _keys(3)
    signed = sign_root(_root(new, 3, version=2), [*old, new[0], new[1]])
    with pytest.raises(RotationError) as caught:
        verify_rotation(_root(old, 2), signed)
    assert str(caught.value).startswith(
        "root rotation to version 2: not signed by a threshold of its own (version 2) root keys:"
        " 2 of 3 required signatures from role 'root'; "
    )


def test_rotation_refused_when_signed_by_new_keys_only() -> None:
    old = _keys(2)
    new = _keys(2)
    signed = sign_root(_root(new, 2, version=2), new)
    with pytest.raises(RotationError) as caught:
        verify_rotation(_root(old, 2), signed)
    unknown = "; ".join(f"unknown keyid {_short(k)}" for k in new)
    assert str(caught.value) == (
        "root rotation to version 2: not signed by a threshold of the trusted root (version 1)"
        f" keys: 0 of 2 required signatures from role 'root'; {unknown}"
    )


@pytest.mark.parametrize("version", [1, 3, 5])
def test_rotation_refused_on_version_skip(version: int) -> None:
    keys = _keys(2)
    signed = sign_root(_root(keys, 2, version=version), keys)
    with pytest.raises(RotationError) as caught:
        verify_rotation(_root(keys, 2), signed)
    assert str(caught.value) == (
        f"root rotation: version {version} does not follow trusted version 1"
    )


def test_rotation_refused_when_unsigned() -> None:
    keys = _keys(1)
    with pytest.raises(RotationError) as caught:
        verify_rotation(_root(keys, 1), SignedRoot(_root(keys, 1, version=2), ()))
    assert str(caught.value) == "root rotation to version 2: the new root carries no signatures"


def test_rotation_does_not_check_expiry() -> None:
    keys = _keys(1)
    expired = Root(
        version=2,
        expires=datetime(2000, 1, 1, tzinfo=UTC),
        keys={keys[0].keyid: keys[0].public_key},
        roles={ROOT_ROLE: _role(keys, 1), BUNDLE_ROLE: _role(keys, 1)},
    )
    assert verify_rotation(_root(keys, 1), sign_root(expired, keys)) == expired


def test_public_key_type_is_checked_in_root() -> None:
    keys = _keys(1)
    with pytest.raises(FormatError) as caught:
        Root(
            version=1,
            expires=EXPIRES,
            keys={keys[0].keyid: keys[0].public_key.raw},  # type: ignore[dict-item]
            roles={ROOT_ROLE: _role(keys, 1), BUNDLE_ROLE: _role(keys, 1)},
        )
    assert str(caught.value) == f"root: key '{keys[0].keyid}' is not a PublicKey"
    assert isinstance(keys[0].public_key, PublicKey)


def test_metadata_re_exports_threshold_api() -> None:
    from signing import metadata, threshold

    for name in ("Role", "Signature", "parse_signatures", "signatures_to_list", "verify_threshold"):
        assert getattr(metadata, name) is getattr(threshold, name)
        assert name in metadata.__all__
