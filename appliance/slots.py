"""The host's folder layout, and the slots: complete, verified installs, one active.

This is the one module that knows where things are on disk (docs/bundle-format.md, section
8): :class:`HostPaths` names the folders of the root directory, :class:`SlotPaths` the
folders inside one slot, and :func:`env_python` the interpreter a slot's environment has. The
others ask these instead of joining folder names of their own, so that a change of layout
(media, delta bundles) is a change here. The root directory (``--root``, ``APPLIANCE_ROOT``,
default /var/lib/appliance)::

    trust/root.json          the trusted root (canonical bytes as signed)
    trust/history/N.root.json every root ever trusted, by version
    state.json               highest version per bundle name, time floor, next slot number
    slots/<seq>-<name>-<ver> verified, complete slots
    current -> slots/...     the active slot (a symlink, switched by rename)
    envs/<key>/              package environments, shared by the slots whose bundles pin the
                             same packages (key: appliance.envsetup.environment_key)
    staging/, trash/         work in progress; removed by recovery after a crash
    quarantine/              stray entries of slots/ set aside by 'appliance repair'
    lock                     flock held by state-changing operations
    audit.jsonl              the hash-chained audit log

and one slot::

    slot.json                the slot's own record (seq, name, version, signers, times)
    bundle/manifest.json     the verified manifest, bundle/signatures.json its signatures
    payload/...              the payload files, as the manifest lists them
    env -> ../../envs/<key>  the package environment set up in step I7, if the bundle has one
    cpu-variant.json         the llama.cpp CPU variant this host can execute, chosen by the
                             health check (appliance.runtime.cpuvariant); absent otherwise

A directory under ``slots/`` only ever appears by an atomic rename of a fully written and
fsynced staging directory, so every slot found there is complete. Removal goes the other way:
rename into ``trash/`` first, then delete, so a crash mid-delete never leaves a half slot that
looks whole. Activation and rollback are one ``rename`` of the ``current`` symlink: constant
time, whatever the slot size.

Everything read back is checked, because anything on disk may have been damaged or planted
(docs/threat-model.md, "Damaged host state"): a slot is a real directory (never a symlink)
directly under ``slots/`` whose name, ``slot.json`` and stored manifest agree; ``current`` is
a symlink to ``slots/<one of them>``. Entries that are not slots are ignored with a warning
(once per store) and never adopted; a ``current`` that points anywhere else is reported with
its repair (``appliance repair``, docs/cli.md), never followed.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from appliance.audit import AuditLog
from appliance.fsutil import atomic_symlink, fsync_dir, remove_temporaries, remove_tree
from signing.bounded import quote
from signing.errors import IntegrityError, StateError
from signing.manifest import BundleManifest

LOG: Final = logging.getLogger(__name__)
REPAIR: Final = "run 'appliance repair'"
DEFAULT_ROOT: Final = Path("/var/lib/appliance")
SLOTS_DIR: Final = "slots"
STAGING_DIR: Final = "staging"
SLOT_META: Final = "slot.json"
BUNDLE_DIR: Final = "bundle"
PAYLOAD_DIR: Final = "payload"
ENV_DIR: Final = "env"
ENVS_DIR: Final = "envs"


@dataclass(frozen=True)
class HostPaths:
    """The folders and files of the host's root directory."""

    root: Path

    @property
    def trust(self) -> Path:
        return self.root / "trust"

    @property
    def trusted_root(self) -> Path:
        return self.trust / "root.json"

    @property
    def root_history(self) -> Path:
        return self.trust / "history"

    @property
    def state(self) -> Path:
        return self.root / "state.json"

    @property
    def slots(self) -> Path:
        return self.root / SLOTS_DIR

    @property
    def staging(self) -> Path:
        return self.root / STAGING_DIR

    @property
    def trash(self) -> Path:
        return self.root / "trash"

    @property
    def envs(self) -> Path:
        return self.root / ENVS_DIR

    @property
    def quarantine(self) -> Path:
        return self.root / "quarantine"

    @property
    def current(self) -> Path:
        return self.root / "current"

    @property
    def lock(self) -> Path:
        return self.root / "lock"

    @property
    def audit(self) -> Path:
        return self.root / "audit.jsonl"

    @property
    def api_keys(self) -> Path:
        return self.root / "api-keys.json"

    def ensure(self) -> None:
        directories = (
            self.root,
            self.trust,
            self.root_history,
            self.slots,
            self.staging,
            self.trash,
        )
        try:
            for directory in directories:
                directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StateError(f"appliance root {self.root} is unusable: {exc.strerror}") from None

    def audit_log(self) -> AuditLog:
        return AuditLog(self.audit)


