"""The canary: a second installed slot answering a share of the traffic beside the active one.

``appliance canary start VERSION --percent P`` (or ``--keys NAME...``) writes the canary state,
``ROOT/canary.json``, atomically and under the host lock, like every host state
(:func:`appliance.fsutil.atomic_write`); ``serve`` reads it (at start, and every poll), loads
the canary slot's model beside the active one and sends it the requests of the API keys the
state names: a key goes to the canary when ``sha256(key name) mod 100 < P``, so a key sticks
to one slot for the whole canary (its conversations are not split between two models) and a
restart of ``serve`` routes every key exactly as before (docs/adr/0021-canary.md).

``promote`` makes the canary slot the active one with the atomic switch that ``rollback`` uses
(:meth:`SlotStore.activate`), then clears the state; ``abort`` clears it. Every command is one
audit record. The automatic actor inside ``serve`` judges the canary's recent requests against
:class:`Thresholds` (:class:`CanaryWatch`), and, when the canary's bundle carries an evaluation
set, its answers to that set against the active slot's before it routes anything
(appliance.server.canary); it may only abort, never promote: a canary becomes
the active slot only by an operator's command. Its abort is audited with the numbers it measured.

Rules:

- Fail closed: a damaged state file is reported by ``status`` and refused by ``serve`` (which
  then serves the active slot only); a canary slot that is gone, or is the active one (a promote
  interrupted between its switch and its state write), routes nothing.
- The canary and the active slot must fit in memory together: ``start`` runs the memory
  preflight (:mod:`appliance.preflight`) on the sum of both slots' signed requirements.
- Crash order of ``promote``: switch first, clear after; a crash in between leaves a canary
  naming the active slot, which routes nothing and which ``abort`` or the next ``start`` clears.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from appliance.fsutil import atomic_write, fsync_dir
from appliance.host import host_time
from appliance.outcome import audited
from appliance.slots import SlotInfo, SlotPaths
from signing.canonical import encode_canonical, format_time
from signing.errors import HostUnfitError, InputError, IntegrityError, StateError
from signing.manifest import BundleManifest

if TYPE_CHECKING:
    from appliance.installer import Appliance
    from appliance.preflight import Check

CANARY_FILE: Final = "canary.json"
ACTIVE: Final = "active"  # the slot label of a request the active slot answered
CANARY: Final = "canary"  # ... and of one the canary answered
WINDOW: Final = 200  # the canary requests the actor judges: the most recent ones


def canary_file(root: Path) -> Path:
    return root / CANARY_FILE


def bucket(key_name: str) -> int:
    """The key's place in 0..99: the same on every host, in every process, for every restart."""
    digest = hashlib.sha256(key_name.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 100


@dataclass(frozen=True)
class Thresholds:
    """When the actor aborts: over the last :data:`WINDOW` canary requests, once there are at
    least ``min_requests``, more than ``max_error_rate`` of them answered 5xx, or their p99
    latency above ``max_p99_ms``. None leaves the bound to ``serve``'s settings."""

    max_error_rate: float | None = None
    max_p99_ms: int | None = None
    min_requests: int | None = None
    max_eval_mismatch: float | None = None

    def __post_init__(self) -> None:
        if self.max_error_rate is not None and not 0.0 <= self.max_error_rate <= 1.0:
            raise InputError("canary: the error rate threshold must be from 0 to 1")
        if self.max_p99_ms is not None and not self.max_p99_ms >= 1:
            raise InputError("canary: the p99 latency threshold must be 1 ms or more")
        if self.max_eval_mismatch is not None and not 0.0 <= self.max_eval_mismatch <= 1.0:
            raise InputError("canary: the evaluation mismatch threshold must be from 0 to 1")
        if self.min_requests is not None and not 1 <= self.min_requests <= WINDOW:
            raise InputError(f"canary: min requests must be from 1 to {WINDOW}")

    def over(self, defaults: Thresholds) -> Thresholds:
        """These, with ``defaults`` where these are not set."""
        return Thresholds(
            max_error_rate=_first(self.max_error_rate, defaults.max_error_rate),
            max_p99_ms=_first(self.max_p99_ms, defaults.max_p99_ms),
            min_requests=_first(self.min_requests, defaults.min_requests),
            max_eval_mismatch=_first(self.max_eval_mismatch, defaults.max_eval_mismatch),
        )

    def to_json(self) -> dict[str, Any]:
        # No floats in canonical JSON (signing.canonical): the rate is written as a decimal.
        rate, mismatch = self.max_error_rate, self.max_eval_mismatch
        return {
            "max_error_rate": None if rate is None else f"{rate:g}",
            "max_p99_ms": self.max_p99_ms,
            "min_requests": self.min_requests,
            "max_eval_mismatch": None if mismatch is None else f"{mismatch:g}",
        }


def _first(value: Any, default: Any) -> Any:
    return value if value is not None else default


@dataclass(frozen=True)
class CanaryState:
    """What ``canary.json`` says: the canary slot and who is routed to it."""

    slot: str
    name: str
    version: str
    started: str
    percent: int | None = None
    keys: tuple[str, ...] = ()
    thresholds: Thresholds = field(default_factory=Thresholds)

    def routes(self, key_name: str | None) -> bool:
        """Whether the canary answers the caller ``key_name`` (never a caller without a key)."""
        if key_name is None:
            return False
        if self.percent is not None:
            return bucket(key_name) < self.percent
        return key_name in self.keys

    def share(self) -> str:
        if self.percent is not None:
            return f"{self.percent}% of the API keys"
        return "keys " + ", ".join(self.keys)

    def to_json(self) -> dict[str, Any]:
        return {
            "slot": self.slot,
            "name": self.name,
            "version": self.version,
            "started": self.started,
            "percent": self.percent,
            "keys": list(self.keys),
            "thresholds": self.thresholds.to_json(),
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> CanaryState:
        limits = obj["thresholds"]
        percent = obj["percent"]
        state = cls(
            slot=str(obj["slot"]),
            name=str(obj["name"]),
            version=str(obj["version"]),
            started=str(obj["started"]),
            percent=None if percent is None else int(percent),
            keys=tuple(str(k) for k in obj["keys"]),
            thresholds=Thresholds(
                max_error_rate=_number(limits["max_error_rate"]),
                max_p99_ms=_count(limits["max_p99_ms"]),
                min_requests=_count(limits["min_requests"]),
                max_eval_mismatch=_number(limits.get("max_eval_mismatch")),
            ),
        )
        if (state.percent is None) == (not state.keys) or not 0 <= (state.percent or 0) <= 100:
            raise ValueError("exactly one of a percent from 0 to 100 or keys")
        return state

    @classmethod
    def load(cls, root: Path) -> CanaryState | None:
        """The canary of the host at ``root``, or None; IntegrityError when the file is damaged."""
        path = canary_file(root)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StateError(f"cannot read the canary state {path}: {exc.strerror}") from None
        try:
            return cls.from_json(json.loads(raw))
        except (ValueError, KeyError, TypeError, AttributeError, InputError) as exc:
            raise IntegrityError(
                f"the canary state {path} is damaged ({exc}); 'appliance canary abort' clears it"
            ) from None

    def save(self, root: Path) -> None:
        atomic_write(canary_file(root), encode_canonical(self.to_json()))


def _number(value: Any) -> float | None:
    return None if value is None else float(str(value))


def _count(value: Any) -> int | None:
    return None if value is None else int(value)


def clear(root: Path) -> None:
    """Remove the canary state (atomic: one unlink, then the directory is synced)."""
    try:
        canary_file(root).unlink()
    except FileNotFoundError:
        return
    fsync_dir(root)


# -- the operator's commands ------------------------------------------------------------------


def start(
    app: Appliance,
    version: str,
    *,
    percent: int | None,
    keys: tuple[str, ...],
    thresholds: Thresholds,
    known_keys: frozenset[str],
) -> CanaryState:
    """Make the slot of ``version`` (the active slot's bundle name) the canary; audited."""
    if (percent is None) == (not keys):
        raise InputError("canary start: give either --percent or --keys")
    if percent is not None and not 0 <= percent <= 100:
        raise InputError("canary start: --percent must be from 0 to 100")
    if unknown := sorted(set(keys) - known_keys):
        raise InputError(f"canary start: no API key called {', '.join(map(repr, unknown))}")
    app.paths.ensure()
    with app.locked("canary-start"):
        state, damage = app.load_state()
        clock = host_time(state, override=None)
        with audited(app.audit, "canary-start", clock) as record:
            if damage is not None:
                raise damage
            current = app.slots.current()
            if current is None:
                raise StateError("no active slot: install a bundle first ('appliance install')")
            target = app.slots.find(version, name=current.name)
            record.update(slot_active=current.id, slot=target.id, version=target.version)
            record.update(percent=percent, keys=list(keys) or None)
            record.update(thresholds=thresholds.to_json())
            if target.id == current.id:
                raise StateError(f"version {target.version} is the active slot already")
            require_memory_for_both(app, current, target)
            canary = CanaryState(
                slot=target.id,
                name=target.name,
                version=target.version,
                started=format_time(clock.system),
                percent=percent,
                keys=tuple(sorted(set(keys))),
                thresholds=thresholds,
            )
            canary.save(app.paths.root)
            return canary


def promote(app: Appliance) -> tuple[SlotInfo, SlotInfo]:
    """Make the canary slot the active one (rollback's atomic switch), then end the canary."""
    app.paths.ensure()
    with app.locked("canary-promote"):
        state, damage = app.load_state()
        clock = host_time(state, override=None)
        with audited(app.audit, "canary-promote", clock) as record:
            if damage is not None:
                raise damage
            canary = CanaryState.load(app.paths.root)
            if canary is None:
                raise StateError("no canary to promote ('appliance canary start' makes one)")
            current = app.slots.current()
            if current is None:
                raise StateError("no active slot: nothing to promote over")
            target = next((s for s in app.slots.list() if s.id == canary.slot), None)
            if target is None:
                raise StateError(f"the canary slot {canary.slot} is gone; 'appliance canary abort'")
            record.update(slot_from=current.id, slot=target.id, name=target.name)
            record.update(version=target.version, share=canary.share())
            if target.id != current.id:
                app.slots.activate(target.path)
            clear(app.paths.root)
            return current, target


def abort(
    app: Appliance,
    *,
    reason: str | None = None,
    automatic: bool = False,
    measured: dict[str, Any] | None = None,
    only: str | None = None,
) -> CanaryState | None:
    """End the canary; the active slot answers everyone again. Audited, with ``measured``
    (the automatic actor's numbers) and ``reason``. Returns the canary that was ended.

    ``only``: end it only if it is still the canary of that slot (the actor's abort must not
    end a canary the operator started since)."""
    app.paths.ensure()
    with app.locked("canary-abort"):
        state, _ = app.load_state()  # abort needs only the clock: it works on a damaged host
        clock = host_time(state, override=None)
        with audited(app.audit, "canary-abort", clock) as record:
            record.update(automatic=automatic, reason=reason, measured=measured)
            try:
                canary = CanaryState.load(app.paths.root)
            except IntegrityError as exc:  # abort is the repair of a damaged state
                record["damaged"] = exc.diagnostics()
                canary = None
            if canary is not None:
                record.update(slot=canary.slot, name=canary.name, version=canary.version)
            if only is not None and (canary is None or canary.slot != only):
                raise StateError(f"the canary of slot {only} was ended or replaced meanwhile")
            if canary is None and "damaged" not in record:
                raise StateError("no canary to abort")
            clear(app.paths.root)
            return canary


def status(app: Appliance) -> dict[str, Any]:
    """The canary as ``appliance canary status`` shows it; damage is shown, not raised."""
    try:
        canary = CanaryState.load(app.paths.root)
    except IntegrityError as exc:
        return {"canary": None, "problem": exc.diagnostics()}
    if canary is None:
        return {"canary": None, "problem": None}
    current = app.slots.current()
    problem = None
    if current is not None and current.id == canary.slot:
        problem = "the canary slot is the active one (a promote was interrupted): abort clears it"
    elif canary.slot not in {s.id for s in app.slots.list()}:
        problem = f"the canary slot {canary.slot} is gone: abort clears it"
    return {
        "canary": canary.to_json(),
        "active": current.id if current is not None else None,
        "problem": problem,
    }


# -- memory for both --------------------------------------------------------------------------


def memory_checks(app: Appliance, active: SlotInfo, canary: SlotInfo) -> list[Check]:
    """The memory preflight for the two slots at once: RAM (and GPU memory, for a CUDA build)
    for the sum of both slots' signed requirements. Empty when neither states requirements."""
    from appliance.hostfacts import check_host  # noqa: PLC0415 - reads /proc, NVML

    needs = [m.requires for m in (_manifest(active), _manifest(canary)) if m.requires]
    if not needs:
        return []
    memory = sum(r.memory_bytes for r in needs)
    # Only memory: CPU, Python and glibc were checked at each install, the disk holds both.
    both = replace(needs[-1], memory_bytes=memory, disk_bytes=0, cpu=None, python=None, glibc=None)
    gpus = [r.gpu for r in needs if r.gpu is not None]
    if gpus:
        both = replace(both, gpu=replace(gpus[-1], memory_bytes=sum(g.memory_bytes for g in gpus)))
    return [c for c in check_host(both, app.paths.root) if c.name != "disk"]


def require_memory_for_both(app: Appliance, active: SlotInfo, canary: SlotInfo) -> None:
    failed = [c.line() for c in memory_checks(app, active, canary) if not c.ok]
    if failed:
        raise HostUnfitError(
            f"the canary {canary.version} and the active {active.version} do not fit in memory "
            f"together: {' | '.join(failed)}"
        )


def _manifest(slot: SlotInfo) -> BundleManifest:
    try:
        return BundleManifest.from_bytes(SlotPaths(slot.path).manifest.read_bytes())
    except OSError as exc:
        raise IntegrityError(f"slot {slot.id} has no readable manifest: {exc.strerror}") from None


# -- the automatic actor's measure ------------------------------------------------------------


@dataclass(frozen=True)
class Breach:
    """Why the actor aborts, with what it measured (for the audit record)."""

    reason: str
    measured: dict[str, Any]


class CanaryWatch:
    """The canary's most recent requests (thread-safe): failed or not, and how long each took."""

    def __init__(self, window: int = WINDOW) -> None:
        self._lock = threading.Lock()
        self._seen: deque[tuple[bool, float]] = deque(maxlen=window)
        self.total = 0  # canary requests seen since the last reset (for status and the tests)

    def add(self, *, failed: bool, latency_s: float) -> None:
        with self._lock:
            self._seen.append((failed, latency_s))
            self.total += 1

    def reset(self) -> None:
        with self._lock:
            self._seen.clear()
            self.total = 0

    def verdict(self, limits: Thresholds) -> Breach | None:
        """A :class:`Breach` when ``limits`` are exceeded over enough requests, else None."""
        with self._lock:
            seen = list(self._seen)
        if len(seen) < (limits.min_requests or 1):
            return None
        errors = sum(1 for failed, _ in seen if failed)
        rate = errors / len(seen)
        latencies = sorted(latency for _, latency in seen)
        p99_ms = latencies[max(0, math.ceil(0.99 * len(latencies)) - 1)] * 1000.0
        measured = {
            "requests": len(seen),
            "errors": errors,
            "error_rate": f"{rate:.4f}",  # no floats in the audit log
            "p99_ms": round(p99_ms),
            "thresholds": limits.to_json(),
        }
        if limits.max_error_rate is not None and rate > limits.max_error_rate:
            return Breach(
                f"error rate {rate:.1%} over the last {len(seen)} canary requests, above "
                f"{limits.max_error_rate:.1%}",
                measured,
            )
        if limits.max_p99_ms is not None and p99_ms > limits.max_p99_ms:
            return Breach(
                f"p99 latency {p99_ms:.0f} ms over the last {len(seen)} canary requests, above "
                f"{limits.max_p99_ms:g} ms",
                measured,
            )
        return None
