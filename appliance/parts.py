"""Verify and install straight from a split bundle's parts (docs/bundle-format.md, section 10,
steps P1 to P4; docs/adr/0015-split-bundles.md).

Where the parts are and whether they are good is this module's concern; what the bundle is
and whether to trust it stays with the strict reader and the verifier, which read the parts
through :class:`PartStream` exactly as they read one bundle file.

- P1 (:func:`find_split`): the part index, and every part it lists, found among the
  directories and files the operator named (several mounts are fine).
- P2 and P3 (:meth:`SplitBundle.check`): every part's size (``stat``), then every part's
  sha256, hashed in parallel on every core, before the install writes anything. A bad part
  is named in one line; with parity, up to as many bad parts as there are parity parts are
  rebuilt instead, and the operator is told (a warning line and the audit record).
- P4 (:meth:`SplitBundle.check_binding`): once the head read from the parts is verified, the
  index must name that manifest: an index that belongs to another bundle is refused before
  the payload is read.

:class:`PartStream` then hands the bundle's bytes to the reader part after part, never
joining them on disk; for a good part it offers its file descriptor, so that the kernel copy
of step I5 (ADR 0008) works within each part; a part rebuilt from parity is decoded stripe by
stripe, in memory bounded by ``HostLimits.parity_memory_bytes``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

from appliance.limits import HOST_LIMITS
from appliance.staging import leave_signals_to_the_main_thread
from signing.bounded import listing
from signing.errors import FormatError, InputError, PartError
from signing.parity import StripeCoder, stripe_span
from signing.partindex import INDEX_SUFFIX, MAX_INDEX_BYTES, PartEntry, PartIndex

if TYPE_CHECKING:
    from appliance.console import Progress

LOG: Final = logging.getLogger(__name__)
_HASH_CHUNK: Final = 1 << 20
_RECOPY: Final = "re-copy it from the source medium"
_PART_NAME_RE: Final = re.compile(r"\.p?[0-9]{3,}$")


@dataclass(frozen=True)
class Part:
    """A part the index lists, and the file found for it (None: missing)."""

    entry: PartEntry
    count: int
    path: Path | None
    parity: bool = False

    @property
    def label(self) -> str:
        kind = "parity part" if self.parity else "part"
        return f"{kind} {self.entry.number} of {self.count} ({self.entry.file})"

    def block(self, k: int) -> int:
        """This part's block number in a parity stripe of ``k`` data parts (data first)."""
        return self.entry.number - 1 + (k if self.parity else 0)


def is_split(sources: Sequence[str]) -> bool:
    """A directory, a part index, several files, or one part file with an index beside it:
    parts. One other file, or ``-``: a bundle."""
    if len(sources) != 1:
        return True
    source = sources[0]
    if source == "-":
        return False
    path = Path(source)
    if source.endswith(INDEX_SUFFIX) or path.is_dir():
        return True
    # Only part 1 of a split given: the others are then named as missing, not read as a
    # bundle that ends early.
    return bool(_PART_NAME_RE.search(path.name)) and bool(_indexes_in(path.parent))


def find_split(sources: Sequence[str]) -> SplitBundle:
    """P1: the part index and the file of every part, from directories and files."""
    if "-" in sources:
        raise InputError("'-' reads one unsplit bundle from standard input; give parts as files")
    named: list[Path] = []  # indexes given by name win over those found in directories
    dirs: list[Path] = []
    files: list[Path] = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            dirs.append(path)
        elif source.endswith(INDEX_SUFFIX):
            named.append(path)
        elif path.is_file():
            files.append(path)
        else:
            raise InputError(f"cannot open {source}: no such file or directory")
    indexes = named or [i for d in dirs for i in _indexes_in(d)]
    if not indexes and files:
        indexes = _indexes_in(files[0].parent)
    if not indexes:
        where = ", ".join(sorted({str(d) for d in dirs} | {str(f.parent) for f in files}))
        raise InputError(
            f"no part index (*{INDEX_SUFFIX}) in {where}: 'appliance-builder split' writes it "
            "beside the parts; copy it with them"
        )
    index_path, index = _read_index(indexes)
    wanted = {p.file for p in index.all_parts()}
    found: dict[str, Path] = {}
    for path in files:
        if path.name not in wanted:
            raise PartError(
                f"{path} is not a part of {index.bundle_file}: its part index "
                f"{index_path.name} does not list it"
            )
        _add(found, path)
    for directory in dirs:
        for name in sorted(wanted):
            if (directory / name).is_file():
                _add(found, directory / name)
    k, m = len(index.parts), index.parity_count
    parts = [Part(e, k, found.get(e.file)) for e in index.parts]
    if index.parity is not None:
        parts += [Part(e, m, found.get(e.file), parity=True) for e in index.parity.parts]
    return SplitBundle(index, index_path, parts)