@dataclass(frozen=True)
class SlotPaths:
    """The folders and files inside one slot, or inside its staging directory before step I8
    renames it into ``slots/``."""

    path: Path

    @property
    def meta(self) -> Path:
        return self.path / SLOT_META

    @property
    def bundle(self) -> Path:
        return self.path / BUNDLE_DIR

    @property
    def manifest(self) -> Path:
        return self.bundle / "manifest.json"

    @property
    def signatures(self) -> Path:
        return self.bundle / "signatures.json"

    @property
    def payload(self) -> Path:
        return self.path / PAYLOAD_DIR

    @property
    def env(self) -> Path:
        return self.path / ENV_DIR

    def shared_env(self, key: str) -> tuple[Path, Path]:
        """The shared environment ``key`` (``ROOT/envs/<key>``) and the relative target that
        the slot's ``env`` link names: the same from ``staging/<id>`` and ``slots/<id>``."""
        return self.path.parent.parent / ENVS_DIR / key, Path("..", "..", ENVS_DIR, key)

    @property
    def env_bin(self) -> Path:
        return self.env / "bin"

    @property
    def env_python(self) -> Path:
        """Where an environment's interpreter is (a venv's, or a conda env's that has one)."""
        return self.env_bin / "python"

    @property
    def cpu_variant(self) -> Path:
        """The remembered llama.cpp CPU variant for this host (appliance.runtime.cpuvariant)."""
        return self.path / "cpu-variant.json"

    def env_site_packages(self, python: str) -> Path:
        """The environment's site-packages for Python ``python`` (``"3.12"``)."""
        return self.env / "lib" / f"python{python}" / "site-packages"

    @property
    def env_scratch(self) -> Path:
        """Scratch space of step I7, inside the slot: the same file system as ``env``."""
        return self.path / ".env-scratch"

    @property
    def env_cache(self) -> Path:
        """The package cache of step I7 (same file system: rattler hard-links from it)."""
        return self.path / ".env-cache"

    @property
    def committed(self) -> SlotPaths:
        """Where the slot will be once committed: step I8 renames ``staging/<id>`` to
        ``slots/<id>``; a slot already there is where it stays."""
        if self.path.parent.name == STAGING_DIR:
            return SlotPaths(self.path.parent.parent / SLOTS_DIR / self.path.name)
        return self


def env_python(slot: Path) -> Path | None:
    """The interpreter a slot's backend runs under: ``SLOT/env/bin/python`` for a pip env (or a
    conda env that carries Python); None when the slot has no such interpreter."""
    python = SlotPaths(slot).env_python
    return python if python.exists() else None


