"""The model being served, replaceable while requests run.

``appliance serve`` swaps in a new backend when the active slot changes. Requests lease the
backend for as long as they use it; :meth:`ModelHolder.swap` makes new leases see the new
backend at once, and the old one is closed when its last lease ends, on whichever thread that
is. A request therefore never sees a model change under it, and never waits for a swap.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from appliance.runtime.base import Backend
from signing.errors import StateError

log = logging.getLogger(__name__)


@dataclass
class _Entry:
    backend: Backend
    loaded_at: float = field(default_factory=time.time)
    leases: int = 0
    retired: bool = False


class Lease:
    """One request's use of one backend; :meth:`release` exactly once (idempotent)."""

    def __init__(self, holder: ModelHolder, entry: _Entry) -> None:
        self._holder = holder
        self._entry: _Entry | None = entry
        self.backend = entry.backend

    def release(self) -> None:
        entry, self._entry = self._entry, None
        if entry is not None:
            self._holder._release(entry)


class ModelHolder:
    """Thread-safe holder of the current backend (or of none: not ready)."""

    def __init__(self, backend: Backend | None = None) -> None:
        self._lock = threading.Lock()
        self._current = _Entry(backend) if backend is not None else None
        self._draining: list[_Entry] = []  # retired, still leased, not closed yet

    def get(self) -> Backend | None:
        """The current backend, for a look at it (model id, context); not for generating."""
        with self._lock:
            return self._current.backend if self._current is not None else None

    def loaded_at(self) -> float | None:
        """When the current backend was put in (Unix time), for the model's ``created``."""
        with self._lock:
            return self._current.loaded_at if self._current is not None else None

    def lease(self) -> Lease:
        with self._lock:
            if self._current is None:
                raise StateError("no model is loaded")
            self._current.leases += 1
            return Lease(self, self._current)

    def swap(self, backend: Backend | None) -> Backend | None:
        """Serve ``backend`` from now on; the previous one closes when its leases end."""
        with self._lock:
            if self._current is not None and self._current.backend is backend:
                return backend  # already serving it: closing it would pull it from under us
            old, self._current = self._current, _Entry(backend) if backend is not None else None
            if old is None:
                return None
            old.retired = True
            idle = old.leases == 0
            if not idle:
                self._draining.append(old)
        if idle:
            _close(old.backend)
        return old.backend

    def close(self) -> None:
        """Retire the current backend (server shutdown)."""
        self.swap(None)

    @property
    def draining(self) -> int:
        """Replaced backends that still finish requests (closed when the last one ends)."""
        with self._lock:
            return len(self._draining)

    def _release(self, entry: _Entry) -> None:
        with self._lock:
            entry.leases -= 1
            idle = entry.retired and entry.leases == 0
            if idle:
                self._draining.remove(entry)
        if idle:
            _close(entry.backend)


def _close(backend: Backend) -> None:
    try:
        backend.close()
    except Exception:  # a failing close must not take a request or the server with it
        log.exception("closing model %s failed", backend.model_id)