class SplitBundle:
    """A part index and the parts found for it."""

    def __init__(self, index: PartIndex, index_path: Path, parts: list[Part]) -> None:
        self.index = index
        self.index_path = index_path
        self.parts = parts
        self._bad: list[Part] = []

    def audit_fields(self) -> dict[str, object]:
        return {
            "parts": len(self.index.parts),
            "parity_parts": self.index.parity_count or None,
            "part_index": str(self.index_path),
        }

    def sizes_match(self) -> bool:
        """P2's quick half: every part is there with the size the index gives it."""
        for part in self.parts:
            try:
                if part.path is None or part.path.stat().st_size != part.entry.size:
                    return False
            except OSError:
                return False
        return True

    def check(self, *, progress: Progress | None = None, parity_only: bool = False) -> list[Part]:
        """P2 and P3: every part's size, then its sha256 (in parallel); return the data parts
        to rebuild from parity, or raise :class:`PartError` naming the first bad part.
        ``parity_only``: the parity parts only (the data parts were proven by a verify pass)."""
        problems: dict[int, str] = {}
        to_hash: list[int] = []
        for position, part in enumerate(self.parts):
            if parity_only and not part.parity:
                continue
            if part.path is None:
                problems[position] = f"{part.label} is missing"
                continue
            try:
                size = part.path.stat().st_size
            except OSError as exc:
                problems[position] = f"{part.label} cannot be read ({exc.strerror})"
                continue
            if size != part.entry.size:
                problems[position] = (
                    f"{part.label} is corrupt: {size} bytes, expected {part.entry.size}"
                )
            else:
                to_hash.append(position)
        if progress is not None and to_hash:
            total = sum(self.parts[i].entry.size for i in to_hash)
            noun = "part" if len(to_hash) == 1 else "parts"
            progress.start(total, f"checking {len(to_hash)} {noun}")
        advance = progress.advance if progress is not None else None
        by_sha = {p.entry.sha256: p for p in self.parts}
        workers = max(1, min(len(to_hash), os.cpu_count() or 1, HOST_LIMITS.part_hash_threads))
        stop = threading.Event()  # Ctrl-C or SIGTERM: the hashing threads stop at once
        with ThreadPoolExecutor(
            max_workers=workers,
            thread_name_prefix="part-hash",
            initializer=leave_signals_to_the_main_thread,
        ) as pool:
            try:
                futures = [
                    pool.submit(_hash_file, self.parts[i].path, advance, stop) for i in to_hash
                ]
                for position, future in zip(to_hash, futures, strict=True):
                    part = self.parts[position]
                    digest = future.result()
                    if isinstance(digest, OSError):
                        problems[position] = f"{part.label} cannot be read ({digest.strerror})"
                    elif digest != part.entry.sha256:
                        problems[position] = _mismatch(part, digest, by_sha.get(digest))
            except BaseException:
                stop.set()
                raise
        return self._judge(problems)

    def _judge(self, problems: dict[int, str]) -> list[Part]:
        if not problems:
            return []
        bad = sorted(problems)
        everything = len(self.parts)
        if everything > 1 and len(bad) == everything and all(p.path for p in self.parts):
            raise PartError(
                f"part index {self.index_path.name} matches none of the {everything} parts "
                "beside it: they belong to another split, or it does; use the index that came "
                "with these parts"
            )
        spare = self.index.parity_count
        if len(bad) > spare:
            line = f"{problems[bad[0]]}; {_RECOPY}"
            if len(bad) > 1:
                names = listing((self.parts[i].entry.file for i in bad), sep=", ")
                line += f" ({len(bad)} bad parts: {names})"
            if spare:
                line += f"; the {spare} parity part(s) can rebuild at most {spare}"
            raise PartError(line)
        self._bad = [self.parts[i] for i in bad]
        for position in bad:
            part = self.parts[position]
            what = "rebuilding it from parity" if not part.parity else "parity still suffices"
            LOG.warning("%s; %s", problems[position], what)
        return [self.parts[i] for i in bad if not self.parts[i].parity]

    def check_binding(self, manifest_sha256: str, *, name: str, version: str) -> None:
        """P4: the verified head read from the parts is the one the index names."""
        index = self.index
        if index.manifest_sha256 != manifest_sha256:
            raise PartError(
                f"part index {self.index_path.name} is for {index.name} {index.version} "
                f"(manifest sha256 {index.manifest_sha256[:16]}...), but its parts hold "
                f"{name} {version} (manifest sha256 {manifest_sha256[:16]}...): use the "
                "index that came with these parts"
            )

    def open(self, rebuilt: list[Part]) -> PartStream:
        rebuilder = _Rebuilder(self.index, self.parts, self._bad, rebuilt) if rebuilt else None
        data = [p for p in self.parts if not p.parity]
        return PartStream(data, {p.entry.number for p in rebuilt}, rebuilder)


