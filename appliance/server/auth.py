"""Bearer API keys, checked against the key file, which is re-read when it changes.

``appliance keys revoke`` takes effect on the next request: every check compares the file's
(mtime, size, inode) with what was loaded, a ``stat`` per request. A damaged or unreadable
file is treated as holding no key at all: fail closed, every request gets 401 until it is fixed.
``appliance keys limit`` takes effect the same way, on the next request.

A key's scopes (docs/adr/0016-key-scopes-and-limits.md) are checked here too: an endpoint or
a model the key may not use is a 403, never a 404 that would tell the caller what exists.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import ClassVar

from appliance.apikeys import ApiKey, KeyStore, match_key
from appliance.server.errors import APIError, AuthenticationError
from signing.errors import AirgapError

log = logging.getLogger(__name__)

_Stamp = tuple[int, int, int] | None


class ScopeError(APIError):
    """403: the key is valid, but not for this endpoint or model."""

    status: ClassVar[int] = 403
    type: ClassVar[str] = "permission_error"


class EndpointNotAllowedError(ScopeError):
    code = "endpoint_not_allowed"


class ModelNotAllowedError(ScopeError):
    code = "model_not_allowed"


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
        return self.authenticate(presented).name

    def authenticate(self, presented: str | None) -> ApiKey:
        """The key presented as ``Authorization: Bearer``, with its scopes and limits; 401 if
        none matches."""
        if not presented:
            raise AuthenticationError("missing API key: send it as 'Authorization: Bearer <key>'")
        keys = self._current_keys()
        name = match_key(keys, presented)
        if name is None:
            raise AuthenticationError("invalid API key")
        return next(k for k in keys if k.name == name)


def check_endpoint(key: ApiKey, path: str) -> None:
    """403 unless the scopes of ``key`` reach ``path``."""
    if not key.limits.allows_path(path):
        raise EndpointNotAllowedError(
            f"the API key {key.name!r} may not use {path} (its scopes: "
            + ", ".join(key.limits.scopes)
            + ")"
        )


def check_model(key: ApiKey, model: str) -> None:
    """403 unless ``key`` may use the model ``model``."""
    if not key.limits.allows_model(model):
        raise ModelNotAllowedError(
            f"the API key {key.name!r} may not use the model {model!r}", param="model"
        )


def _stamp(path: Path) -> _Stamp:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    except OSError:
        return (-1, -1, -1)  # the reload that follows fails and accepts no key
    return (st.st_mtime_ns, st.st_size, st.st_ino)
