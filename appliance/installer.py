"""Verify, install and roll back bundles on the host (the I/O orchestrator).

The pure core (signing.bundle, appliance.verifier) decides what is true; this module owns the
bundle stream, the disk, the slots, the lock and the audit log, and cites the numbered steps of
docs/bundle-format.md. Where the payload bytes go, and on which threads, is
appliance.staging's concern. Every outcome, refusals, interrupts and bugs included, is written
to the audit log with the truth (appliance.outcome), and every host state it reads is checked
first (appliance.slots): damage is reported with its repair, never written over.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from appliance import staging
from appliance.delta import fill_from_base, find_base
from appliance.faults import fault
from appliance.fsutil import atomic_write
from appliance.hashpool import PoolHasher
from appliance.host import HostState, HostTime, Trial, check_signing_time, host_time
from appliance.hostfacts import check_host
from appliance.limits import HOST_LIMITS
from appliance.lock import HostLock
from appliance.outcome import OK, audited
from appliance.parts import PartStream, SplitBundle, find_split, is_split
from appliance.preflight import require_fit
from appliance.slots import HostPaths, SlotInfo, SlotPaths, SlotStore, slot_id
from appliance.trust import TrustStore
from appliance.verifier import VerifiedManifest, check_version, verify_head
from signing.bundle import BundleHead, Limits, open_bundle, read_head, stream_payload
from signing.canonical import encode_canonical, format_time, parse_time
from signing.errors import (
    ActivatedError,
    AirgapError,
    HostBusyError,
    InputError,
    PolicyError,
    StateError,
    VerificationError,
)
from signing.manifest import BundleManifest
from signing.metadata import Root
from signing.tarstream import TarReader

if TYPE_CHECKING:
    from appliance.console import Progress
    from appliance.envsetup import setup_environment
    from appliance.runtime.loader import health_check
else:
    # Step I7's helpers are imported on first use: their modules bring asyncio, venv and the
    # runtime, which verify (and an install without an environment) never needs at start-up.
    def setup_environment(*args: Any, **kwargs: Any) -> Any:
        from appliance.envsetup import setup_environment as run  # noqa: PLC0415

        return run(*args, **kwargs)

    def health_check(*args: Any, **kwargs: Any) -> Any:
        from appliance.runtime.loader import health_check as run  # noqa: PLC0415

        return run(*args, **kwargs)


_T = TypeVar("_T")


@dataclass(frozen=True)
class InstallOptions:
    """An install's options, checked when made: before step I1 writes anything."""

    allow_downgrade: bool = False
    keep: int = HOST_LIMITS.default_keep
    assume_time: datetime | None = None
    skip_health_check: bool = False
    skip_preflight: bool = False
    grace_period_s: int = HOST_LIMITS.default_grace_period_s
    skip_eval: bool = False  # step I7b, the evaluation gate (appliance.evalgate): audited
    accept_eval_drop: bool = False

    def __post_init__(self) -> None:
        if self.keep < 1:
            raise InputError(f"--keep must be at least 1, not {self.keep}")
        longest = HOST_LIMITS.max_grace_period_s
        if not 0 <= self.grace_period_s <= longest:
            raise InputError(
                f"--grace-period must be between 0 and {longest} seconds "
                f"({longest // 86400} days), not {self.grace_period_s}"
            )


@dataclass(frozen=True)
class _Opened:
    """A bundle's stream (a file, a pipe or split parts) with its head read and verified."""

    stream: io.FileIO | PartStream
    split: SplitBundle | None
    tar: TarReader
    head: BundleHead
    verified: VerifiedManifest


@dataclass(frozen=True)
class _Staged:
    """What steps I3 to I5 leave for the rest of the install: the payload in a staging slot."""

    head: BundleHead
    verified: VerifiedManifest
    base: SlotInfo | None  # a delta's base slot
    seq: int
    slot_dir: Path


