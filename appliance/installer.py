"""Verify, install and roll back bundles on the host (the I/O orchestrator).

The pure core (appliance.bundle, appliance.verifier) decides what is true; this module owns the
bundle stream, the disk, the slots, the lock and the audit log, and cites the numbered steps of
docs/bundle-format.md. Every outcome, refusals included, is written to the audit log.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import queue
import shutil
import signal
import stat
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol

from appliance.bundle import DiscardSink, Limits, open_bundle, read_head, stream_payload
from appliance.fsutil import atomic_write, fsync_dir
from appliance.host import HostPaths, HostState, HostTime, Trial, host_time
from appliance.lock import HostLock
from appliance.slots import BUNDLE_DIR, PAYLOAD_DIR, SLOT_META, SlotInfo, SlotStore, slot_id
from appliance.tarstream import TarReader
from appliance.trust import TrustStore
from appliance.verifier import VerifiedManifest, check_version, verify_head
from signing.canonical import encode_canonical, format_time, parse_time
from signing.errors import AirgapError, InputError, ModelError, PolicyError, StateError
from signing.manifest import BundleManifest, Entry

if TYPE_CHECKING:
    from appliance.environment import setup_environment
    from appliance.runtime.loader import health_check
else:
    # Step I7's helpers are imported on first use: their modules bring asyncio, venv and the
    # runtime, which verify (and an install without an environment) never needs at start-up.
    def setup_environment(*args: Any, **kwargs: Any) -> Any:
        from appliance.environment import setup_environment as run  # noqa: PLC0415

        return run(*args, **kwargs)

    def health_check(*args: Any, **kwargs: Any) -> Any:
        from appliance.runtime.loader import health_check as run  # noqa: PLC0415

        return run(*args, **kwargs)


DEFAULT_KEEP: Final = 3
# After activation, a model that fails to load in `serve` within this time rolls back by itself.
DEFAULT_GRACE_PERIOD_S: Final = 600
FAULT_ENV: Final = "APPLIANCE_FAULT_INJECT"
# Exit codes whose errors mean "refused": verification (3), policy (4), failed health check (7).
_REFUSALS: Final = frozenset({3, 4, 7})


class Progress(Protocol):
    def start(self, total: int, description: str) -> None: ...

    def advance(self, amount: int) -> None: ...


@dataclass(frozen=True)
class InstallOptions:
    allow_downgrade: bool = False
    keep: int = DEFAULT_KEEP
    assume_time: datetime | None = None
    skip_health_check: bool = False
    grace_period_s: int = DEFAULT_GRACE_PERIOD_S


class Appliance:
    """The operations of ``appliance`` on one host root directory."""

    def __init__(self, root: Path, *, limits: Limits | None = None) -> None:
        self.paths = HostPaths(root)
        self.limits = limits or Limits()
        self.slots = SlotStore(self.paths)
        self.trust = TrustStore(self.paths)
        self.audit = self.paths.audit_log()

    # -- verify ---------------------------------------------------------------------------

    def verify(
        self,
        source: str,
        *,
        assume_time: datetime | None = None,
        progress: Progress | None = None,
    ) -> VerifiedManifest:
        """Steps V1 to V9 without writing anything but the audit record."""
        state = HostState.load(self.paths.state)
        clock = host_time(state, override=assume_time)
        with self._audited("verify", clock) as record:
            root = self.trust.load().root
            with _open_source(source) as stream:
                tar = open_bundle(stream, self.limits)
                head = read_head(tar, self.limits)
                record["manifest_sha256"] = _sha256(head.manifest_bytes)
                verified = verify_head(head, root=root, now=clock.now)
                record.update(_bundle_fields(verified))
                _start(progress, verified)
                with _verify_sink(stream, self.limits) as sink:
                    stream_payload(
                        tar,
                        verified.manifest,
                        sink,
                        limits=self.limits,
                        progress=progress.advance if progress else None,
                    )
            return verified

    # -- install --------------------------------------------------------------------------

    def install(
        self, source: str, options: InstallOptions, *, progress: Progress | None = None
    ) -> SlotInfo:
        self.paths.ensure()
        with HostLock(self.paths.lock):
            # I1: clean what a crashed operation left behind.
            leftovers = self.slots.recover()
            state = HostState.load(self.paths.state)
            adopted = []
            for slot in self.slots.list():
                # A slot state.json does not know was left by a crash between I8 and I10: it
                # is complete and verified, so it counts as installed, and the log says so.
                if slot.seq >= state.next_seq:
                    adopted.append(slot.id)
                state.see_installed(
                    name=slot.name,
                    version=slot.version,
                    seq=slot.seq,
                    created=parse_time(slot.created, what=f"slot {slot.id} created"),
                )
            clock = host_time(state, override=options.assume_time)
            extra: dict[str, Any] = {
                "allow_downgrade": options.allow_downgrade or None,
                "skip_health_check": options.skip_health_check or None,
            }
            if leftovers:
                extra["recovered"] = leftovers
            if adopted:
                extra["adopted_slots"] = adopted
            with self._audited("install", clock, **extra) as record:
                slot = self._install_locked(
                    source,
                    options=options,
                    state=state,
                    clock=clock,
                    record=record,
                    progress=progress,
                )
                record["slot"] = slot.id
            return slot

    def _install_locked(
        self,
        source: str,
        *,
        options: InstallOptions,
        state: HostState,
        clock: HostTime,
        record: dict[str, Any],
        progress: Progress | None,
    ) -> SlotInfo:
        # I2: the trusted root.
        root = self.trust.load().root
        with _open_source(source) as stream:
            tar = open_bundle(stream, self.limits)
            # I3: read, verify and judge the head before any payload byte is read.
            head = read_head(tar, self.limits)
            record["manifest_sha256"] = _sha256(head.manifest_bytes)
            verified = verify_head(head, root=root, now=clock.now)
            record.update(_bundle_fields(verified))
            manifest = verified.manifest
            try:
                check_version(
                    manifest,
                    highest=state.highest.get(manifest.name),
                    allow_downgrade=options.allow_downgrade,
                )
            except PolicyError as exc:
                raise PolicyError(exc.diagnostics() + self._slot_hint(manifest)) from None
            # I4: room for the payload, so a full disk is a clear refusal, not a torn write.
            free = shutil.disk_usage(self.paths.staging).free
            if manifest.payload_size > free:
                raise StateError(
                    f"not enough space: bundle payload needs {manifest.payload_size} bytes, "
                    f"{free} free in {self.paths.root}"
                )
            # I5: one pass: every member is stored in staging and its stored bytes hashed; from
            # a bundle file the kernel copies them (CopyingSink), from a pipe a writer thread
            # writes what was read and hashed (StagingSink).
            seq = state.next_seq
            staging = self.slots.new_staging(slot_id(seq, manifest))
            try:
                _start(progress, verified)
                with _payload_sink(staging / PAYLOAD_DIR, stream, self.limits) as sink:
                    stream_payload(
                        tar,
                        manifest,
                        sink,
                        limits=self.limits,
                        progress=progress.advance if progress else None,
                    )
                _crashpoint("after-payload")
                # I6: the verified head and the slot's own record, then fsync the tree.
                self._write_slot_metadata(
                    staging,
                    seq=seq,
                    verified=verified,
                    signature_block=head.signature_block,
                    clock=clock,
                    options=options,
                )
                # I7: set the bundle's package environment up offline inside the slot and
                # smoke-import it; then start the new slot's model in a child process (with
                # the slot environment's interpreter when it has one) and generate a few tokens.
                if manifest.environment is not None:
                    record["environment"] = setup_environment(staging, manifest)
                if not options.skip_health_check:
                    record["health_check"] = "ok"
                    health_check(staging)
                # I8: the complete slot appears in slots/ by one rename.
                final = self.slots.commit(staging)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
        _crashpoint("after-commit")
        previous = self.slots.current()
        # I9: switch `current` atomically; the old slot served until this instant.
        self.slots.activate(final)
        _crashpoint("after-switch")
        # I10: remember the version and signing time; open the trial period in which `serve`
        # rolls back by itself if the model does not load; drop the oldest inactive slots.
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
        removed = self.slots.garbage_collect(options.keep)
        if removed:
            record["removed_slots"] = [s.id for s in removed]
        return SlotInfo.read(final)

    def _write_slot_metadata(
        self,
        staging: Path,
        *,
        seq: int,
        verified: VerifiedManifest,
        signature_block: bytes,
        clock: HostTime,
        options: InstallOptions,
    ) -> None:
        bundle_dir = staging / BUNDLE_DIR
        bundle_dir.mkdir()
        atomic_write(bundle_dir / "manifest.json", verified.manifest_bytes)
        atomic_write(bundle_dir / "signatures.json", signature_block.rstrip(b" "))
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
        atomic_write(staging / SLOT_META, encode_canonical(meta))

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
            self._append("confirm", "ok", clock, {"slot": slot})
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
            self._append(
                "rollback",
                "ok",
                clock,
                {
                    "automatic": True,
                    "slot_from": slot,
                    "slot": target.id,
                    "name": target.name,
                    "version": target.version,
                    "error": reason,
                },
            )
            return target

    # -- rollback -------------------------------------------------------------------------

    def rollback(self, *, to: str | None = None) -> tuple[SlotInfo, SlotInfo]:
        """Switch ``current`` to an earlier slot in one rename. Returns (from, to)."""
        self.paths.ensure()
        with HostLock(self.paths.lock):
            self.slots.recover()
            state = HostState.load(self.paths.state)
            clock = host_time(state, override=None)
            with self._audited("rollback", clock) as record:
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
        with HostLock(self.paths.lock):
            clock = host_time(HostState.load(self.paths.state), override=None)
            with self._audited("trust-init", clock) as record:
                signed = self.trust.initialise(data, fingerprint=fingerprint, now=clock.now)
                record.update(root_version=signed.root.version, fingerprint=signed.fingerprint)
                return signed.fingerprint

    def trust_update(self, data: bytes, *, assume_time: datetime | None = None) -> int:
        self.paths.ensure()
        with HostLock(self.paths.lock):
            clock = host_time(HostState.load(self.paths.state), override=assume_time)
            with self._audited("trust-update", clock) as record:
                signed = self.trust.rotate(data, now=clock.now)
                record.update(root_version=signed.root.version, fingerprint=signed.fingerprint)
                return signed.root.version

    # -- audit ----------------------------------------------------------------------------

    @contextmanager
    def _audited(self, event: str, clock: HostTime, **fields: Any) -> Iterator[dict[str, Any]]:
        """Write one audit record for the operation, whatever its outcome."""
        record: dict[str, Any] = {**clock.audit_fields(), **fields}
        try:
            yield record
        except AirgapError as exc:
            outcome = "refused" if exc.exit_code in _REFUSALS else "failed"
            record.pop("health_check", None)
            if isinstance(exc, ModelError):
                record["health_check"] = "failed"
            self._append(event, outcome, clock, record, error=exc.diagnostics())
            raise
        except OSError as exc:
            self._append(event, "failed", clock, record, error=str(exc))
            raise StateError(f"{event} failed: {exc}") from exc
        except KeyboardInterrupt:
            self._append(event, "failed", clock, record, error="interrupted")
            raise
        self._append(event, "ok", clock, record)

    def _append(
        self, event: str, outcome: str, clock: HostTime, record: dict[str, Any], **more: Any
    ) -> None:
        if not self.paths.root.is_dir():
            return
        self.audit.append(time=clock.system, event=event, outcome=outcome, **record, **more)


class StagingSink:
    """Writes payload files into staging on a thread of its own; a third thread fsyncs them.

    The reader thread hashes chunk N+1 while the writer writes chunk N (hashlib and os.write
    release the GIL), and each finished file is fsynced and closed on the syncer thread while
    the writer goes on with the next file: the disk flushes while the CPU hashes. A fixed pool
    of buffers bounds memory whatever the bundle size (docs/benchmarks.md has the figures).
    """

    def __init__(self, payload_dir: Path, limits: Limits) -> None:
        self._dir = payload_dir
        self._free: queue.Queue[bytearray] = queue.Queue()
        for _ in range(limits.buffers):
            self._free.put(bytearray(limits.chunk_bytes))
        self._ops: queue.Queue[tuple[str, Any, int]] = queue.Queue()
        self._error: OSError | None = None
        self._aborted = False
        self._thread = threading.Thread(target=self._run, name="staging-writer", daemon=True)
        self._to_sync: queue.Queue[int | None] = queue.Queue()
        self._syncer = threading.Thread(target=self._sync, name="staging-fsync", daemon=True)

    def __enter__(self) -> StagingSink:
        self._dir.mkdir(parents=True)
        self._syncer.start()
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        # On failure the staging slot is about to be deleted: drop queued writes and skip
        # every fsync, so an interrupted or refused install ends at once even on a busy disk.
        self._aborted = exc_type is not None
        self._ops.put(("stop", None, 0))
        self._thread.join()
        if exc_type is None:
            self._raise_if_failed()

    def buffer(self) -> bytearray:
        self._raise_if_failed()
        return self._free.get()

    def begin(self, entry: Entry) -> None:
        self._ops.put(("begin", entry.path, 0))

    def write(self, buffer: bytearray, length: int) -> None:
        self._ops.put(("write", buffer, length))

    def end(self, entry: Entry) -> None:
        self._ops.put(("end", entry.path, 0))

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise StateError(f"cannot write the staging slot: {self._error}")

    def _run(self) -> None:
        _leave_signals_to_the_main_thread()
        fd = -1
        made_dirs: set[Path] = {self._dir}
        while True:
            op, arg, length = self._ops.get()
            if op == "stop":
                break
            try:
                if self._error is not None or self._aborted:
                    continue
                if op == "begin":
                    path = self._dir / arg
                    _make_parents(path.parent, made_dirs)
                    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
                    fd = os.open(path, flags, 0o644)
                elif op == "write":
                    view = memoryview(arg)[:length]
                    while view:
                        view = view[os.write(fd, view) :]
                elif op == "end":
                    self._to_sync.put(fd)  # the syncer fsyncs and closes it
                    fd = -1
            except OSError as exc:
                self._error = exc
            finally:
                if op == "write":
                    self._free.put(arg)
        if fd >= 0:
            os.close(fd)
        self._to_sync.put(None)
        self._syncer.join()
        if self._error is None and not self._aborted:
            for directory in sorted(made_dirs, key=lambda p: len(p.parts), reverse=True):
                fsync_dir(directory)

    def _sync(self) -> None:
        _leave_signals_to_the_main_thread()
        while (fd := self._to_sync.get()) is not None:
            try:
                if not self._aborted:
                    os.fsync(fd)
            except OSError as exc:
                self._error = self._error or exc
            finally:
                os.close(fd)


# copy_file_range cannot copy between these two files (another file system on a kernel before
# 5.3 or from 5.19 on, no such system call, a file system or sandbox that refuses it): the
# next way down is tried (see CopyingSink._move).
_NO_KERNEL_COPY: Final = frozenset(
    {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM, errno.ETXTBSY}
)
_COPY_FILE_RANGE: Final = "copy_file_range"
_SENDFILE: Final = "sendfile"
_READ_WRITE: Final = "read/write"


class CopyingSink:
    """Step I5 for a bundle that is a regular file: the kernel copies the data, we hash it.

    For each window (``Limits.copy_window_bytes``) of a member, ``os.copy_file_range`` copies
    the bytes from the bundle file's current position into the staged file inside the kernel
    (no copy through Python, no writer thread); then the staged bytes are read back from the
    page cache in ``Limits.chunk_bytes`` pieces, each hashed while it is still in the CPU's
    cache. What is hashed is therefore what the staged file holds, not the source, which could
    change between a hash and a copy (docs/adr/0008-install-copy-path.md). The strict reader
    still reads every header and padding block: the copy advances the file position it reads
    from, through :meth:`TarReader.transfer`, which also detects a truncated bundle.

    Where ``copy_file_range`` is refused (another file system, an old kernel), ``sendfile``
    copies instead, and where that is refused too, plain ``read`` and ``write``; the staged
    bytes are read back and hashed either way. While one window is read back and hashed, the
    next window of the same member is already being copied by a worker thread (both release
    the GIL: the copy runs in the kernel, hashlib hashes large buffers without it), so copying
    and hashing overlap on two cores; the reader is only ever used by one thread at a time,
    and the member's last window is joined before its next header is read. Finished files are
    fsynced and closed on a third thread while the next file is copied; directories at the
    end, deepest first. On any failure nothing more is fsynced: the staging slot is about to
    be removed.
    """

    def __init__(self, payload_dir: Path, source_fd: int, limits: Limits) -> None:
        self._dir = payload_dir
        self._src = source_fd
        self._window = max(limits.copy_window_bytes, limits.chunk_bytes)
        self._buffer = bytearray(limits.chunk_bytes)
        self._view = memoryview(self._buffer)
        # The copy's own buffer, for the read/write fallback on the worker thread.
        self._move_view = memoryview(bytearray(limits.chunk_bytes))
        self._mode = _COPY_FILE_RANGE
        self._copier = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix="staging-copy",
            initializer=_leave_signals_to_the_main_thread,
        )
        self._pending: Future[int] | None = None  # the next window, being copied
        self._fd = -1
        self._copied = 0  # bytes of the current file in place
        self._hashed = 0  # of which read back and handed out
        self._made_dirs: set[Path] = {payload_dir}
        self._error: OSError | None = None
        self._aborted = False
        self._to_sync: queue.Queue[int | None] = queue.Queue()
        self._syncer = threading.Thread(target=self._sync, name="staging-fsync", daemon=True)

    @property
    def mode(self) -> str:
        """How bytes are being copied: copy_file_range, sendfile or read/write."""
        return self._mode

    def __enter__(self) -> CopyingSink:
        self._dir.mkdir(parents=True)
        self._syncer.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        # On failure the staging slot is about to be deleted: skip every fsync still to do.
        self._aborted = exc_type is not None
        self._join_pending(reraise=exc_type is None)
        self._copier.shutdown(wait=True)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._to_sync.put(None)
        self._syncer.join()
        if exc_type is None:
            self._raise_if_failed()
            for directory in sorted(self._made_dirs, key=lambda p: len(p.parts), reverse=True):
                fsync_dir(directory)

    def begin(self, entry: Entry) -> None:
        self._raise_if_failed()
        path = self._dir / entry.path
        _make_parents(path.parent, self._made_dirs)
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        self._fd = os.open(path, flags, 0o644)
        self._copied = self._hashed = 0

    def take(self, tar: TarReader, length: int) -> memoryview:
        self._raise_if_failed()
        if self._hashed == self._copied:
            if self._pending is not None:
                self._join_pending(reraise=True)
            else:
                self._copied = self._copy(tar, min(length, self._window))
            # ``length`` is what is left to hash; of that, what is not copied yet goes next.
            ahead = length - (self._copied - self._hashed)
            if ahead > 0:
                self._pending = self._copier.submit(self._copy, tar, min(ahead, self._window))
        view = self._view[: min(self._copied - self._hashed, len(self._buffer))]
        _read_exactly_at(self._fd, view, self._hashed)
        self._hashed += len(view)
        return view

    def end(self, entry: Entry) -> None:
        self._to_sync.put(self._fd)  # the syncer fsyncs and closes it
        self._fd = -1

    def _copy(self, tar: TarReader, window: int) -> int:
        """Copy the member's next ``window`` bytes into the staged file (either thread);
        return how many bytes the staged file now holds."""
        tar.transfer(window, self._move)
        return os.lseek(self._fd, 0, os.SEEK_CUR)

    def _join_pending(self, *, reraise: bool) -> None:
        """Wait for the window being copied; on success it counts as copied."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        try:
            self._copied = pending.result()
        except BaseException:
            if reraise:
                raise

    def _move(self, count: int) -> int:
        """Copy up to ``count`` bytes from the bundle's position to the staged file's."""
        while self._mode != _READ_WRITE:
            try:
                if self._mode == _COPY_FILE_RANGE:
                    moved = os.copy_file_range(self._src, self._fd, count)
                else:
                    moved = os.sendfile(self._fd, self._src, None, count)
            except OSError as exc:
                if exc.errno not in _NO_KERNEL_COPY:
                    raise
                self._mode = _SENDFILE if self._mode == _COPY_FILE_RANGE else _READ_WRITE
                continue
            if moved > 0:
                return moved
            # 0 is the end of the bundle, or a file system that copies nothing (some virtual
            # and network ones): a read tells the two apart, and the copy goes on by reading.
            self._mode = _READ_WRITE
        view = self._move_view[: min(count, len(self._move_view))]
        got = os.readv(self._src, [view])
        _write_all(self._fd, view[:got])
        return got

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise StateError(f"cannot write the staging slot: {self._error}")

    def _sync(self) -> None:
        _leave_signals_to_the_main_thread()
        while (fd := self._to_sync.get()) is not None:
            try:
                if not self._aborted and self._error is None:
                    os.fsync(fd)
            except OSError as exc:
                self._error = self._error or exc
            finally:
                os.close(fd)


