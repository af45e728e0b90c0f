"""Writing a benchmark's section into docs/benchmarks.md: one definition for every script."""

from __future__ import annotations

from pathlib import Path


def write_section(
    path: Path, section: str, *, begin: str, end: str, notes: str, heading: str | None = None
) -> None:
    """Replace the section between ``begin`` and ``end`` in ``path``, keeping the hand-written
    notes after ``notes``; else (a section written before the markers) from ``heading`` to the
    next ``## ``; else append it."""
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        old, tail = rest.split(end, 1)
        if notes in old:
            section = section.replace(notes + "\n" + end, notes + old.split(notes, 1)[1] + end)
        text = head + section.rstrip("\n") + tail
    elif heading is not None and heading in text:
        head, rest = text.split(heading, 1)
        following = rest.find("\n## ")
        tail = rest[following:] if following >= 0 else "\n"
        text = head + section + "\n" + tail
    else:
        text = (text.rstrip("\n") + "\n\n" if text.strip() else "") + section + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
