"""``appliance serve``: load the active slot's model, follow ``current``, run the server.

Installs and rollbacks switch ``current`` by one rename; the server notices within
:data:`POLL_S` seconds, loads the new slot's model next to the old one, and swaps it in
(:meth:`ModelHolder.swap`): requests in flight finish on the old model, new ones get the new
one, and the old model is closed when its last request ends. If the new model fails to load,
the old one keeps serving and the failure is logged; the install's health check makes that
rare.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Final

from appliance.apikeys import KeyStore
from appliance.host import HostPaths
from appliance.runtime.base import Backend, RuntimeSettings
from appliance.runtime.loader import load_backend, slot_runtime_settings
from appliance.server.holder import ModelHolder
from appliance.server.run import run_server
from appliance.server.settings import ServerSettings
from appliance.slots import SlotStore
from signing.errors import AirgapError, StateError

log = logging.getLogger(__name__)

POLL_S: Final = 2.0


class SlotFollower:
    """A thread that swaps in the model of the active slot whenever ``current`` changes."""

    def __init__(
        self,
        paths: HostPaths,
        holder: ModelHolder,
        *,
        parallel: int,
        load: Callable[[RuntimeSettings], Backend] = load_backend,
        interval_s: float = POLL_S,
    ) -> None:
        self._paths = paths
        self._holder = holder
        self._parallel = parallel
        self._load = load
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="appliance-follow", daemon=True)
        self._serving = _link_target(paths.current)

    def load_active(self) -> Backend:
        slot = SlotStore(self._paths).current()
        if slot is None:
            raise StateError("no active slot: install a bundle first ('appliance install')")
        return self._load(slot_runtime_settings(slot.path, parallel=self._parallel))

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def check(self) -> bool:
        """Swap if ``current`` points elsewhere than the model being served; True if swapped."""
        target = _link_target(self._paths.current)
        if target == self._serving:
            return False
        self._serving = target
        try:
            backend = self.load_active()
        except AirgapError as exc:
            log.error("active slot changed to %s, keeping the old model: %s", target, exc)  # noqa: TRY400
            return False
        old = self._holder.swap(backend)
        log.info("now serving %s (was %s)", backend.model_id, old.model_id if old else "nothing")
        return True

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self.check()


def serve(root: Path, settings: ServerSettings) -> None:
    """Serve the active slot of the appliance at ``root`` until SIGINT/SIGTERM."""
    settings = settings.resolved(root=root)
    if settings.api_key_file is not None and not KeyStore(settings.api_key_file).list():
        raise StateError(
            f"no API keys in {settings.api_key_file}: create one with 'appliance keys add NAME'"
        )
    paths = HostPaths(root)
    holder = ModelHolder()
    follower = SlotFollower(paths, holder, parallel=settings.concurrency)
    holder.swap(follower.load_active())
    follower.start()
    try:
        run_server(settings, holder)
    finally:
        follower.stop()
        holder.close()


def _link_target(link: Path) -> str | None:
    try:
        return str(link.readlink())
    except OSError:
        return None
