"""Delta bundles on the host: the base slot, and the entries a delta takes from it (step I5b).

A delta bundle's manifest describes the complete new slot, but its payload carries only what
its base lacks (docs/bundle-format.md, section 2.5; docs/adr/0023-delta-bundles.md). At I3
:func:`find_base` names the installed slot whose manifest is the delta's base, or refuses with
one line naming the base the delta needs and what the host has. After the carried members are
staged (I5), :func:`fill_from_base` puts every other entry into the staging slot:

- a reused entry is taken from the base slot file with the same sha256: a reflink (a
  copy-on-write clone) where the file system offers one, else a hard link, else a kernel copy;
- a patched entry is rebuilt from a base file and the carried patch (appliance.patching).

Either way the result is then hashed against the new manifest's digests on every core
(appliance.hashpool), exactly as a carried member is: a base slot damaged since it was
installed is refused, naming the entry and the slot, and the staging slot is removed.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path
from typing import Any, Final

from appliance.hashpool import PoolHasher
from appliance.slots import SlotInfo, SlotPaths, SlotStore
from signing.bounded import quote
from signing.bundle import PAYLOAD_PREFIX, Segment
from signing.chunks import hash_jobs
from signing.errors import FormatError, IntegrityError, PayloadError, PolicyError, StateError
from signing.manifest import BundleManifest, DeltaSpec, Entry

# linux/fs.h: _IOW(0x94, 9, int): clone a whole file (btrfs, XFS with reflink, bcachefs).
_FICLONE: Final = 0x40049409
REFLINK: Final = "reflink"
HARDLINK: Final = "hardlink"
COPY: Final = "copy"


def find_base(slots: SlotStore, manifest: BundleManifest) -> SlotInfo | None:
    """The installed slot a delta builds on; None for a complete bundle."""
    delta = manifest.delta
    if delta is None:
        return None
    states = [(slot, _state(slot)) for slot in slots.list()]
    for slot, state in states:
        if state == delta.base_state_sha256:
            return slot
    have = ", ".join(f"{s.name} {s.version} (state {d[:16]}...)" for s, d in states) or "no slot"
    weights = ""
    if manifest.model_adapters:  # an adapter-only update: say which weights it fits
        model = next(e for e in manifest.entries if e.path == manifest.model_path)
        weights = (
            f"; its adapters need the base weights {manifest.model_path} "
            f"(sha256 {model.sha256[:16]}...)"
        )
    raise PolicyError(
        f"delta bundle {manifest.name} {manifest.version} needs its base "
        f"{delta.base_name} {delta.base_version} (state {delta.base_state_sha256[:16]}...) "
        f"installed; this host has {have}{weights}; install the complete bundle instead"
    )


def _state(slot: SlotInfo) -> str:
    """A slot's state digest (BundleManifest.state_sha256), from its stored manifest, which
    SlotStore.list checked against slot.json."""
    try:
        return BundleManifest.from_bytes(SlotPaths(slot.path).manifest.read_bytes()).state_sha256()
    except (OSError, FormatError):
        return "unreadable manifest"


def fill_from_base(
    base: SlotInfo, manifest: BundleManifest, payload_dir: Path, *, threads: int = 0
) -> dict[str, Any]:
    """Put every entry the delta does not carry into ``payload_dir`` and check it; return the
    audit summary: how many entries and bytes were reused, patched and carried, and how."""
    delta = manifest.delta
    if delta is None:  # pragma: no cover - called for deltas only
        raise ValueError("not a delta bundle")
    base_paths = SlotPaths(base.path)
    base_manifest = BundleManifest.from_bytes(base_paths.manifest.read_bytes())
    by_digest = {e.sha256: e for e in base_manifest.entries}
    entries = {e.path: e for e in manifest.entries}
    ways: dict[str, int] = {}
    placed: list[Entry] = []
    try:
        for path in delta.reuse:
            entry = entries[path]
            source = by_digest.get(entry.sha256)
            if source is None:
                raise IntegrityError(
                    f"delta: its base slot {base.id} holds no file with sha256 "
                    f"{entry.sha256[:16]}... for {quote(path)}"
                )
            target = payload_dir / path
            target.parent.mkdir(parents=True, exist_ok=True)
            way = _clone(base_paths.payload / source.path, target)
            ways[way] = ways.get(way, 0) + 1
            placed.append(entry)
        if delta.patches:
            from appliance.patching import apply_patch  # noqa: PLC0415 - deltas with patches

            for patch in delta.patches:
                entry = entries[patch.path]
                target = payload_dir / patch.path
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    apply_patch(
                        patch=payload_dir / patch.patch,
                        literal=payload_dir / patch.literal,
                        base_files={d: base_paths.payload / e.path for d, e in by_digest.items()},
                        output=target,
                    )
                except IntegrityError as exc:  # the base file is not what the patch needs
                    raise IntegrityError(
                        f"delta: {quote(patch.path)} cannot be rebuilt from base slot {base.id}: "
                        f"{_tail(exc.diagnostics())}; the base slot is damaged: install the "
                        "complete bundle"
                    ) from None
                placed.append(entry)
        _check(placed, payload_dir, threads=threads)
    except PayloadError as exc:
        raise IntegrityError(
            f"delta: a file taken from base slot {base.id} does not match the signed manifest: "
            f"{exc.diagnostics()}; the base slot is damaged: install the complete bundle"
        ) from None
    except OSError as exc:
        raise StateError(
            f"delta: cannot take files from base slot {base.id}: {exc.strerror}"
        ) from None
    return _summary(manifest, delta, base, ways)


def _tail(message: str) -> str:
    """A refusal without the host path it starts with (``base /var/lib/... does not match``)."""
    _, _, rest = message.partition(" does not match: ")
    return f"the base file does not match: {rest}" if rest else message


def _check(placed: list[Entry], payload_dir: Path, *, threads: int) -> None:
    """Hash every placed entry against the new manifest, on every core."""
    with PoolHasher(threads) as hasher:
        for entry in placed:
            for job in hash_jobs(entry, member=PAYLOAD_PREFIX + entry.path):
                fd = os.open(payload_dir / entry.path, os.O_RDONLY | os.O_CLOEXEC)
                hasher.submit(job, [Segment(fd=fd, offset=job.offset, length=job.length)])
        hasher.drain()


def _clone(source: Path, target: Path) -> str:
    """``target`` becomes a file with ``source``'s bytes: a reflink, a hard link or a copy."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    src = os.open(source, flags)
    try:
        dst = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            try:
                fcntl.ioctl(dst, _FICLONE, src)
                os.fsync(dst)
                return REFLINK
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY):
                    raise
        finally:
            os.close(dst)
        target.unlink()
        try:
            os.link(source, target, follow_symlinks=False)
            return HARDLINK
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EOPNOTSUPP):
                raise
        _copy(src, target)
        return COPY
    finally:
        os.close(src)


def _copy(src: int, target: Path) -> None:
    dst = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        size = os.fstat(src).st_size
        offset = 0
        while offset < size:
            moved = os.copy_file_range(src, dst, size - offset, offset, offset)
            if moved == 0:
                break
            offset += moved
        os.fsync(dst)
    finally:
        os.close(dst)


def _summary(
    manifest: BundleManifest, delta: DeltaSpec, base: SlotInfo, ways: dict[str, int]
) -> dict[str, Any]:
    entries = {e.path: e for e in manifest.entries}
    return {
        "base": base.id,
        "reused": len(delta.reuse),
        "reused_bytes": sum(entries[p].size for p in delta.reuse),
        "patched": len(delta.patches),
        "patched_bytes": sum(entries[p.path].size for p in delta.patches),
        "carried_bytes": manifest.carried_size,
        "linked": dict(sorted(ways.items())),
    }
