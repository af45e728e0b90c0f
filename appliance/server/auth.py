"""Bearer API keys, checked against the key file, which is re-read when it changes.

``appliance keys revoke`` takes effect on the next request: every check compares the file's
(mtime, size, inode) with what was loaded, a ``stat`` per request. A damaged or unreadable
file is treated as holding no key at all: fail closed, every request gets 401 until it is fixed.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from appliance.apikeys import ApiKey, KeyStore, match_key
from appliance.server.errors import AuthenticationError
from signing.errors import AirgapError

log = logging.getLogger(__name__)

_Stamp = tuple[int, int, int] | None


class KeyChecker:
    def __init__(self, path: Path) -> None:
        self._store = KeyStore(path)
        self._lock = threading.Lock()
        self._stamp: _Stamp = None
        self._keys: list[ApiKey] = []
        self._loaded = False

    def _current_keys(self) -> list[ApiKey]:
        stamp = _stamp(self._store.path)
        with self._lock:
            if self._loaded and stamp == self._stamp:
                return self._keys
            try:
                keys = self._store.list() if stamp is not None else []
            except AirgapError as exc:
                log.error("no API key accepted: %s", exc.diagnostics())  # noqa: TRY400 (one line)
                keys = []
            self._keys, self._stamp, self._loaded = keys, stamp, True
            return keys

    def count(self) -> int:
        return len(self._current_keys())

    def check(self, presented: str | None) -> str:
        """The name of the key presented as ``Authorization: Bearer``; 401 if none matches."""
        if not presented:
            raise AuthenticationError("missing API key: send it as 'Authorization: Bearer <key>'")
        name = match_key(self._current_keys(), presented)
        if name is None:
            raise AuthenticationError("invalid API key")
        return name


def _stamp(path: Path) -> _Stamp:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    except OSError:
        return (-1, -1, -1)  # the reload that follows fails and accepts no key
    return (st.st_mtime_ns, st.st_size, st.st_ino)
