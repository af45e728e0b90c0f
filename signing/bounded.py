"""Bounded pieces of error messages: one quoted value, one list of items, one whole line.

An error message becomes one line on the operator's terminal and one audit record
(:meth:`signing.errors.AirgapError.diagnostics`). A message that quotes its input verbatim grows
with that input: a signature block of 4,800 signatures by unknown keys once made a 134 KB
refusal, one audit record too big for the log. So every message that quotes input is bounded
where it is built, with the helpers here, and ``diagnostics()`` cuts whatever still slips
through (:func:`clip`), as the last line of defence.

Small inputs are written exactly as ``repr()`` and ``"; ".join()`` write them, so the messages
operators and tests know stay the same; only what is too long is cut, and the cut says how much
there was.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

MAX_QUOTED: Final = 256
"""Characters of one quoted value; a whole manifest path (240 bytes) under ``payload/`` fits."""

MAX_ITEMS: Final = 10
"""Items of a list a message shows before ``… N more``."""

MAX_LINE: Final = 1000
"""Characters of one diagnostics line (the audit log keeps one such line per refusal)."""

MAX_REASON: Final = 300
"""Characters of one reason quoted from a child process's output or a library's exception."""

ELLIPSIS: Final = "…"


class _FullError(Exception):
    """The output reached its budget: stop walking the value."""


class _Out:
    def __init__(self, limit: int) -> None:
        self.parts: list[str] = []
        self.size = 0
        self.limit = limit

    def add(self, text: str) -> None:
        self.parts.append(text)
        self.size += len(text)
        if self.size > self.limit:
            raise _FullError


def _write(value: object, out: _Out) -> None:
    """Append ``repr(value)`` to ``out``, piece by piece, so a huge value costs only ``limit``.

    Containers are walked here rather than handed to ``repr()``, which would build the whole
    text (megabytes for a hostile list) before it could be cut.
    """
    if isinstance(value, str | bytes):
        # A longer value cannot fit: its slice's repr alone overflows (quotes included).
        out.add(repr(value[: out.limit]))
    elif isinstance(value, list | tuple):
        opening, closing = ("[", "]") if isinstance(value, list) else ("(", ")")
        out.add(opening)
        for index, item in enumerate(value):
            if index:
                out.add(", ")
            _write(item, out)
        out.add("," + closing if isinstance(value, tuple) and len(value) == 1 else closing)
    elif isinstance(value, dict):
        out.add("{")
        for index, (key, item) in enumerate(value.items()):
            if index:
                out.add(", ")
            _write(key, out)
            out.add(": ")
            _write(item, out)
        out.add("}")
    else:
        out.add(repr(value)[: out.limit + 1])


def quote(value: object, *, limit: int = MAX_QUOTED) -> str:
    """``repr(value)`` when that is at most ``limit`` characters; else its start, ``…`` and
    the value's length (``'aaa…' (5000 characters)``)."""
    if isinstance(value, str) and len(value) < limit:  # the common case, as cheap as repr()
        text = repr(value)
        if len(text) <= limit:
            return text
    out = _Out(limit)
    try:
        _write(value, out)
    except _FullError:
        text = "".join(out.parts)[:limit] + ELLIPSIS
        if isinstance(value, str | bytes):
            return f"{text} ({len(value)} characters)"
        if isinstance(value, list | tuple | dict):
            return f"{text} ({len(value)} items)"
        return text
    return "".join(out.parts)


def listing(items: Iterable[str], *, sep: str = "; ", limit: int = MAX_ITEMS) -> str:
    """``sep.join(items)`` of at most ``limit`` items, then ``… N more`` for the rest.

    The items shown come first in the caller's order, which should be stable (sorted), so two
    refusals of the same input read the same. Each item is clipped to :data:`MAX_QUOTED` too.
    """
    shown: list[str] = []
    rest = 0
    for item in items:
        if len(shown) < limit:
            shown.append(clip(item, MAX_QUOTED))
        else:
            rest += 1
    if rest:
        shown.append(f"{ELLIPSIS} {rest} more")
    return sep.join(shown)


def clip(text: str, limit: int = MAX_LINE) -> str:
    """``text`` if it has at most ``limit`` characters; else its start and a marker of how
    many characters were cut, the whole at most ``limit`` characters long."""
    if len(text) <= limit:
        return text
    # Reserve room for the marker with the most digits the count can have.
    room = len(f" {ELLIPSIS} ({len(text)} more characters cut)")
    keep = max(limit - room, 0)
    return f"{text[:keep]} {ELLIPSIS} ({len(text) - keep} more characters cut)"


def one_line(reason: object, *, limit: int = MAX_REASON) -> str:
    """``str(reason)`` on one line (every run of white space one space), cut to ``limit``
    characters with ``...``: what a child process printed or a library raised, quoted inside
    one of our messages."""
    line = " ".join(str(reason).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."