class PartStream:
    """The bundle's bytes, read across its parts in order; never joined on disk.

    A readable stream for the strict reader (``readinto``), and a kernel-copy source for step
    I5 (``copy_range`` and ``copied``, appliance.staging): the file descriptor of the part
    being read, and how much of it is left, so that no copy crosses a part's end. A part being
    rebuilt has no descriptor: it is read through ``readinto``, decoded from parity.
    """

    def __init__(self, parts: list[Part], rebuilt: set[int], rebuilder: _Rebuilder | None) -> None:
        self._parts = parts
        self._rebuilt = rebuilt
        self._rebuilder = rebuilder
        self._next = 0
        self._part: Part | None = None
        self._fd = -1
        self._pos = 0
        self._left = 0

    def __enter__(self) -> PartStream:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._close_part()
        if self._rebuilder is not None:
            self._rebuilder.close()

    @property
    def all_on_disk(self) -> bool:
        """Every part is read from its file (none is rebuilt from parity)."""
        return not self._rebuilt

    def readinto(self, buffer: memoryview, /) -> int:
        part = self._current()
        if part is None:
            return 0
        view = buffer[: min(len(buffer), self._left)]
        if self._fd < 0:
            assert self._rebuilder is not None  # noqa: S101 - only rebuilt parts have no fd
            got = self._rebuilder.read(part, self._pos, view)
        else:
            got = os.readv(self._fd, [view])
            if got == 0:
                raise PartError(
                    f"{part.label} ended {self._left} bytes early: it changed after it was "
                    f"checked; {_RECOPY}"
                )
        self.copied(got)
        return got

    def copy_range(self, count: int) -> tuple[int, int] | None:
        """The descriptor to copy the next bytes from, and at most how many; None where the
        bytes must be read (a rebuilt part, or the end of the bundle)."""
        if self._current() is None or self._fd < 0:
            return None
        return self._fd, min(count, self._left)

    def copied(self, count: int) -> None:
        """``count`` bytes of the current part were taken (read, or copied by the kernel
        from its descriptor's position)."""
        self._pos += count
        self._left -= count

    def _current(self) -> Part | None:
        while self._left == 0:
            self._close_part()
            if self._next == len(self._parts):
                return None
            part = self._parts[self._next]
            self._next += 1
            if part.entry.number not in self._rebuilt:
                if part.path is None:  # pragma: no cover - check() found it missing
                    raise PartError(f"{part.label} is missing; {_RECOPY}")
                try:
                    self._fd = os.open(part.path, os.O_RDONLY | os.O_CLOEXEC)
                except OSError as exc:
                    raise PartError(
                        f"{part.label} cannot be read ({exc.strerror}); {_RECOPY}"
                    ) from None
            self._part, self._pos, self._left = part, 0, part.entry.size
        return self._part

    def _close_part(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class _Rebuilder:
    """Decodes bad data parts stripe by stripe from k good parts (data first, then parity)."""

    def __init__(
        self, index: PartIndex, parts: list[Part], bad: list[Part], rebuilt: list[Part]
    ) -> None:
        assert index.parity is not None  # noqa: S101 - check() allows rebuilding only then
        k = len(index.parts)
        self._stripe = index.parity.stripe_bytes
        if 2 * k * self._stripe > HOST_LIMITS.parity_memory_bytes:
            raise PartError(
                f"cannot rebuild {rebuilt[0].label}: {k} parts of {self._stripe}-byte parity "
                f"stripes need more than {HOST_LIMITS.parity_memory_bytes} bytes of memory; "
                f"{_RECOPY}"
            )
        self._first = index.parts[0].size
        unusable = {id(p) for p in bad}
        good = [p for p in parts if id(p) not in unusable and p.path is not None][:k]
        self._k = k
        self._coder = StripeCoder(k, index.parity_count)
        self._numbers = [p.block(k) for p in good]
        self._sizes = [p.entry.size for p in good]
        self._fds: list[int] = []
        for p in good:
            assert p.path is not None  # noqa: S101 - filtered above
            self._fds.append(os.open(p.path, os.O_RDONLY | os.O_CLOEXEC))
        self._stripe_no = -1
        self._blocks: list[bytes] = []

    def read(self, part: Part, pos: int, view: memoryview) -> int:
        t = pos // self._stripe
        start, length = stripe_span(t, self._first, self._stripe)
        if t != self._stripe_no:
            blocks = []
            for fd, size in zip(self._fds, self._sizes, strict=True):
                data = os.pread(fd, max(0, min(length, size - start)), start)
                blocks.append(data + bytes(length - len(data)))
            self._blocks = self._coder.decode(blocks, self._numbers)
            self._stripe_no = t
        within = pos - start
        n = min(len(view), length - within)
        view[:n] = self._blocks[part.block(self._k)][within : within + n]
        return n

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []


def _mismatch(part: Part, digest: str, other: Part | None) -> str:
    if other is not None and other is not part:
        return f"{part.label} holds the bytes of {other.label}: parts swapped or misnamed"
    return f"{part.label} is corrupt: sha256 {digest[:16]}... expected {part.entry.sha256[:16]}..."


def _hash_file(
    path: Path | None, advance: Callable[[int], None] | None, stop: threading.Event
) -> str | OSError:
    assert path is not None  # noqa: S101 - only found parts are hashed
    digest = hashlib.sha256()
    buffer = bytearray(_HASH_CHUNK)
    view = memoryview(buffer)
    try:
        with path.open("rb", buffering=0) as fh:
            while not stop.is_set() and (n := fh.readinto(view)):
                digest.update(view[:n])
                if advance is not None:
                    advance(n)
    except OSError as exc:
        return exc
    return digest.hexdigest()


def _indexes_in(directory: Path) -> list[Path]:
    return sorted(
        p for p in directory.glob(f"*{INDEX_SUFFIX}") if not p.name.startswith(".") and p.is_file()
    )


def _read_index(paths: list[Path]) -> tuple[Path, PartIndex]:
    """The one index among ``paths``: copies on several media must agree byte for byte."""
    first: tuple[Path, bytes] | None = None
    for path in paths:
        try:
            with path.open("rb") as fh:
                data = fh.read(MAX_INDEX_BYTES + 1)
        except OSError as exc:
            raise InputError(f"cannot read part index {path}: {exc.strerror}") from None
        if first is None:
            first = (path, data)
        elif data != first[1]:
            raise PartError(
                f"part indexes {first[0]} and {path} differ: they come from different splits; "
                "keep the files of one split together"
            )
    assert first is not None  # noqa: S101 - the caller found at least one
    path, data = first
    try:
        return path, PartIndex.from_bytes(data)
    except FormatError as exc:
        raise PartError(f"{path}: {exc.diagnostics()}") from None


def _add(found: dict[str, Path], path: Path) -> None:
    seen = found.get(path.name)
    if seen is not None and seen.resolve() != path.resolve():
        raise InputError(f"part {path.name} is given twice: {seen} and {path}; keep one")
    found[path.name] = path
