"""Canonical JSON: the only byte form in which signed data is written, read and signed.

A signature covers bytes, not values. If two encoders could write the same value in two ways,
a verifier would have to re-encode before checking and a signer could be tricked into signing
bytes that parse differently elsewhere. So there is exactly one encoding (sorted keys, no
whitespace, UTF-8, no floats) and the decoder accepts a document only if re-encoding what it
parsed gives back the very same bytes. Anything that round-trips ambiguously (duplicate keys,
floats, NaN, escapes that could be written otherwise, lone surrogates, absurd nesting or
integers) is refused with :class:`~signing.errors.FormatError` instead of being guessed at.

The one time format lives here too, for the same reason: times are signed as strings.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Any, NoReturn, TypeGuard

from signing.bounded import MAX_QUOTED, clip, quote
from signing.errors import FormatError

JSONValue = None | bool | int | str | list["JSONValue"] | dict[str, "JSONValue"]
"""A value that canonical JSON can carry (tuples are also accepted when encoding)."""

MAX_DEPTH = 64
"""Deepest nesting of arrays and objects accepted; signed metadata is a handful of levels."""

MAX_INT = (1 << 63) - 1
MIN_INT = -(1 << 63)
"""Integers must fit a signed 64-bit integer, so every consumer reads them the same way."""

_MAX_INT_DIGITS = 20  # len(str(MIN_INT)); longer digit strings are refused before int()


def is_int(value: object) -> TypeGuard[int]:
    """Whether a decoded value is a JSON integer: Python's ``bool`` is an ``int`` too, and a
    ``true`` where a number belongs must never pass for 1."""
    return isinstance(value, int) and not isinstance(value, bool)


_TIME_RE = re.compile(r"\A([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})Z\Z")
_KEY_IN_PATH = 64  # characters of one object key in a "$['a'][0]" location


def exact_fields(raw: object, what: str, keys: set[str] | frozenset[str]) -> dict[str, Any]:
    """``raw`` if it is a JSON object with exactly ``keys``; else a FormatError naming
    ``what`` (e.g. ``"patch: base"``) and the missing and unknown fields."""
    if not isinstance(raw, dict):
        raise FormatError(f"{what} must be an object, not {type(raw).__name__}")
    if set(raw) != keys:
        missing = sorted(keys - set(raw))
        unknown = sorted(set(raw) - keys)
        raise FormatError(
            f"{what} fields wrong (missing {quote(missing)}, unknown {quote(unknown)})"
        )
    return raw


def _at(where: str) -> str:
    """A location for a message: 64 levels of quoted keys would still be too long a line."""
    return clip(where, MAX_QUOTED)


def _check(value: object, depth: int, where: str) -> None:
    """Raise ValueError/TypeError naming ``where`` if ``value`` cannot be encoded canonically."""
    if depth > MAX_DEPTH:
        raise ValueError(f"nested deeper than {MAX_DEPTH} levels")
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, int):
        if not MIN_INT <= value <= MAX_INT:
            raise ValueError(f"integer at {_at(where)} is outside the signed 64-bit range")
        return
    if isinstance(value, str):
        _check_text(value, f"string at {_at(where)}")
        return
    if isinstance(value, float):
        raise TypeError(f"float at {_at(where)} is not allowed")
    if isinstance(value, list | tuple):
        for index, item in enumerate(value):
            _check(item, depth + 1, f"{where}[{index}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"object key {quote(key)} at {_at(where)} is not a string")
            _check_text(key, f"object key at {_at(where)}")
            # repr() directly for the usual short key: this runs for every key of a document.
            segment = repr(key) if len(key) <= _KEY_IN_PATH else quote(key, limit=_KEY_IN_PATH)
            _check(item, depth + 1, f"{where}[{segment}]")
        return
    raise TypeError(f"{type(value).__name__} at {_at(where)} is not a JSON type")


def _check_text(text: str, label: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{label} contains a lone surrogate") from None


def _encode(value: object) -> bytes:
    """Encode after :func:`_check`; raises ValueError/TypeError on anything not encodable."""
    _check(value, 0, "$")
    text = json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )
    return text.encode("utf-8")


def encode_canonical(value: object) -> bytes:
    """Return the canonical JSON bytes of ``value``.

    Accepts None, bool, int (64-bit), str, list/tuple and dict with str keys, nested at most
    :data:`MAX_DEPTH` levels. Raises FormatError on anything else, floats included.
    """
    try:
        return _encode(value)
    except (ValueError, TypeError) as exc:
        raise FormatError(f"cannot encode as canonical JSON: {exc}") from None


def _refuse(what: str, detail: str) -> NoReturn:
    raise FormatError(f"{what}: {detail}")


def decode_canonical(data: bytes, *, what: str) -> Any:
    """Parse canonical JSON ``data``; FormatError (prefixed with ``what``) on anything else.

    The result re-encodes to exactly ``data``: no other spelling of a value is accepted.
    """

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for key, item in items:
            if key in result:
                _refuse(what, f"duplicate key {quote(key)}")
            result[key] = item
        return result

    def no_float(text: str) -> NoReturn:
        _refuse(what, f"number {text[:40]} is a float; floats are not allowed")

    def no_constant(text: str) -> NoReturn:
        _refuse(what, f"{text} is not allowed")

    def whole(text: str) -> int:
        if len(text) > _MAX_INT_DIGITS:
            _refuse(what, f"integer of {len(text)} digits is outside the signed 64-bit range")
        return int(text)

    if not isinstance(data, bytes | bytearray | memoryview):
        _refuse(what, f"expected bytes, got {type(data).__name__}")
    raw = bytes(data)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        _refuse(what, f"not valid UTF-8 (byte {exc.start})")
    try:
        value = json.loads(
            text,
            object_pairs_hook=pairs,
            parse_float=no_float,
            parse_constant=no_constant,
            parse_int=whole,
        )
    except RecursionError:
        _refuse(what, f"nested deeper than {MAX_DEPTH} levels")
    except json.JSONDecodeError as exc:
        _refuse(what, f"not JSON: {exc.msg} at character {exc.pos}")
    except ValueError as exc:
        _refuse(what, f"not JSON: {' '.join(str(exc).split())}")
    try:
        again = _encode(value)
    except (ValueError, TypeError) as exc:
        _refuse(what, str(exc))
    except RecursionError:
        _refuse(what, f"nested deeper than {MAX_DEPTH} levels")
    if again != raw:
        _refuse(what, "not canonical JSON")
    return value


def parse_time(value: object, *, what: str) -> datetime:
    """Parse ``YYYY-MM-DDTHH:MM:SSZ`` into an aware UTC datetime; FormatError otherwise."""
    if not isinstance(value, str):
        _refuse(what, f"expected a time string, got {type(value).__name__}")
    match = _TIME_RE.match(value)
    if match is None:
        _refuse(what, f"time {value[:40]!r} is not in the form YYYY-MM-DDTHH:MM:SSZ")
    year, month, day, hour, minute, second = (int(part) for part in match.groups())
    try:
        return datetime(year, month, day, hour, minute, second, tzinfo=UTC)
    except ValueError:
        _refuse(what, f"time {value!r} is not a valid date and time")


def normalize_time(dt: datetime) -> datetime:
    """Return ``dt`` in UTC, truncated to whole seconds: the precision that gets signed.

    Raises FormatError for a naive datetime, whose zone cannot be known.
    """
    if not isinstance(dt, datetime):
        raise FormatError(f"expected a datetime, got {type(dt).__name__}")
    offset = dt.utcoffset()
    if offset is None:
        raise FormatError(f"time {dt.isoformat()} has no time zone")
    return dt.astimezone(UTC).replace(microsecond=0)


def format_time(dt: datetime) -> str:
    """Write an aware datetime as ``YYYY-MM-DDTHH:MM:SSZ`` (UTC, fractions dropped)."""
    t = normalize_time(dt)
    return f"{t.year:04d}-{t.month:02d}-{t.day:02d}T{t.hour:02d}:{t.minute:02d}:{t.second:02d}Z"
