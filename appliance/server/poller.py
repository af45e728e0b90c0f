"""A thread that polls: ``check()`` every ``interval_s`` until stopped, surviving any error.

The server's followers (the active slot's, ``serve``; the canary's) watch files that other
processes change (``current``, ``canary.json``). They poll, as the service manager restarts
nothing for them: an error in one poll is logged and the next poll comes.
"""

from __future__ import annotations

import logging
import threading

log = logging.getLogger(__name__)


class Poller:
    """Calls :meth:`check` every ``interval_s`` seconds on a daemon thread named ``name``."""

    def __init__(self, *, name: str, interval_s: float, what: str) -> None:
        self._interval_s = interval_s
        self._what = what  # for the log line of a failed poll: "following the canary"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def check(self) -> object:
        """One poll."""
        raise NotImplementedError

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self.check()
            except Exception:  # the follower must outlive any surprise; the server goes on
                log.exception("%s failed", self._what)
