"""The standalone program replaces itself from a signed bundle, and can go back (issue 12).

A bundle may carry a frozen ``appliance`` (``appliance-builder freeze``'s tar) as its entry of
kind ``program``; ``appliance install`` verifies and stores it in the slot like any payload
file. ``appliance self update`` then takes it from the active slot (or ``--slot VERSION``):

1. it hashes the stored program again against the slot's signed manifest;
2. unpacks it into ``HOME/versions/.staging-*`` (no links out, no special files: tarfile's
   ``data`` filter);
3. asks the new program its version: one older than (or equal to) the current program's is
   refused unless ``--allow-downgrade``, the same anti-rollback rule as bundles;
4. runs the new program's ``self test`` against this host's trust store, slots and audit log
   (read only); a failure leaves the running program in place;
5. renames the staging folder to ``HOME/versions/<version>``, then switches ``HOME/current`` by
   one atomic rename of a new symlink; ``HOME/previous`` names the program it replaced.

``appliance self rollback`` switches ``current`` and ``previous`` back. Every step's outcome is
audited in the host's log (events ``self-update``, ``self-rollback``); the trust store, the
slots and the API keys are never written. The layout (docs/operator-guide.md, "First install
on a new host")::

    HOME/versions/<version>/appliance/appliance   the unpacked programs
    HOME/current -> versions/<version>            the one in use (PATH links to current)
    HOME/previous -> versions/<version>           the one before it
"""

from __future__ import annotations

import os
import re
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from packaging.version import InvalidVersion, Version

from appliance.fsutil import fsync_dir, remove_tree
from appliance.hashpool import PoolHasher
from appliance.host import host_time
from appliance.outcome import audited
from appliance.slots import SlotInfo, SlotPaths
from signing.bounded import one_line, quote
from signing.bundle import PAYLOAD_PREFIX, Segment
from signing.chunks import hash_jobs
from signing.errors import IntegrityError, PayloadError, PolicyError, StateError
from signing.manifest import BundleManifest, Entry

if TYPE_CHECKING:
    from appliance.installer import Appliance

DEFAULT_HOME: Final = Path("/opt/appliance")
PROGRAM_KIND: Final = "program"
_VERSION_RE: Final = re.compile(r"appliance, version (\S+)")
_TIMEOUT_S: Final = 120


@dataclass(frozen=True)
class ProgramHome:
    """Where the standalone program's versions live (module docstring)."""

    path: Path

    @property
    def versions(self) -> Path:
        return self.path / "versions"

    @property
    def current(self) -> Path:
        return self.path / "current"

    @property
    def previous(self) -> Path:
        return self.path / "previous"

    def program(self, link: Path) -> Path | None:
        """The executable a link names, if the link exists."""
        if not link.is_symlink():
            return None
        return link / "appliance" / "appliance"

    def version_of(self, link: Path) -> str | None:
        program = self.program(link)
        return program_version(program) if program is not None and program.exists() else None


def program_entry(manifest: BundleManifest) -> Entry | None:
    programs = [e for e in manifest.entries if e.kind == PROGRAM_KIND]
    if len(programs) > 1:  # pragma: no cover - the manifest parser refuses it
        raise IntegrityError("the slot's manifest names more than one program")
    return programs[0] if programs else None


def program_version(program: Path) -> str:
    """What ``program --version`` says its version is."""
    result = _run([str(program), "--version"], what="--version")
    match = _VERSION_RE.search(result.stdout) if result.returncode == 0 else None
    if match is None:
        raise IntegrityError(f"{program} did not say its version: {one_line(result.stdout)}")
    return match.group(1)


def update(
    home: ProgramHome, slot: SlotInfo, root: Path, *, allow_downgrade: bool
) -> dict[str, Any]:
    """Steps 1 to 5 of the module docstring; returns the audit summary."""
    paths = SlotPaths(slot.path)
    manifest = BundleManifest.from_bytes(paths.manifest.read_bytes())
    entry = program_entry(manifest)
    if entry is None:
        raise StateError(
            f"slot {slot.id} carries no appliance program (a bundle built with [program])"
        )
    stored = paths.payload / entry.path
    _check(entry, stored)
    home.versions.mkdir(parents=True, exist_ok=True)
    staging = home.versions / f".staging-{os.getpid()}"
    remove_tree(staging)
    try:
        _unpack(stored, staging)
        new_program = staging / "appliance" / "appliance"
        version = program_version(new_program)
        current = home.version_of(home.current)
        _check_newer(version, current, allow_downgrade=allow_downgrade)
        _self_test(new_program, root)
        target = home.versions / version
        if target.exists():
            remove_tree(target)  # an equal version, allowed: replaced by the verified one
        staging.rename(target)
        fsync_dir(home.versions)
    except BaseException:
        remove_tree(staging)
        raise
    previous = home.current.readlink() if home.current.is_symlink() else None
    _switch(home.current, Path("versions") / version)
    if previous is not None and previous != Path("versions") / version:
        _switch(home.previous, previous)
    return {
        "program_version": version,
        "replaced": current,
        "program_sha256": entry.sha256,
        "slot": slot.id,
        "allow_downgrade": allow_downgrade or None,
    }


