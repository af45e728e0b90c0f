"""Canonical JSON and the time format: one spelling per value, everything else refused."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from signing.canonical import (
    MAX_DEPTH,
    MAX_INT,
    MIN_INT,
    decode_canonical,
    encode_canonical,
    format_time,
    parse_time,
)
from signing.errors import FormatError

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(MIN_INT, MAX_INT) | st.text(),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=30,
)


def test_encoding_is_sorted_compact_utf8() -> None:
    value = {"b": [1, True, None, "é\n"], "a": {}, "A": -3}
    assert encode_canonical(value) == b'{"A":-3,"a":{},"b":[1,true,null,"\xc3\xa9\\n"]}'


def test_tuples_encode_as_arrays() -> None:
    assert encode_canonical({"k": (1, 2)}) == b'{"k":[1,2]}'


def test_round_trip() -> None:
    data = b'{"a":[1,-2,"x",false,null],"b":{"c":"\xe2\x82\xac"}}'
    value = decode_canonical(data, what="manifest")
    assert value == {"a": [1, -2, "x", False, None], "b": {"c": "€"}}
    assert encode_canonical(value) == data


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"a": [1.5]}, "cannot encode as canonical JSON: float at $['a'][0] is not allowed"),
        (float("nan"), "cannot encode as canonical JSON: float at $ is not allowed"),
        ({1: 2}, "cannot encode as canonical JSON: object key 1 at $ is not a string"),
        (["x\ud800"], "cannot encode as canonical JSON: string at $[0] contains a lone surrogate"),
        (
            {"\udc00": 1},
            "cannot encode as canonical JSON: object key at $ contains a lone surrogate",
        ),
        (
            [1 << 63],
            "cannot encode as canonical JSON: integer at $[0] is outside the signed 64-bit range",
        ),
        ({1, 2}, "cannot encode as canonical JSON: set at $ is not a JSON type"),
        (b"x", "cannot encode as canonical JSON: bytes at $ is not a JSON type"),
    ],
)
def test_encode_refuses(value: object, message: str) -> None:
    with pytest.raises(FormatError) as caught:
        encode_canonical(value)
    assert str(caught.value) == message


def test_encode_refuses_deep_nesting_and_cycles() -> None:
    deep: list[object] = []
    for _ in range(MAX_DEPTH + 1):
        deep = [deep]
    with pytest.raises(FormatError, match=r"^cannot encode as canonical JSON: nested deeper"):
        encode_canonical(deep)
    cycle: list[object] = []
    cycle.append(cycle)
    with pytest.raises(FormatError, match=r"^cannot encode as canonical JSON: nested deeper"):
        encode_canonical(cycle)


def test_integer_bounds_are_inclusive() -> None:
    assert encode_canonical([MIN_INT, MAX_INT]) == f"[{MIN_INT},{MAX_INT}]".encode()
    assert decode_canonical(f"[{MIN_INT},{MAX_INT}]".encode(), what="x") == [MIN_INT, MAX_INT]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b'{"name":"a","name":"b"}', "manifest: duplicate key 'name'"),
        (b"[1.0]", "manifest: number 1.0 is a float; floats are not allowed"),
        (b"[1e5]", "manifest: number 1e5 is a float; floats are not allowed"),
        (b"[NaN]", "manifest: NaN is not allowed"),
        (b"[Infinity]", "manifest: Infinity is not allowed"),
        (b"[-Infinity]", "manifest: -Infinity is not allowed"),
        (b"[1, 2]", "manifest: not canonical JSON"),
        (b'{"a":1} ', "manifest: not canonical JSON"),
        (b'{"a":1}\n', "manifest: not canonical JSON"),
        (b'{"a":1}x', "manifest: not JSON: Extra data at character 7"),
        (b'{"b":1,"a":2}', "manifest: not canonical JSON"),
        (b'["\\u0041"]', "manifest: not canonical JSON"),
        (b"-0", "manifest: not canonical JSON"),
        (b"\xff[]", "manifest: not valid UTF-8 (byte 0)"),
        (b'["\xc3"]', "manifest: not valid UTF-8 (byte 2)"),
        (b'["\\ud800"]', "manifest: string at $[0] contains a lone surrogate"),
        (b"", "manifest: not JSON: Expecting value at character 0"),
        (b"[9223372036854775808]", "manifest: integer at $[0] is outside the signed 64-bit range"),
        (
            b"[" + b"9" * 5000 + b"]",
            "manifest: integer of 5000 digits is outside the signed 64-bit range",
        ),
        (
            b"[" * (MAX_DEPTH + 2) + b"]" * (MAX_DEPTH + 2),
            f"manifest: nested deeper than {MAX_DEPTH} levels",
        ),
        (b"[" * 100_000 + b"]" * 100_000, f"manifest: nested deeper than {MAX_DEPTH} levels"),
    ],
)
def test_decode_refuses(data: bytes, message: str) -> None:
    with pytest.raises(FormatError) as caught:
        decode_canonical(data, what="manifest")
    assert str(caught.value) == message


def test_decode_accepts_maximum_depth() -> None:
    data = b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1)
    assert encode_canonical(decode_canonical(data, what="x")) == data


def test_decode_refuses_bom_and_utf16() -> None:
    with pytest.raises(FormatError, match=r"^root: not JSON: Unexpected UTF-8 BOM"):
        decode_canonical(b"\xef\xbb\xbf[]", what="root")
    with pytest.raises(FormatError) as caught:
        decode_canonical("[1]".encode("utf-16-le"), what="root")
    assert str(caught.value).startswith("root: ")


@given(json_values)
def test_property_round_trip(value: object) -> None:
    encoded = encode_canonical(value)
    assert decode_canonical(encoded, what="value") == value
    assert encode_canonical(decode_canonical(encoded, what="value")) == encoded


@given(st.binary(max_size=200))
def test_property_arbitrary_bytes(data: bytes) -> None:
    try:
        value = decode_canonical(data, what="fuzz")
    except FormatError as exc:
        assert str(exc).startswith("fuzz: ")
        assert "\n" not in str(exc)
    else:
        assert encode_canonical(value) == data


@given(json_values.map(encode_canonical))
def test_property_canonical_text_bytes(data: bytes) -> None:
    # Mutated canonical documents: dropping one byte never yields a second spelling.
    for cut in range(len(data)):
        mutated = data[:cut] + data[cut + 1 :]
        try:
            value = decode_canonical(mutated, what="fuzz")
        except FormatError:
            continue
        assert encode_canonical(value) == mutated


def test_time_round_trip() -> None:
    when = parse_time("2030-01-02T03:04:05Z", what="expires")
    assert when == datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert when.tzinfo is UTC
    assert format_time(when) == "2030-01-02T03:04:05Z"


def test_format_time_converts_to_utc_and_drops_fractions() -> None:
    plus_two = timezone(timedelta(hours=2))
    assert format_time(datetime(2030, 1, 2, 3, 4, 5, 999_999, tzinfo=plus_two)) == (
        "2030-01-02T01:04:05Z"
    )
    assert format_time(datetime(5, 1, 2, 3, 4, 5, tzinfo=UTC)) == "0005-01-02T03:04:05Z"


def test_format_time_refuses_naive() -> None:
    with pytest.raises(FormatError) as caught:
        format_time(datetime(2030, 1, 2, 3, 4, 5))
    assert str(caught.value) == "time 2030-01-02T03:04:05 has no time zone"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (5, "expires: expected a time string, got int"),
        (None, "expires: expected a time string, got NoneType"),
        (
            "2030-01-02T03:04:05.1Z",
            "expires: time '2030-01-02T03:04:05.1Z' is not in the form YYYY-MM-DDTHH:MM:SSZ",
        ),
        (
            "2030-01-02 03:04:05Z",
            "expires: time '2030-01-02 03:04:05Z' is not in the form YYYY-MM-DDTHH:MM:SSZ",
        ),
        (
            "2030-01-02T03:04:05+00:00",
            "expires: time '2030-01-02T03:04:05+00:00' is not in the form YYYY-MM-DDTHH:MM:SSZ",
        ),
        (
            "2030-01-02T03:04:05z",
            "expires: time '2030-01-02T03:04:05z' is not in the form YYYY-MM-DDTHH:MM:SSZ",
        ),
        (
            "2030-01-02T03:04:05Z\n",
            "expires: time '2030-01-02T03:04:05Z\\n' is not in the form YYYY-MM-DDTHH:MM:SSZ",
        ),
        (
            "\uff12030-01-02T03:04:05Z",
            "expires: time '\uff12030-01-02T03:04:05Z' is not in the form YYYY-MM-DDTHH:MM:SSZ",
        ),
        (
            "2030-02-30T00:00:00Z",
            "expires: time '2030-02-30T00:00:00Z' is not a valid date and time",
        ),
        (
            "2030-01-02T24:00:00Z",
            "expires: time '2030-01-02T24:00:00Z' is not a valid date and time",
        ),
        (
            "0000-01-01T00:00:00Z",
            "expires: time '0000-01-01T00:00:00Z' is not a valid date and time",
        ),
    ],
)
def test_parse_time_refuses(value: object, message: str) -> None:
    with pytest.raises(FormatError) as caught:
        parse_time(value, what="expires")
    assert str(caught.value) == message
