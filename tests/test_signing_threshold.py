"""Signatures, roles and threshold counting, with real Ed25519 keys and exact messages."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from signing.errors import FormatError, SignatureError, UnsignedError
from signing.keys import SigningKey
from signing.threshold import (
    Role,
    Signature,
    parse_signatures,
    signatures_to_list,
    verify_threshold,
)

MESSAGE = b"bundle manifest bytes"
HEX64 = "64 lowercase hex digits"
HEX128 = "128 lowercase hex digits"


def _keys(count: int) -> list[SigningKey]:
    return sorted((SigningKey.generate() for _ in range(count)), key=lambda k: k.keyid)


def _short(key: SigningKey) -> str:
    return key.keyid[:12]


def _role(keys: Sequence[SigningKey], threshold: int) -> Role:
    return Role(tuple(k.keyid for k in keys), threshold)


def _check(
    signatures: Sequence[Signature], keys: Sequence[SigningKey], threshold: int
) -> frozenset[str]:
    return verify_threshold(
        MESSAGE,
        signatures,
        keys={k.keyid: k.public_key for k in keys},
        role=_role(keys, threshold),
        what="bundle",
        role_name="bundle",
    )


def _sig(key: SigningKey, message: bytes = MESSAGE) -> Signature:
    return Signature(key.keyid, key.sign(message))


# --- signatures -------------------------------------------------------------------------------


def test_signature_dict_round_trip() -> None:
    sig = _sig(SigningKey.generate())
    value = sig.to_dict()
    assert value == {"keyid": sig.keyid, "sig": sig.sig.hex()}
    assert Signature.from_dict(value, what="bundle") == sig


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ([], "bundle: signature must be an object"),
        ({"keyid": "a" * 64}, "bundle: signature must have exactly the fields ['keyid', 'sig']"),
        ({"keyid": "A" * 64, "sig": "00" * 64}, f"bundle: signature keyid must be {HEX64}"),
        ({"keyid": "a" * 63, "sig": "00" * 64}, f"bundle: signature keyid must be {HEX64}"),
        ({"keyid": "a" * 64, "sig": "00" * 63}, f"bundle: signature sig must be {HEX128}"),
        ({"keyid": "a" * 64, "sig": "AA" * 64}, f"bundle: signature sig must be {HEX128}"),
        ({"keyid": "a" * 64, "sig": 5}, f"bundle: signature sig must be {HEX128}"),
    ],
)
def test_signature_from_dict_is_strict(value: object, message: str) -> None:
    with pytest.raises(FormatError) as caught:
        Signature.from_dict(value, what="bundle")
    assert str(caught.value) == message


def test_parse_signatures_and_sorted_output() -> None:
    sigs = [_sig(k) for k in reversed(_keys(3))]
    parsed = parse_signatures([s.to_dict() for s in sigs], what="bundle")
    assert parsed == tuple(sigs)
    listed = signatures_to_list(sigs)
    assert [item["keyid"] for item in listed] == sorted(s.keyid for s in sigs)
    with pytest.raises(FormatError) as caught:
        parse_signatures({"keyid": "x"}, what="bundle")
    assert str(caught.value) == "bundle: signatures must be a list"
    with pytest.raises(FormatError) as caught:
        parse_signatures([sigs[0].to_dict(), {}], what="bundle")
    assert str(caught.value) == (
        "bundle signature 1: signature must have exactly the fields ['keyid', 'sig']"
    )


@pytest.mark.parametrize(
    ("keyids", "threshold", "message"),
    [
        (("a" * 64,), 0, "role threshold 0 must be between 1 and its 1 keys"),
        (("a" * 64,), 2, "role threshold 2 must be between 1 and its 1 keys"),
        (("a" * 64,), True, "role threshold must be an integer"),
        (("a" * 64, "a" * 64), 1, "role keyids must be unique"),
        (("xyz",), 1, "role keyids must be 64 lowercase hex digits each"),
    ],
)
def test_role_validation(keyids: tuple[str, ...], threshold: int, message: str) -> None:
    with pytest.raises(FormatError) as caught:
        Role(keyids, threshold)
    assert str(caught.value) == message


def test_role_keyids_are_kept_sorted() -> None:
    assert Role(("b" * 64, "a" * 64), 1) == Role(("a" * 64, "b" * 64), 1)


# --- verify_threshold -------------------------------------------------------------------------


def test_threshold_met() -> None:
    keys = _keys(3)
    counted = _check([_sig(keys[0]), _sig(keys[2])], keys, 2)
    assert counted == frozenset({keys[0].keyid, keys[2].keyid})


def test_threshold_not_met() -> None:
    keys = _keys(3)
    with pytest.raises(SignatureError) as caught:
        _check([_sig(keys[1])], keys, 2)
    assert type(caught.value) is SignatureError
    assert str(caught.value) == "bundle: 1 of 2 required signatures from role 'bundle'"


def test_same_key_twice_counts_once() -> None:
    keys = _keys(3)
    with pytest.raises(SignatureError) as caught:
        _check([_sig(keys[0]), _sig(keys[0])], keys, 2)
    assert str(caught.value) == (
        "bundle: 1 of 2 required signatures from role 'bundle'; "
        f"keyid {_short(keys[0])} appears 2 times, counted once"
    )


def test_unknown_key_never_counts() -> None:
    keys = _keys(2)
    stranger = SigningKey.generate()
    with pytest.raises(SignatureError) as caught:
        _check([_sig(keys[0]), _sig(stranger)], keys, 2)
    assert str(caught.value) == (
        f"bundle: 1 of 2 required signatures from role 'bundle'; unknown keyid {_short(stranger)}"
    )


def test_key_outside_the_role_never_counts() -> None:
    inside, outside = _keys(2)
    with pytest.raises(SignatureError) as caught:
        verify_threshold(
            MESSAGE,
            [_sig(outside)],
            keys={k.keyid: k.public_key for k in (inside, outside)},
            role=_role([inside], 1),
            what="bundle",
            role_name="bundle",
        )
    assert str(caught.value) == (
        f"bundle: 0 of 1 required signatures from role 'bundle'; unknown keyid {_short(outside)}"
    )


def test_invalid_signature_never_counts() -> None:
    keys = _keys(2)
    forged = _sig(keys[1], b"something else")
    with pytest.raises(SignatureError) as caught:
        _check([_sig(keys[0]), forged], keys, 2)
    assert str(caught.value) == (
        "bundle: 1 of 2 required signatures from role 'bundle'; "
        f"invalid signature by keyid {_short(keys[1])}"
    )


def test_details_come_in_keyid_order() -> None:
    keys = _keys(3)
    strangers = _keys(1)
    sigs = [
        _sig(strangers[0]),
        _sig(keys[2], b"other"),
        _sig(keys[2], b"other"),
        _sig(keys[0]),
        _sig(keys[0]),
    ]
    by_keyid = {
        keys[0].keyid: [f"keyid {_short(keys[0])} appears 2 times, counted once"],
        keys[2].keyid: [
            f"keyid {_short(keys[2])} appears 2 times",
            f"invalid signature by keyid {_short(keys[2])}",
        ],
        strangers[0].keyid: [f"unknown keyid {_short(strangers[0])}"],
    }
    details = [text for keyid in sorted(by_keyid) for text in by_keyid[keyid]]
    with pytest.raises(SignatureError) as caught:
        _check(sigs, keys, 3)
    assert str(caught.value) == "; ".join(
        ["bundle: 1 of 3 required signatures from role 'bundle'", *details]
    )


def test_duplicate_valid_and_invalid_counts_once() -> None:
    keys = _keys(1)
    counted = _check([_sig(keys[0], b"other"), _sig(keys[0])], keys, 1)
    assert counted == frozenset({keys[0].keyid})


def test_unsigned() -> None:
    keys = _keys(1)
    with pytest.raises(UnsignedError) as caught:
        _check([], keys, 1)
    assert str(caught.value) == "bundle carries no signatures"


def test_keyid_that_lies_about_its_key_never_counts() -> None:
    honest, liar = _keys(2)
    with pytest.raises(SignatureError) as caught:
        verify_threshold(
            MESSAGE,
            [_sig(honest), Signature(liar.keyid, honest.sign(MESSAGE))],
            keys={honest.keyid: honest.public_key, liar.keyid: honest.public_key},
            role=_role([honest, liar], 2),
            what="bundle",
        )
    assert str(caught.value) == (
        f"bundle: 1 of 2 required signatures; unknown keyid {_short(liar)}"
    )
