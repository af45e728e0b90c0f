"""The host's persistent state (``state.json``) and its notion of time.

Where things live on the host is appliance.slots' business (``HostPaths``); this module keeps
what the host remembers across installs and decides what time it is for expiry checks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from appliance.fsutil import atomic_write
from appliance.limits import HOST_LIMITS
from signing.canonical import encode_canonical, format_time, parse_time
from signing.errors import FormatError, IntegrityError, StateError, VerificationError
from signing.manifest import BundleManifest


@dataclass(frozen=True)
class Trial:
    """A newly activated slot on probation: `serve` rolls it back if its model fails to load."""

    slot: str
    previous: str | None
    until: datetime

    def to_json(self) -> dict[str, Any]:
        return {"slot": self.slot, "previous": self.previous, "until": format_time(self.until)}

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> Trial:
        return cls(
            slot=str(value["slot"]),
            previous=None if value["previous"] is None else str(value["previous"]),
            until=parse_time(value["until"], what="state trial until"),
        )


@dataclass
class HostState:
    """What the host remembers across installs; written atomically under the host lock."""

    highest: dict[str, str] = field(default_factory=dict)
    time_floor: datetime | None = None
    next_seq: int = 1
    trial: Trial | None = None

    @classmethod
    def load(cls, path: Path) -> HostState:
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return cls()
        except OSError as exc:
            raise StateError(f"cannot read host state {path}: {exc.strerror}") from None
        try:
            obj: dict[str, Any] = json.loads(raw)
            floor = obj["time_floor"]
            return cls(
                highest=dict(obj["highest"]),
                time_floor=parse_time(floor, what="state time_floor") if floor else None,
                next_seq=int(obj["next_seq"]),
                trial=Trial.from_json(obj["trial"]) if obj.get("trial") else None,
            )
        except (ValueError, KeyError, TypeError, AttributeError, FormatError) as exc:
            raise IntegrityError(
                f"host state {path} is damaged: {exc}; 'appliance repair' rebuilds it "
                "from the slots"
            ) from None

    def save(self, path: Path) -> None:
        atomic_write(
            path,
            encode_canonical(
                {
                    "highest": self.highest,
                    "time_floor": format_time(self.time_floor) if self.time_floor else None,
                    "next_seq": self.next_seq,
                    "trial": self.trial.to_json() if self.trial else None,
                }
            ),
        )

    def see_signing_time(self, created: datetime) -> None:
        if self.time_floor is None or created > self.time_floor:
            self.time_floor = created

    def see_installed(self, *, name: str, version: str, seq: int, created: datetime) -> None:
        """Account for an installed slot: its version, its signing time, its number.

        Called for the slot an install just activated, and for every slot found on disk
        before an install: a crash between the slot's rename (I8) and the state write (I10)
        leaves a slot that state.json does not know yet, and the slots are the ground truth.
        """
        highest = self.highest.get(name)
        if highest is None or BundleManifest.parse_version(version) > (
            BundleManifest.parse_version(highest)
        ):
            self.highest[name] = version
        self.see_signing_time(created)
        self.next_seq = max(self.next_seq, seq + 1)


@dataclass(frozen=True)
class HostTime:
    """The time used for expiry checks, and why (docs/bundle-format.md, "Clocks")."""

    now: datetime
    system: datetime
    override: datetime | None
    floored: bool

    def audit_fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {}
        if self.override is not None:
            fields["assumed_time"] = format_time(self.override)
        if self.floored:
            fields["clock_behind"] = format_time(self.system)
        return fields


def host_time(state: HostState, *, override: datetime | None) -> HostTime:
    """Never trust a clock that is earlier than the newest signing time already seen.

    The operator's ``--assume-time`` replaces the system clock (and is logged), but it is
    floored the same way: no override can make an already-seen signature look unexpired by
    moving time backwards past it.
    """
    system = datetime.now(UTC).replace(microsecond=0)
    now = override if override is not None else system
    floored = state.time_floor is not None and now < state.time_floor
    if floored and state.time_floor is not None:
        now = state.time_floor
    return HostTime(now=now, system=system, override=override, floored=floored)


def check_signing_time(created: datetime, clock: HostTime) -> None:
    """Refuse a bundle signed more than ``max_signed_ahead`` (appliance.limits) after the
    host's time.

    Installing it would raise the time floor past real time, and from then on every install
    and root update would be refused as expired with no way back (the floor exists so that
    nobody can move the clock back past a signature already seen). The operator who knows the
    host clock is wrong vouches for the real time with ``--assume-time``, which is logged.
    """
    if created > clock.now + HOST_LIMITS.max_signed_ahead:
        source = "--assume-time" if clock.override is not None else "this host's clock"
        raise VerificationError(
            f"bundle signed at {format_time(created)}, more than a day after {source} "
            f"({format_time(clock.now)}): a builder clock or SOURCE_DATE_EPOCH is wrong, or this "
            "host's clock is; if the host's clock is wrong, set it, or vouch for the time with "
            f"--assume-time {format_time(created)}"
        )
