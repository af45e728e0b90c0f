"""``appliance serve``: load the active slot's model, follow ``current``, run the server.

Installs and rollbacks switch ``current`` by one rename; the server notices within
:data:`POLL_S` seconds, loads the new slot's model next to the old one, and swaps it in
(:meth:`ModelHolder.swap`): requests in flight finish on the old model, new ones get the new
one, and the old model is closed when its last request ends.

A newly installed slot is on trial (docs/operator-guide.md): once its model is loaded, serve
confirms it (:meth:`Appliance.confirm`); if it does not load within the grace period, serve
rolls back to the previous slot (:meth:`Appliance.auto_rollback`) and goes on serving that.
Outside a trial, a model that does not load leaves the old one serving, and says so in the log.

A slot with a pip environment (docs/adr/0007-package-environments.md) is served by that
environment's interpreter, so that the backend's packages are the slot's own: at start, serve
re-executes itself under ``SLOT/env/bin/python``; when ``current`` moves to a slot that needs
another interpreter, it stops accepting, lets the requests in flight finish (as on SIGTERM),
and re-executes itself under the new one, which then loads and confirms the new slot.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Final, NoReturn

from appliance.apikeys import KeyStore
from appliance.installer import Appliance
from appliance.runtime.base import Backend, RuntimeSettings
from appliance.runtime.loader import load_backend, slot_runtime_settings
from appliance.server.canary import CanaryFollower, CanaryRoute
from appliance.server.holder import ModelHolder
from appliance.server.poller import Poller
from appliance.server.run import run_server
from appliance.server.settings import ServerSettings
from appliance.server.tls import server_context, warn_if_plaintext
from appliance.slots import SlotInfo, env_python
from signing.errors import AirgapError, StateError

log = logging.getLogger(__name__)

POLL_S: Final = 2.0
# The interpreter the appliance was started with, kept across re-executions into slot
# environments (a slot without one is served by it), and a guard against exec loops.
HOST_PYTHON_ENV: Final = "APPLIANCE_HOST_PYTHON"
EXEC_COUNT_ENV: Final = "APPLIANCE_SERVE_EXECS"
MAX_EXECS: Final = 8


def interpreter_for(slot: Path) -> Path:
    """The interpreter that serves ``slot``: its environment's, else the appliance's own."""
    python = env_python(slot)
    if python is not None:
        return python
    return Path(os.environ.get(HOST_PYTHON_ENV, sys.executable))


def runs_under(python: Path) -> bool:
    """Whether this process is ``python``'s environment (a venv's python is a symlink to the
    host's, so environments are told apart by their prefix, not by the binary)."""
    return Path(sys.prefix).resolve() == python.parent.parent.resolve()


def reexec(python: Path) -> NoReturn:
    """Replace this process by ``python -m appliance <the same arguments>``."""
    count = int(os.environ.get(EXEC_COUNT_ENV, "0")) + 1
    if count > MAX_EXECS:
        raise StateError(f"serve re-executed itself {MAX_EXECS} times; slots keep changing")
    os.environ[EXEC_COUNT_ENV] = str(count)
    os.environ.setdefault(HOST_PYTHON_ENV, sys.executable)
    log.info("serving from the slot environment: re-executing under %s", python)
    logging.shutdown()
    os.execv(python, [str(python), "-m", "appliance", *sys.argv[1:]])  # noqa: S606