class Appliance:
    """The operations of ``appliance`` on one host root directory."""

    def __init__(self, root: Path, *, limits: Limits | None = None) -> None:
        self.paths = HostPaths(root)
        self.limits = limits or HOST_LIMITS.bundle
        self.slots = SlotStore(self.paths)
        self.trust = TrustStore(self.paths)
        self.audit = self.paths.audit_log()

    # -- verify ---------------------------------------------------------------------------

    def verify(
        self,
        source: str | Sequence[str],
        *,
        assume_time: datetime | None = None,
        progress: Progress | None = None,
    ) -> VerifiedManifest:
        """Steps V1 to V9 without writing anything but the audit record.

        Split parts that are all there with their indexed sizes are verified in one pass, as a
        bundle file is: the signed hashes prove every data part, and only the parity parts are
        hashed besides. If that pass fails, P1 to P3 run first and a second pass follows, so a
        bad part is named (or rebuilt from parity) exactly as before an install.
        """
        state, damage = self.load_state()
        clock = host_time(state, override=assume_time)
        with audited(self.audit, "verify", clock) as record:
            if damage is not None:
                raise damage
            root = self.trust.load().root

            def attempt(quick: bool) -> VerifiedManifest:
                with self._opened(
                    source, root=root, clock=clock, record=record, progress=progress, quick=quick
                ) as opened:
                    verified = opened.verified
                    _start(progress, verified)
                    with (
                        staging.verify_sink(opened.stream, self.limits) as sink,
                        PoolHasher(self.limits.hash_threads) as hasher,
                    ):
                        stream_payload(
                            opened.tar,
                            verified.manifest,
                            sink,
                            limits=self.limits,
                            progress=progress.advance if progress else None,
                            hasher=hasher,
                        )
                    if quick and opened.split is not None:
                        opened.split.check(progress=progress, parity_only=True)
                return verified

            return _one_pass_first(source, attempt, retry_on=(VerificationError, StateError))

    @contextmanager
    def _opened(
        self,
        source: str | Sequence[str],
        *,
        root: Root,
        clock: HostTime,
        record: dict[str, Any],
        progress: Progress | None,
        quick: bool,
    ) -> Iterator[_Opened]:
        """The bundle's stream with its head read and verified (V1 to V5, I3; from parts, P4:
        the index must name this head), for verify and install alike."""
        with _open_stream(source, record=record, progress=progress, quick=quick) as (
            stream,
            split,
        ):
            tar = open_bundle(stream, self.limits)
            head, verified = _verified_head(
                tar, self.limits, root=root, clock=clock, record=record, split=split
            )
            yield _Opened(stream=stream, split=split, tar=tar, head=head, verified=verified)

    # -- install --------------------------------------------------------------------------

    def install(
        self,
        source: str | Sequence[str],
        options: InstallOptions,
        *,
        progress: Progress | None = None,
    ) -> SlotInfo:
        self.paths.ensure()
        with self.locked("install", override=options.assume_time):
            state, damage = self.load_state()
            adopted: list[str] = []
            if damage is None:
                try:
                    adopted = self.account_for_slots(state)
                except AirgapError as exc:
                    damage = exc
            clock = host_time(state, override=options.assume_time)
            extra: dict[str, Any] = {
                "allow_downgrade": options.allow_downgrade or None,
                "skip_health_check": options.skip_health_check or None,
                "activated": False,
                "adopted_slots": adopted or None,
            }
            with audited(self.audit, "install", clock, **extra) as record:
                # I1: clean what a crashed operation left behind; check the host state that the
                # install builds on, and refuse damage before anything is written.
                if damage is not None:
                    raise damage
                leftovers = self.slots.recover()
                if leftovers:
                    record["recovered"] = leftovers
                previous = self.slots.current()
                return self._install_locked(
                    source,
                    options=options,
                    state=state,
                    previous=previous,
                    clock=clock,
                    record=record,
                    progress=progress,
                )

    def account_for_slots(self, state: HostState) -> list[str]:
        """Account in ``state`` for every slot on disk; return those it did not know.

        A slot state.json does not know was left by a crash between I8 and I10: it is complete
        and verified, so it counts as installed (its version and signing time too: the clock's
        floor must see it), and the audit record says so.
        """
        adopted = []
        for slot in self.slots.list():
            if slot.seq >= state.next_seq:
                adopted.append(slot.id)
            state.see_installed(
                name=slot.name,
                version=slot.version,
                seq=slot.seq,
                created=parse_time(slot.created, what=f"slot {slot.id} created"),
            )
        return adopted

    def _install_locked(
        self,
        source: str | Sequence[str],
        *,
        options: InstallOptions,
        state: HostState,
        previous: SlotInfo | None,
        clock: HostTime,
        record: dict[str, Any],
        progress: Progress | None,
    ) -> SlotInfo:
        # I2: the trusted root.
        root = self.trust.load().root
        staged = self._stage(
            source,
            root=root,
            state=state,
            options=options,
            clock=clock,
            record=record,
            progress=progress,
        )
        manifest, slot_dir, seq = staged.verified.manifest, staged.slot_dir, staged.seq
        try:
            # I5b: a delta's other entries from its base slot, checked on every core.
            if staged.base is not None:
                record["delta"] = fill_from_base(
                    staged.base,
                    manifest,
                    SlotPaths(slot_dir).payload,
                    threads=self.limits.hash_threads,
                )
            fault("after-payload", self.paths.root)
            # I6: the verified head and the slot's own record, then fsync the tree.
            self._write_slot_metadata(
                slot_dir,
                seq=seq,
                verified=staged.verified,
                signature_block=staged.head.signature_block,
                clock=clock,
                options=options,
            )
            # I7: set the bundle's package environment up offline inside the slot and
            # smoke-import it; then start the new slot's model in a child process (with
            # the slot environment's interpreter when it has one) and generate a few tokens.
            if manifest.environment is not None:
                record["environment"] = setup_environment(slot_dir, manifest)
            if not options.skip_health_check:
                health_check(slot_dir)
                record["health_check"] = OK
            # I7b: the evaluation gate (appliance.evalgate, docs/adr/0020): the new slot
            # answers the bundle's signed evaluation set beside the active slot, if it has
            # one; a worse slot is refused here, or with on_fail = "canary" not activated.
            from appliance.evalgate import evaluation_gate  # noqa: PLC0415 - the runtime

            gate = evaluation_gate(
                slot_dir,
                previous,
                skip=options.skip_eval,
                accept_drop=options.accept_eval_drop,
                record=record,
            )
            # I8: the complete slot appears in slots/ by one rename.
            final = self.slots.commit(slot_dir)
        except BaseException:
            shutil.rmtree(slot_dir, ignore_errors=True)
            raise
        fault("after-commit", self.paths.root)
        if not gate.activate:  # I7b's "canary" policy: installed and remembered, not activated
            record["canary_only"] = True
            state.see_installed(
                name=manifest.name, version=manifest.version, seq=seq, created=manifest.created
            )
            state.save(self.paths.state)
            return SlotInfo.read(final)
        # I9: switch `current` atomically; the old slot served until this instant. From here
        # on the outcome is "activated", whatever happens next.
        self.slots.activate(final)
        record.update(activated=True, slot=final.name)
        fault("after-switch", self.paths.root)
        # I10: remember the version and signing time; open the trial period in which `serve`
        # rolls back by itself if the model does not load; drop the oldest inactive slots. A
        # failure here leaves the host consistent: the slots are the ground truth that the next
        # install (or `appliance repair`) reads state.json back from.
        done = (
            f"installed {manifest.name} {manifest.version} into slot {final.name} and activated it"
        )
        try:
            state.see_installed(
                name=manifest.name, version=manifest.version, seq=seq, created=manifest.created
            )
            state.trial = (
                Trial(
                    slot=final.name,
                    previous=previous.id if previous else None,
                    until=clock.system + timedelta(seconds=options.grace_period_s),
                )
                if options.grace_period_s > 0
                else None
            )
            state.save(self.paths.state)
        except (OSError, AirgapError) as exc:
            raise ActivatedError(
                f"{done}, but the host state could not be saved ({_reason(exc)}): no trial "
                "period is open; the next install or 'appliance repair' brings it up to date"
            ) from exc
        try:
            removed = self.slots.garbage_collect(
                options.keep, protect=_canary_slot(self.paths.root)
            )
        except (OSError, AirgapError) as exc:
            raise ActivatedError(
                f"{done}, but old slots could not be removed ({_reason(exc)}); "
                "the next install removes them"
            ) from exc
        if removed:
            record["removed_slots"] = [s.id for s in removed]
        return SlotInfo.read(final)

    def _stage(
        self,
        source: str | Sequence[str],
        *,
        root: Root,
        state: HostState,
        options: InstallOptions,
        clock: HostTime,
        record: dict[str, Any],
        progress: Progress | None,
    ) -> _Staged:
        """Steps I3 to I5: the verified head, judged, and the payload in a new staging slot.

        Split parts that are all there at their indexed sizes are read in one pass, each part
        checked as it is read by the signed hashes (per member, and per 64 MiB chunk). A pass
        that fails to verify discards its staging slot, runs P1 to P3 to name the bad part (or
        rebuild it from parity) and reads again (ADR 0015, amended); a refusal of the bundle
        itself (its version, the host, the delta's base) is not retried.
        """

        def attempt(quick: bool) -> _Staged:
            with self._opened(
                source, root=root, clock=clock, record=record, progress=progress, quick=quick
            ) as opened:
                manifest = opened.verified.manifest
                base = self._judge(manifest, state, options, record)
                # I5: one pass: every member is stored in staging and its stored bytes hashed;
                # from a bundle file the kernel copies them, from a pipe a writer thread writes
                # what was read and hashed (appliance.staging).
                seq = state.next_seq
                slot_dir = self.slots.new_staging(slot_id(seq, manifest))
                payload_dir = SlotPaths(slot_dir).payload
                try:
                    _start(progress, opened.verified)
                    with (
                        staging.payload_sink(payload_dir, opened.stream, self.limits) as sink,
                        PoolHasher(self.limits.hash_threads) as hasher,
                    ):
                        stream_payload(
                            opened.tar,
                            manifest,
                            sink,
                            limits=self.limits,
                            progress=progress.advance if progress else None,
                            hasher=hasher,
                        )
                except BaseException:
                    shutil.rmtree(slot_dir, ignore_errors=True)
                    raise
                return _Staged(
                    head=opened.head,
                    verified=opened.verified,
                    base=base,
                    seq=seq,
                    slot_dir=slot_dir,
                )

        return _one_pass_first(source, attempt, retry_on=(VerificationError,))

    def _judge(
        self,
        manifest: BundleManifest,
        state: HostState,
        options: InstallOptions,
        record: dict[str, Any],
    ) -> SlotInfo | None:
        """Step I3's judgement of a verified bundle, and I4: its version, the host's fitness,
        a delta's base (returned), the room its payload needs."""
        try:
            check_version(
                manifest,
                highest=state.highest.get(manifest.name),
                allow_downgrade=options.allow_downgrade,
            )
        except PolicyError as exc:
            raise PolicyError(exc.diagnostics() + self._slot_hint(manifest)) from None
        # I3: the hardware preflight (docs/preflight.md): a host that cannot run what the manifest
        # requires is refused with every failed check, before anything is written.
        if options.skip_preflight:
            record["skip_preflight"] = True
        elif manifest.requires is not None:
            checks = check_host(manifest.requires, self.paths.root)
            require_fit(checks, bundle=f"{manifest.name} {manifest.version}")
        # I3: a delta bundle needs its exact base installed (appliance.delta).
        base = find_base(self.slots, manifest)
        # I4: room for the payload, so a full disk is a clear refusal, not a torn write. A delta's
        # reused files are clones or links of the base slot's: no room needed.
        needed = manifest.payload_size if base is None else _delta_bytes(manifest)
        free = shutil.disk_usage(self.paths.staging).free
        if needed > free:
            raise StateError(
                f"not enough space: bundle payload needs {needed} bytes, "
                f"{free} free in {self.paths.root}"
            )
        return base

    def _write_slot_metadata(
        self,
        slot_dir: Path,
        *,
        seq: int,
        verified: VerifiedManifest,
        signature_block: bytes,
        clock: HostTime,
        options: InstallOptions,
    ) -> None:
        paths = SlotPaths(slot_dir)
        paths.bundle.mkdir()
        atomic_write(paths.manifest, verified.manifest_bytes)
        atomic_write(paths.signatures, signature_block.rstrip(b" "))
        manifest = verified.manifest
        meta = {
            "seq": seq,
            "name": manifest.name,
            "version": manifest.version,
            "manifest_sha256": verified.manifest_sha256,
            "signers": sorted(verified.signers),
            "installed": format_time(clock.now),
            "created": format_time(manifest.created),
            "allow_downgrade": options.allow_downgrade,
        }
        atomic_write(paths.meta, encode_canonical(meta))

    def _slot_hint(self, manifest: BundleManifest) -> str:
        """For a refused version that still has a slot: how to get it back instead."""
        for slot in self.slots.list():
            if slot.name == manifest.name and (
                BundleManifest.parse_version(slot.version) == manifest.parsed_version
            ):
                return (
                    f"; it is already installed in slot {slot.id}: activate it with "
                    f"'appliance rollback --to {slot.version}'"
                )
        return ""

    # -- trial period after activation -----------------------------------------------------

    def confirm(self, slot: str) -> bool:
        """`serve` loaded ``slot``'s model: end its trial period. True if one was open."""
        with HostLock(self.paths.lock):
            state = HostState.load(self.paths.state)
            if state.trial is None or state.trial.slot != slot:
                return False
            clock = host_time(state, override=None)
            state.trial = None
            state.save(self.paths.state)
            self.audit.append(time=clock.system, event="confirm", outcome=OK, slot=slot)
            return True

    def auto_rollback(self, slot: str, *, reason: str) -> SlotInfo | None:
        """`serve` cannot load ``slot``'s model: within its trial period, roll back.

        Returns the slot now active, or None when ``slot`` is not on trial (then the operator
        decides; nothing is switched behind their back after the grace period).
        """
        with HostLock(self.paths.lock):
            state = HostState.load(self.paths.state)
            clock = host_time(state, override=None)
            trial = state.trial
            current = self.slots.current()
            if trial is None or trial.slot != slot or current is None or current.id != slot:
                return None
            if clock.system >= trial.until:
                return None
            candidates = [s for s in self.slots.list() if s.id == trial.previous]
            target = candidates[0] if candidates else self.slots.previous(current)
            self.slots.activate(target.path)
            state.trial = None
            state.save(self.paths.state)
            self.audit.append(
                time=clock.system,
                event="rollback",
                outcome=OK,
                automatic=True,
                slot_from=slot,
                slot=target.id,
                name=target.name,
                version=target.version,
                error=reason,
            )
            return target

    # -- rollback -------------------------------------------------------------------------

    def rollback(self, *, to: str | None = None) -> tuple[SlotInfo, SlotInfo]:
        """Switch ``current`` to an earlier slot in one rename. Returns (from, to)."""
        self.paths.ensure()
        with self.locked("rollback"):
            state, damage = self.load_state()
            clock = host_time(state, override=None)
            with audited(self.audit, "rollback", clock) as record:
                if damage is not None:
                    raise damage
                self.slots.recover()
                current = self.slots.current()
                if current is None:
                    raise StateError("no active slot: nothing to roll back")
                record.update(name=current.name, version=current.version, slot_from=current.id)
                target = (
                    self.slots.find(to, name=current.name)
                    if to is not None
                    else self.slots.previous(current)
                )
                if target.id == current.id:
                    raise StateError(f"version {target.version} is already active")
                self.slots.activate(target.path)
                record.update(slot=target.id, to_version=target.version)
            return current, target

    # -- trust ----------------------------------------------------------------------------

    def trust_init(self, data: bytes, *, fingerprint: str | None) -> str:
        self.paths.ensure()
        with self.locked("trust-init"):
            clock = host_time(self.load_state()[0], override=None)
            with audited(self.audit, "trust-init", clock) as record:
                signed = self.trust.initialise(data, fingerprint=fingerprint, now=clock.now)
                record.update(root_version=signed.root.version, fingerprint=signed.fingerprint)
                return signed.fingerprint

    def trust_update(self, data: bytes, *, assume_time: datetime | None = None) -> int:
        self.paths.ensure()
        with self.locked("trust-update", override=assume_time):
            clock = host_time(self.load_state()[0], override=assume_time)
            with audited(self.audit, "trust-update", clock) as record:
                signed = self.trust.rotate(data, now=clock.now)
                record.update(root_version=signed.root.version, fingerprint=signed.fingerprint)
                return signed.root.version

    # -- shared ---------------------------------------------------------------------------

    @contextmanager
    def locked(self, event: str, *, override: datetime | None = None) -> Iterator[None]:
        """Hold the host lock; an operation refused because another holds it is audited."""
        lock = HostLock(self.paths.lock)
        try:
            lock.__enter__()
        except HostBusyError:
            clock = host_time(self.load_state()[0], override=override)
            with audited(self.audit, event, clock):
                raise
        try:
            yield
        finally:
            lock.__exit__(None, None, None)

    def load_state(self) -> tuple[HostState, AirgapError | None]:
        """The host state, or an empty one and the damage to report inside the audited block
        (the clock needs a state before the block can start)."""
        try:
            return HostState.load(self.paths.state), None
        except AirgapError as exc:
            return HostState(), exc