class ReadAheadSink:
    """Verify (V6 to V9) of a bundle that is a regular file: read the next piece while this
    one is hashed.

    ``take`` hands back a member's pieces (``READ_AHEAD_BYTES`` each) read by the strict reader;
    while the caller hashes one, a worker thread already reads the next piece of the same member
    into the other of two buffers (``readinto`` and hashlib both release the GIL). The reader is
    used by one thread at a time: the member's last piece is never read ahead, so the next
    header is read after the worker is done. Saves the read's copy from the page cache (about
    0.1 s per GiB) on the wall clock; nothing is written.
    """

    def __init__(self, piece_bytes: int) -> None:
        self._piece = piece_bytes
        self._buffers = (bytearray(piece_bytes), bytearray(piece_bytes))
        self._turn = 0
        self._pending: Future[memoryview] | None = None
        self._reader = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix="verify-read",
            initializer=_leave_signals_to_the_main_thread,
        )

    def __enter__(self) -> ReadAheadSink:
        return self

    def __exit__(self, *_: object) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.exception()  # wait for it; a failure is already being raised, or moot
        self._reader.shutdown(wait=True)

    def begin(self, entry: Entry) -> None:
        pass

    def take(self, tar: TarReader, length: int) -> memoryview:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            view = pending.result()
        else:
            view = self._read(tar, min(length, self._piece))
        ahead = length - len(view)
        if ahead > 0:
            self._pending = self._reader.submit(self._read, tar, min(ahead, self._piece))
        return view

    def end(self, entry: Entry) -> None:
        pass

    def _read(self, tar: TarReader, length: int) -> memoryview:
        view = memoryview(self._buffers[self._turn])[:length]
        self._turn ^= 1
        tar.read_into(view)
        return view