def rollback(home: ProgramHome) -> dict[str, Any]:
    """Switch ``current`` back to ``previous`` (and ``previous`` to what was current)."""
    if not home.previous.is_symlink() or not home.current.is_symlink():
        raise StateError(f"no previous program in {home.path} to go back to")
    now, before = home.current.readlink(), home.previous.readlink()
    if not (home.path / before / "appliance" / "appliance").exists():
        raise IntegrityError(f"the previous program {before} is gone from {home.path}")
    _switch(home.current, before)
    _switch(home.previous, now)
    return {"program_version": before.name, "replaced": now.name}


def _check(entry: Entry, stored: Path) -> None:
    """The stored program against the slot's signed manifest, on every core."""
    try:
        with PoolHasher() as hasher:
            for job in hash_jobs(entry, member=PAYLOAD_PREFIX + entry.path):
                fd = os.open(stored, os.O_RDONLY | os.O_CLOEXEC)
                hasher.submit(job, [Segment(fd=fd, offset=job.offset, length=job.length)])
            hasher.drain()
    except PayloadError as exc:
        raise IntegrityError(
            f"the program stored in the slot does not match its signed manifest: "
            f"{exc.diagnostics()}"
        ) from None
    except OSError as exc:
        raise StateError(f"cannot read the program {stored}: {exc.strerror}") from None


def _unpack(tar_path: Path, dest: Path) -> None:
    dest.mkdir(parents=True)
    try:
        with tarfile.open(tar_path) as tar:
            tar.extractall(dest, filter="data")
    except (tarfile.TarError, OSError) as exc:
        raise IntegrityError(f"cannot unpack the program: {one_line(str(exc))}") from None
    if not (dest / "appliance" / "appliance").is_file():
        raise IntegrityError("the program tar holds no appliance/appliance")


def _check_newer(version: str, current: str | None, *, allow_downgrade: bool) -> None:
    if current is None or allow_downgrade:
        return
    try:
        newer = Version(version) > Version(current)
    except InvalidVersion:
        raise IntegrityError(
            f"cannot compare program versions {quote(version)} and {quote(current)}"
        ) from None
    if not newer:
        raise PolicyError(
            f"program {version} is not newer than the current program {current}; "
            "--allow-downgrade replaces it anyway (audited)"
        )


def _self_test(program: Path, root: Path) -> None:
    result = _run([str(program), "--root", str(root), "self", "test"], what="self test")
    if result.returncode != 0:
        tail = [line for line in (result.stderr or result.stdout).splitlines() if line.strip()]
        raise StateError(
            "the new program failed its self-test on this host; the running program stays: "
            f"{one_line(tail[-1] if tail else f'exit status {result.returncode}')}"
        )


def self_test(root: Path) -> str:
    """What ``appliance self test`` checks, read only: this program reads this host's trust
    store, its audit log's chain and every slot's record; returns one summary line."""
    from appliance.installer import Appliance  # noqa: PLC0415 - the CLI imports it anyway

    app = Appliance(root)
    trusted = app.trust.load()
    records = app.audit.check()
    slots = app.slots.list()
    current = app.slots.current()
    active = current.id if current is not None else "none"
    return (
        f"self-test ok: root v{trusted.root.version}, audit log {records} records, "
        f"{len(slots)} slot(s), active {active}"
    )


def _switch(link: Path, target: Path) -> None:
    """``link`` -> ``target`` by one rename of a new symlink."""
    temporary = link.with_name(f".{link.name}.tmp-{os.getpid()}")
    temporary.unlink(missing_ok=True)
    temporary.symlink_to(target)
    temporary.replace(link)
    fsync_dir(link.parent)


def _run(argv: list[str], *, what: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("APPLIANCE_", "PYTHON"))}
    try:
        return subprocess.run(
            argv, capture_output=True, text=True, timeout=_TIMEOUT_S, env=env, check=False
        )
    except subprocess.TimeoutExpired:
        raise StateError(f"the new program's {what} took more than {_TIMEOUT_S} s") from None
    except OSError as exc:
        raise IntegrityError(f"cannot run the new program ({what}): {exc.strerror}") from None


def update_audited(
    app: Appliance, home: ProgramHome, *, version: str | None, allow_downgrade: bool
) -> dict[str, Any]:
    """:func:`update` under the host lock, with its audit record whatever the outcome."""
    with app.locked("self-update"):
        state, damage = app.load_state()
        clock = host_time(state, override=None)
        with audited(app.audit, "self-update", clock, home=str(home.path)) as record:
            if damage is not None:
                raise damage
            slot = app.slots.find(version, name=None) if version else app.slots.current()
            if slot is None:
                raise StateError("no active slot to take the program from")
            summary = update(home, slot, app.paths.root, allow_downgrade=allow_downgrade)
            record.update(summary)
            return summary


def rollback_audited(app: Appliance, home: ProgramHome) -> dict[str, Any]:
    with app.locked("self-rollback"):
        state, _ = app.load_state()
        clock = host_time(state, override=None)
        with audited(app.audit, "self-rollback", clock, home=str(home.path)) as record:
            summary = rollback(home)
            record.update(summary)
            return summary
