"""Slots: complete, verified installs side by side, one of them active through ``current``.

A directory under ``slots/`` only ever appears by an atomic rename of a fully written and
fsynced staging directory, so every slot found there is complete. Removal goes the other way:
rename into ``trash/`` first, then delete, so a crash mid-delete never leaves a half slot that
looks whole. Activation and rollback are one ``rename`` of the ``current`` symlink: constant
time, whatever the slot size.
"""

from __future__ import annotations

import builtins
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from appliance.fsutil import atomic_symlink, fsync_dir, remove_temporaries, remove_tree
from appliance.host import HostPaths
from signing.errors import IntegrityError, StateError
from signing.manifest import BundleManifest

SLOT_META: Final = "slot.json"
BUNDLE_DIR: Final = "bundle"
PAYLOAD_DIR: Final = "payload"


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
        try:
            obj = json.loads((path / SLOT_META).read_bytes())
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
            raise IntegrityError(f"slot {path.name} is damaged: {exc}") from None


def slot_id(seq: int, manifest: BundleManifest) -> str:
    return f"{seq:06d}-{manifest.name}-{manifest.version}"


class SlotStore:
    def __init__(self, paths: HostPaths) -> None:
        self._paths = paths

    def list(self) -> builtins.list[SlotInfo]:
        if not self._paths.slots.is_dir():
            return []
        slots = [SlotInfo.read(p) for p in self._paths.slots.iterdir() if p.is_dir()]
        return sorted(slots, key=lambda s: s.seq)

    def current(self) -> SlotInfo | None:
        link = self._paths.current
        if not link.is_symlink():
            return None
        target = self._paths.root / link.readlink()
        return SlotInfo.read(target)

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
        atomic_symlink(self._paths.current, f"slots/{slot_path.name}")

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

    def garbage_collect(self, keep: int) -> builtins.list[SlotInfo]:
        """Remove the oldest inactive slots so that at most ``keep`` remain."""
        current = self.current()
        slots = self.list()
        removable = [s for s in slots if current is None or s.id != current.id]
        excess = len(slots) - max(keep, 1)
        removed = removable[: max(excess, 0)]
        for slot in removed:
            trash = self._paths.trash / slot.id
            remove_tree(trash)
            slot.path.rename(trash)
            fsync_dir(self._paths.slots)
            remove_tree(trash)
        return removed

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
        return leftovers