def _verified_head(
    tar: TarReader,
    limits: Limits,
    *,
    root: Any,
    clock: HostTime,
    record: dict[str, Any],
    split: SplitBundle | None = None,
) -> tuple[BundleHead, VerifiedManifest]:
    """Steps V1 to V5 / I3, shared by verify and install: read the head, verify it against the
    trusted root at the host's time, refuse a bundle dated far ahead of that time, and say in
    the audit record what was looked at. From parts, P4: the index must name this head."""
    head = read_head(tar, limits)
    record["manifest_sha256"] = hashlib.sha256(head.manifest_bytes).hexdigest()
    verified = verify_head(head, root=root, now=clock.now)
    record.update(_bundle_fields(verified))
    if split is not None:
        manifest = verified.manifest
        split.check_binding(verified.manifest_sha256, name=manifest.name, version=manifest.version)
    check_signing_time(verified.manifest.created, clock)
    return head, verified


def _reason(exc: BaseException) -> str:
    if isinstance(exc, AirgapError):
        return exc.diagnostics()
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)


def _one_pass_first(
    source: str | Sequence[str],
    attempt: Callable[[bool], _T],
    *,
    retry_on: tuple[type[AirgapError], ...],
) -> _T:
    """``attempt(quick)`` for ``source``: split parts that are all there at their indexed sizes
    are read in one pass first (``quick``), each checked as it is read by the signed hashes; if
    that fails with ``retry_on``, P1 to P3 run (naming the bad part, or rebuilding it from
    parity) and ``attempt`` runs again (ADR 0015, amended). Anything else: one attempt."""
    if _is_split_source(source):
        try:
            return attempt(True)
        except retry_on:
            pass
    return attempt(False)