@dataclass(frozen=True)
class SlotInfo:
    id: str
    path: Path
    seq: int
    name: str
    version: str
    manifest_sha256: str
    signers: tuple[str, ...]
    installed: str
    created: str
    allow_downgrade: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "seq": self.seq,
            "name": self.name,
            "version": self.version,
            "manifest_sha256": self.manifest_sha256,
            "signers": list(self.signers),
            "installed": self.installed,
            "created": self.created,
            "allow_downgrade": self.allow_downgrade,
        }

    @classmethod
    def read(cls, path: Path) -> SlotInfo:
        """The slot at ``path``, checked: its name, its ``slot.json`` and its stored manifest
        must agree, so a planted or half-edited directory is never taken for a slot."""
        info = cls._read_meta(path)
        expected = slot_name(info.seq, info.name, info.version)
        if path.name != expected:
            raise IntegrityError(
                f"slot {quote(path.name)} is damaged: its slot.json describes {expected}"
            )
        try:
            stored = SlotPaths(path).manifest.read_bytes()
        except OSError as exc:
            raise IntegrityError(
                f"slot {path.name} is damaged: no readable manifest ({exc.strerror})"
            ) from None
        if hashlib.sha256(stored).hexdigest() != info.manifest_sha256:
            raise IntegrityError(
                f"slot {path.name} is damaged: its manifest is not the one slot.json names"
            )
        return info

    @classmethod
    def _read_meta(cls, path: Path) -> SlotInfo:
        try:
            obj = json.loads(SlotPaths(path).meta.read_bytes())
            return cls(
                id=path.name,
                path=path,
                seq=int(obj["seq"]),
                name=str(obj["name"]),
                version=str(obj["version"]),
                manifest_sha256=str(obj["manifest_sha256"]),
                signers=tuple(obj["signers"]),
                installed=str(obj["installed"]),
                created=str(obj["created"]),
                allow_downgrade=bool(obj["allow_downgrade"]),
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise IntegrityError(f"slot {quote(path.name)} is damaged: {exc}") from None


def slot_id(seq: int, manifest: BundleManifest) -> str:
    return slot_name(seq, manifest.name, manifest.version)


def slot_name(seq: int, name: str, version: str) -> str:
    return f"{seq:06d}-{name}-{version}"


class SlotStore:
    def __init__(self, paths: HostPaths) -> None:
        self._paths = paths
        self._warned: set[str] = set()

    def list(self) -> builtins.list[SlotInfo]:
        """The valid slots, oldest first; every other entry of ``slots/`` is warned about."""
        slots, strays = self.scan()
        for entry, problem in strays:
            if entry.name not in self._warned:
                self._warned.add(entry.name)
                LOG.warning("ignoring slots/%s: %s; %s", quote(entry.name)[1:-1], problem, REPAIR)
        return slots

    def scan(self) -> tuple[builtins.list[SlotInfo], builtins.list[tuple[Path, str]]]:
        """The valid slots, and each other entry of ``slots/`` with what is wrong with it."""
        if not self._paths.slots.is_dir():
            return [], []
        slots: builtins.list[SlotInfo] = []
        strays: builtins.list[tuple[Path, str]] = []
        for entry in sorted(self._paths.slots.iterdir()):
            if entry.is_symlink():
                strays.append((entry, "a symbolic link is never a slot"))
            elif not entry.is_dir():
                strays.append((entry, "not a directory"))
            else:
                try:
                    slots.append(SlotInfo.read(entry))
                except IntegrityError as exc:
                    strays.append((entry, exc.diagnostics()))
        return sorted(slots, key=lambda s: s.seq), strays

    def current(self) -> SlotInfo | None:
        """The active slot; None before the first install. Raises IntegrityError when
        ``current`` is anything but a symlink to one of the valid slots."""
        link = self._paths.current
        if not link.is_symlink():
            if link.exists():
                raise IntegrityError(f"{link} is not a symbolic link to a slot; {REPAIR}")
            return None
        problem = self.current_problem()
        if problem is not None:
            raise IntegrityError(f"{problem}; {REPAIR}")
        target = str(link.readlink())
        return next(s for s in self.list() if s.id == target.removeprefix(f"{SLOTS_DIR}/"))

    def current_problem(self) -> str | None:
        """What is wrong with ``current``, or None (also when there is none yet)."""
        link = self._paths.current
        if not link.is_symlink():
            return f"{link.name} is not a symbolic link" if link.exists() else None
        target = str(link.readlink())
        directory, _, name = target.partition("/")
        if directory != SLOTS_DIR or name in {"", ".", ".."} or "/" in name:
            return f"current points at {quote(target)}, outside slots/"
        if name not in {s.id for s in self.scan()[0]}:
            return f"current points at {quote(target)}, which is missing or not a valid slot"
        return None

    def new_staging(self, slot: str) -> Path:
        staging = self._paths.staging / slot
        remove_tree(staging)
        staging.mkdir(parents=True)
        return staging

    def commit(self, staging: Path) -> Path:
        """Move a complete staging directory into ``slots/`` (step I8)."""
        final = self._paths.slots / staging.name
        fsync_dir(staging)
        staging.rename(final)
        fsync_dir(self._paths.slots)
        fsync_dir(self._paths.staging)
        return final

    def activate(self, slot_path: Path) -> None:
        """Point ``current`` at ``slot_path`` with one atomic rename (step I9)."""
        atomic_symlink(self._paths.current, f"{SLOTS_DIR}/{slot_path.name}")

    def find(self, version: str, *, name: str | None) -> SlotInfo:
        want = BundleManifest.parse_version(version)
        matches = [
            s
            for s in self.list()
            if BundleManifest.parse_version(s.version) == want and (name is None or s.name == name)
        ]
        if not matches:
            raise StateError(f"no slot holds version {version}")
        return matches[-1]

    def previous(self, current: SlotInfo) -> SlotInfo:
        earlier = [s for s in self.list() if s.seq < current.seq]
        if not earlier:
            raise StateError(
                f"no slot older than the active one ({current.version}) to roll back to"
            )
        return earlier[-1]

    def garbage_collect(
        self, keep: int, *, protect: frozenset[str] = frozenset()
    ) -> builtins.list[SlotInfo]:
        """Remove the oldest inactive slots so that at most ``keep`` remain; never the active
        one, nor those in ``protect`` (a canary's)."""
        current = self.current()
        slots = self.list()
        removable = [
            s for s in slots if (current is None or s.id != current.id) and s.id not in protect
        ]
        excess = len(slots) - max(keep, 1)
        removed = removable[: max(excess, 0)]
        for slot in removed:
            trash = self._paths.trash / slot.id
            remove_tree(trash)
            slot.path.rename(trash)
            fsync_dir(self._paths.slots)
            remove_tree(trash)
        if removed:
            self.remove_unused_envs()
        return removed

    def remove_unused_envs(self) -> builtins.list[str]:
        """Remove the shared environments that no slot (nor a staging slot) links to."""
        envs = self._paths.envs
        if not envs.is_dir():
            return []
        used = set()
        for directory in (self._paths.slots, self._paths.staging):
            for slot in directory.iterdir() if directory.is_dir() else ():
                link = SlotPaths(slot).env
                if link.is_symlink():
                    used.add(link.readlink().name)
        removed = []
        for env in envs.iterdir():
            if env.name not in used:
                trash = self._paths.trash / f"env-{env.name}"
                remove_tree(trash)
                env.rename(trash)
                remove_tree(trash)
                removed.append(env.name)
        if removed:
            fsync_dir(envs)
        return removed

    def set_aside(self, entry: Path) -> str:
        """Take a stray entry out of ``slots/``: a symlink is removed (only the link), anything
        else is moved into ``quarantine/`` for the operator to inspect. Returns what was done."""
        if entry.is_symlink():
            entry.unlink()
            fsync_dir(entry.parent)
            return f"removed the symbolic link slots/{entry.name}"
        quarantine = self._paths.quarantine
        quarantine.mkdir(exist_ok=True)
        target = quarantine / entry.name
        suffix = 1
        while target.exists() or target.is_symlink():
            suffix += 1
            target = quarantine / f"{entry.name}.{suffix}"
        entry.rename(target)
        fsync_dir(entry.parent)
        fsync_dir(quarantine)
        return f"moved slots/{entry.name} to quarantine/{target.name}"

    def deactivate(self) -> None:
        """Remove ``current`` (no valid slot to point it at)."""
        self._paths.current.unlink(missing_ok=True)
        fsync_dir(self._paths.root)

    def recover(self) -> builtins.list[str]:
        """Clean what an interrupted operation left: staging, trash, temporary files."""
        leftovers = []
        for directory in (self._paths.staging, self._paths.trash):
            if directory.is_dir():
                for entry in directory.iterdir():
                    leftovers.append(f"{directory.name}/{entry.name}")
                    remove_tree(entry)
        for directory in (self._paths.root, self._paths.trust, self._paths.root_history):
            if directory.is_dir():
                remove_temporaries(directory)
        # An environment no slot links to was left by a crash during I7 (or by an old slot).
        leftovers += [f"envs/{name}" for name in self.remove_unused_envs()]
        return leftovers