READ_AHEAD_BYTES: Final = 1 << 20


@contextmanager
def _verify_sink(stream: io.FileIO, limits: Limits) -> Iterator[DiscardSink | ReadAheadSink]:
    """Read-ahead for a bundle file; the plain one-thread pass for a pipe."""
    if limits.copy_window_bytes > 0 and stat.S_ISREG(os.fstat(stream.fileno()).st_mode):
        with ReadAheadSink(READ_AHEAD_BYTES) as sink:
            yield sink
    else:
        yield DiscardSink(limits.chunk_bytes)


def _payload_sink(
    payload_dir: Path, stream: io.FileIO, limits: Limits
) -> StagingSink | CopyingSink:
    """The kernel copy for a bundle that is a regular file; the writer thread for a pipe."""
    if limits.copy_window_bytes > 0 and stat.S_ISREG(os.fstat(stream.fileno()).st_mode):
        return CopyingSink(payload_dir, stream.fileno(), limits)
    return StagingSink(payload_dir, limits)


def _read_exactly_at(fd: int, view: memoryview, offset: int) -> None:
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n == 0:
            raise StateError(f"staged file shorter than what was copied into it ({offset + got})")
        got += n


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        view = view[os.write(fd, view) :]


def _leave_signals_to_the_main_thread() -> None:
    """Block SIGINT and SIGTERM in a worker thread, so the kernel delivers them to the main one.

    Python runs handlers in the main thread only; a signal that lands on a worker would not
    interrupt the main thread's blocking read of a stalled pipe (a paused data diode), and
    Ctrl-C would wait for the next byte.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})


def _make_parents(directory: Path, made: set[Path]) -> None:
    if directory in made:
        return
    _make_parents(directory.parent, made)
    directory.mkdir()
    made.add(directory)


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


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _crashpoint(name: str) -> None:
    """Fault injection for the crash tests: SIGKILL ourselves at a named step.

    Only active when APPLIANCE_FAULT_INJECT names this step; see docs/adr/0004.
    """
    if os.environ.get(FAULT_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