@contextmanager
def _open_stream(
    source: str | Sequence[str],
    *,
    record: dict[str, Any],
    progress: Progress | None,
    quick: bool = False,
) -> Iterator[tuple[io.FileIO | PartStream, SplitBundle | None]]:
    """The bundle's stream: one file or a pipe, or its split parts after P1 to P3
    (appliance.parts), which the audit record then lists; ``quick``: after P1 and P2's sizes
    only, when every part is there (the first pass of verify and of install)."""
    sources = [source] if isinstance(source, str) else list(source)
    if not sources:
        raise InputError("no bundle given")
    if not is_split(sources):
        with _open_source(sources[0]) as stream:
            yield stream, None
        return
    split = find_split(sources)
    record.update(split.audit_fields())
    rebuilt = [] if quick and split.sizes_match() else split.check(progress=progress)
    if rebuilt:
        record["rebuilt_parts"] = [p.entry.file for p in rebuilt]
    with split.open(rebuilt) as parts:
        yield parts, split


def _canary_slot(root: Path) -> frozenset[str]:
    """The canary's slot, which garbage collection keeps (appliance.canary); none if the state
    is absent or damaged (``canary status`` reports the damage)."""
    from appliance.canary import CanaryState  # noqa: PLC0415 - only when slots are removed

    try:
        state = CanaryState.load(root)
    except AirgapError:
        return frozenset()
    return frozenset({state.slot}) if state is not None else frozenset()


def _is_split_source(source: str | Sequence[str]) -> bool:
    return is_split([source] if isinstance(source, str) else list(source))


def _open_source(source: str) -> io.FileIO:
    """The bundle stream, unbuffered: a file, or standard input for ``-`` (a data diode)."""
    try:
        if source == "-":
            return io.FileIO(sys.stdin.fileno(), "rb", closefd=False)
        return io.FileIO(source, "rb")
    except OSError as exc:
        raise InputError(f"cannot open bundle {source}: {exc.strerror}") from None


def _start(progress: Progress | None, verified: VerifiedManifest) -> None:
    if progress is not None:
        manifest = verified.manifest
        progress.start(manifest.payload_size, f"{manifest.name} {manifest.version}")


def _bundle_fields(verified: VerifiedManifest) -> dict[str, Any]:
    return {
        "name": verified.manifest.name,
        "version": verified.manifest.version,
        "signers": sorted(verified.signers),
    }


def _delta_bytes(manifest: BundleManifest) -> int:
    """What a delta writes anew: its carried files and the files rebuilt from patches."""
    patched = {p.path for p in manifest.delta.patches} if manifest.delta else set()
    return manifest.carried_size + sum(e.size for e in manifest.entries if e.path in patched)