class SlotFollower(Poller):
    """Keeps ``holder`` serving the model of the active slot (a thread polls ``current``)."""

    def __init__(
        self,
        root: Path,
        holder: ModelHolder,
        *,
        parallel: int,
        threads: int | None = None,
        load: Callable[[RuntimeSettings], Backend] = load_backend,
        interval_s: float = POLL_S,
    ) -> None:
        super().__init__(
            name="appliance-follow", interval_s=interval_s, what="following the active slot"
        )
        self._appliance = Appliance(root)
        self._holder = holder
        self._parallel = parallel
        self._threads = threads  # the operator's, over the recipe's
        self._load = load
        self._serving: str | None = None  # the slot whose model the holder has
        self._unconfirmed: str | None = None  # loaded, but the host lock was busy
        self.restart_into: Path | None = None  # the slot needs another interpreter

    def load_active(self) -> None:
        """Load the active slot's model into the holder (at start: failures are raised)."""
        backend = self._load_current()
        if backend is None:  # cannot happen before anything is served; be explicit anyway
            raise StateError("no model to serve")
        self._holder.swap(backend)

    def check(self) -> bool:
        """Follow ``current`` if it moved; True if a new model is now served."""
        if self._active_id() == self._serving:
            if self._unconfirmed is not None:
                self._confirm(self._unconfirmed)
            return False
        slot = self._appliance.slots.current()
        if slot is not None and self.restart_into is None:
            python = interpreter_for(slot.path)
            if not runs_under(python):
                log.info("slot %s runs under %s: restarting the server into it", slot.id, python)
                self.restart_into = python
                signal.raise_signal(signal.SIGTERM)  # run_server drains, then serve re-execs
                return False
        try:
            backend = self._load_current()
        except StateError as exc:  # no active slot, or the host lock is busy: next poll
            log.warning("cannot follow the active slot yet: %s", exc.diagnostics())
            return False
        except AirgapError as exc:
            self._serving = self._active_id()  # do not retry this slot every poll
            log.error(  # noqa: TRY400 (one line for the operator, no traceback)
                "the model of slot %s does not load; the old model goes on serving: %s",
                self._serving,
                exc.diagnostics(),
            )
            return False
        if backend is None:
            return False
        old = self._holder.swap(backend)
        log.info("now serving %s (was %s)", backend.model_id, old.model_id if old else "nothing")
        return True

    def _load_current(self) -> Backend | None:
        """The active slot's model, or that of the slot a trial rollback went back to.

        None when the rollback went back to the slot being served already.
        """
        slot = self._appliance.slots.current()
        if slot is None:
            raise StateError("no active slot: install a bundle first ('appliance install')")
        try:
            backend = self._load_slot(slot)
        except AirgapError as exc:
            restored = self._appliance.auto_rollback(slot.id, reason=exc.diagnostics())
            if restored is None:  # not on trial: the operator decides
                raise
            log.error(  # noqa: TRY400 (one line for the operator, no traceback)
                "the model of slot %s does not load (%s): rolled back to slot %s",
                slot.id,
                exc.diagnostics(),
                restored.id,
            )
            if restored.id == self._serving:
                return None
            slot, backend = restored, self._load_slot(restored)
        self._serving = slot.id
        self._confirm(slot.id)
        return backend

    def serving_slot(self) -> Path | None:
        """The directory of the slot whose model is served."""
        if self._serving is None:
            return None
        return self._appliance.paths.slots / self._serving

    def _load_slot(self, slot: SlotInfo) -> Backend:
        settings = slot_runtime_settings(slot.path, parallel=self._parallel)
        if self._threads is not None:
            settings = replace(settings, threads=self._threads)
        return self._load(settings)

    def _confirm(self, slot_id: str) -> None:
        try:
            if self._appliance.confirm(slot_id):
                log.info("slot %s confirmed: its model loads", slot_id)
            self._unconfirmed = None
        except StateError:  # an install or rollback holds the host lock: next poll
            self._unconfirmed = slot_id
        except AirgapError as exc:  # damaged host state: say so, keep serving
            self._unconfirmed = None
            log.error("cannot confirm slot %s: %s", slot_id, exc.diagnostics())  # noqa: TRY400

    def _active_id(self) -> str | None:
        try:
            return self._appliance.paths.current.readlink().name
        except OSError:
            return None


def serve(root: Path, settings: ServerSettings) -> None:
    """Serve the active slot of the appliance at ``root`` until SIGINT/SIGTERM."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)-9s %(message)s")
    # One line per request to the engine is httpx's INFO: not the operator's business.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    settings = settings.resolved(root=root)
    # A bad certificate or key is refused before a model is loaded or a socket bound.
    tls = server_context(settings.tls_cert, settings.tls_key, settings.tls_min_version)
    warn_if_plaintext(settings.host, tls)
    if settings.api_key_file is not None and not KeyStore(settings.api_key_file).list():
        raise StateError(
            f"no API keys in {settings.api_key_file}: create one with 'appliance keys add NAME'"
        )
    active = Appliance(root).slots.current()
    if active is not None and not runs_under(python := interpreter_for(active.path)):
        reexec(python)
    holder = ModelHolder()
    follower = SlotFollower(root, holder, parallel=settings.concurrency, threads=settings.threads)
    follower.load_active()
    serving = follower.serving_slot()
    if serving is not None and not runs_under(python := interpreter_for(serving)):
        holder.close()  # a trial rollback went back to a slot of another environment
        reexec(python)
    follower.start()
    # The canary beside the active slot (appliance.canary): loaded now if canary.json names
    # one, so that a restart routes every key as before; then followed like ``current``.
    route = CanaryRoute(settings.canary_thresholds())
    canary = CanaryFollower(
        root, route, parallel=settings.concurrency, threads=settings.threads, active=holder
    )
    canary.check()
    canary.start()
    try:
        run_server(settings, holder, canary=route)
    finally:
        canary.stop()
        follower.stop()
        route.end()
        holder.close()
    if follower.restart_into is not None:
        reexec(follower.restart_into)
