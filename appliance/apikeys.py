"""API keys for the REST server: ``DIR/api-keys.json``, hashes only, written atomically (0600).

A key is shown once, when it is made, and never stored: the file keeps its SHA-256. A plain
hash (no salt, no slow KDF) is enough because keys are 256-bit random strings, not passwords:
there is nothing to guess. :meth:`KeyStore.verify` compares the presented key's hash with every
stored hash in constant time and never stops at the first match, so neither the timing nor the
order of the file says which key (or how much of one) matched.

A key may be restricted (docs/adr/0016-key-scopes-and-limits.md): to endpoints (path prefixes
or the named groups of :data:`ENDPOINT_GROUPS`), to model ids, to requests per minute and to
tokens per day. A field that is absent means "no restriction", so files written before scopes
existed read as before. A file holding any restriction is written as version 2, which older
appliances refuse (every request then gets 401): an old reader never drops a restriction.
"""

from __future__ import annotations

import builtins
import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import Any, Final

from appliance.fsutil import atomic_write
from appliance.slots import HostPaths
from signing.canonical import format_time
from signing.errors import InputError, IntegrityError, StateError

KEY_PREFIX: Final = "sk-air-"
FILE_MODE: Final = 0o600
_PLAIN_VERSION: Final = 1  # no key carries a restriction
_SCOPED_VERSION: Final = 2  # some key does: older readers must refuse the file
_VERSIONS: Final = frozenset({_PLAIN_VERSION, _SCOPED_VERSION})
_NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_SHA256_RE: Final = re.compile(r"[0-9a-f]{64}")
_MODEL_RE: Final = re.compile(r"[^\s\x00-\x1f\x7f]{1,256}")
_PREFIX_RE: Final = re.compile(r"/[A-Za-z0-9._~/-]{0,255}")
# The endpoints of the named scopes, as path prefixes (a prefix matches itself and what lies
# below it, at a '/' boundary: "/api/embed" is not "/api/embeddings").
ENDPOINT_GROUPS: Final[Mapping[str, tuple[str, ...]]] = {
    "chat": ("/v1/chat/completions", "/api/chat"),
    "completions": ("/v1/completions", "/api/generate"),
    "embeddings": ("/v1/embeddings", "/api/embed", "/api/embeddings"),
    "models": ("/v1/models", "/api/tags", "/api/ps", "/api/show"),
    "openai": ("/v1",),
    "ollama": ("/api",),
    "metrics": ("/metrics",),
    "health": ("/readyz",),
    "docs": ("/docs", "/openapi.json"),
}
OLLAMA_DEFAULT_TAG: Final = ":latest"


def key_file(root: Path) -> Path:
    """Where the keys of the appliance whose root directory is ``root`` live (the layout is
    appliance.slots's)."""
    return HostPaths(root).api_keys


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class KeyLimits:
    """What a key may reach and how much; empty or None: no restriction."""

    scopes: tuple[str, ...] = ()  # group names or path prefixes
    models: tuple[str, ...] = ()
    rpm: int | None = None
    tokens_per_day: int | None = None

    def __post_init__(self) -> None:
        for scope in self.scopes:
            if scope not in ENDPOINT_GROUPS and not _PREFIX_RE.fullmatch(scope):
                raise InputError(
                    f"scope {scope!r} is neither a path prefix ('/v1/chat') nor one of "
                    + ", ".join(ENDPOINT_GROUPS)
                )
        for model in self.models:
            if not _MODEL_RE.fullmatch(model):
                raise InputError(f"model id {model!r} must be 1-256 printable characters")
        for what, value in (("rpm", self.rpm), ("tokens per day", self.tokens_per_day)):
            if value is not None and (isinstance(value, bool) or value < 1):
                raise InputError(f"{what} must be a whole number of at least 1, not {value!r}")

    @property
    def restricted(self) -> bool:
        return self != KeyLimits()

    @cached_property  # checked on every request of the key
    def prefixes(self) -> tuple[str, ...]:
        """The path prefixes the scopes name (the groups expanded)."""
        out: list[str] = []
        for scope in self.scopes:
            out.extend(ENDPOINT_GROUPS.get(scope, (scope,)))
        return tuple(out)

    def allows_path(self, path: str) -> bool:
        if not self.scopes:
            return True
        return any(_under(path, prefix) for prefix in self.prefixes)

    def allows_model(self, model: str) -> bool:
        """Model ids match exactly; Ollama's default tag ``:latest`` may be added."""
        if not self.models:
            return True
        return model in self.models or model.removesuffix(OLLAMA_DEFAULT_TAG) in self.models

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {}
        if self.scopes:
            doc["scopes"] = list(self.scopes)
        if self.models:
            doc["models"] = list(self.models)
        if self.rpm is not None:
            doc["rpm"] = self.rpm
        if self.tokens_per_day is not None:
            doc["tokens_per_day"] = self.tokens_per_day
        return doc


NO_LIMITS: Final = KeyLimits()


def scope_list(values: Iterable[str]) -> tuple[str, ...]:
    """``--scope chat,embeddings --scope /v1/models`` -> its items, in order, once each."""
    items = (part.strip() for value in values for part in value.split(","))
    return tuple(dict.fromkeys(item for item in items if item))


@dataclass(frozen=True)
class ApiKey:
    name: str
    sha256: str
    created: str
    limits: KeyLimits = NO_LIMITS

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "sha256": self.sha256,
            "created": self.created,
            **self.limits.to_json(),
        }


class KeyStore:
    """The key file of one appliance. Every method reads the file afresh."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def add(self, name: str, limits: KeyLimits = NO_LIMITS) -> str:
        """Make a key called ``name`` and return it; this is the only time it is ever seen."""
        if not _NAME_RE.fullmatch(name):
            raise InputError(
                f"key name {name!r} must be 1-64 letters, digits, '.', '_' or '-', "
                "starting with a letter or digit"
            )
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        with self._locked():
            keys = self.list()
            if any(k.name == name for k in keys):
                raise InputError(f"an API key named {name!r} exists already; revoke it first")
            created = format_time(datetime.now(UTC).replace(microsecond=0))
            made = ApiKey(name=name, sha256=hash_key(key), created=created, limits=limits)
            self._save([*keys, made])
        return key

    def update_limits(self, name: str, change: Callable[[KeyLimits], KeyLimits]) -> ApiKey:
        """Give the key called ``name`` the scopes and limits ``change`` makes of its current
        ones (read and written under the file's lock); the key itself stays the same."""
        with self._locked():
            keys = self.list()
            found = next((k for k in keys if k.name == name), None)
            if found is None:
                raise InputError(f"no API key named {name!r}")
            changed = replace(found, limits=change(found.limits))
            self._save([changed if k.name == name else k for k in keys])
        return changed

    def revoke(self, name: str) -> None:
        with self._locked():
            keys = self.list()
            kept = [k for k in keys if k.name != name]
            if len(kept) == len(keys):
                raise InputError(f"no API key named {name!r}")
            self._save(kept)

    def list(self) -> builtins.list[ApiKey]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise StateError(f"cannot read API key file {self.path}: {exc.strerror}") from None
        return _parse(raw, self.path)

    def verify(self, presented: str) -> str | None:
        """The name of the stored key equal to ``presented``, or None."""
        return match_key(self.list(), presented)

    def _save(self, keys: builtins.list[ApiKey]) -> None:
        scoped = any(k.limits.restricted for k in keys)
        version = _SCOPED_VERSION if scoped else _PLAIN_VERSION
        doc = {"version": version, "keys": [k.to_json() for k in keys]}
        data = json.dumps(doc, indent=2, sort_keys=True).encode("utf-8") + b"\n"
        atomic_write(self.path, data, mode=FILE_MODE)
        # atomic_write's mode is masked by the umask; a key file must never be group-readable.
        self.path.chmod(FILE_MODE)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialise read-modify-write cycles of concurrent ``keys add``/``revoke`` runs."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


def match_key(keys: builtins.list[ApiKey], presented: str) -> str | None:
    """Constant-time lookup: every stored hash is compared, whatever matched before."""
    digest = hash_key(presented).encode("ascii")
    found: str | None = None
    for key in keys:
        if hmac.compare_digest(digest, key.sha256.encode("ascii")) and found is None:
            found = key.name
    return found


def _parse(raw: bytes, path: Path) -> builtins.list[ApiKey]:
    try:
        doc: Any = json.loads(raw)
        version = doc["version"]
        keys = [
            ApiKey(
                name=str(k["name"]),
                sha256=str(k["sha256"]),
                created=str(k["created"]),
                limits=_parse_limits(k),
            )
            for k in doc["keys"]
        ]
    except (ValueError, KeyError, TypeError, InputError) as exc:
        raise IntegrityError(f"API key file {path} is damaged: {exc}") from None
    if version not in _VERSIONS:
        raise IntegrityError(f"API key file {path} has unsupported version {version!r}")
    for key in keys:
        if not _SHA256_RE.fullmatch(key.sha256):
            raise IntegrityError(f"API key file {path} is damaged: bad hash for {key.name!r}")
    return keys


def _parse_limits(entry: dict[str, Any]) -> KeyLimits:
    """A key's restrictions; any field absent (files of version 1): not restricted."""
    scopes, models = entry.get("scopes", []), entry.get("models", [])
    rpm, tokens = entry.get("rpm"), entry.get("tokens_per_day")
    if not (_strings(scopes) and _strings(models) and _count(rpm) and _count(tokens)):
        raise TypeError(f"bad scopes or limits for {entry.get('name')!r}")
    return KeyLimits(scopes=tuple(scopes), models=tuple(models), rpm=rpm, tokens_per_day=tokens)


def _strings(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _count(value: object) -> bool:
    return value is None or (isinstance(value, int) and not isinstance(value, bool))


def _under(path: str, prefix: str) -> bool:
    """``path`` is ``prefix`` or below it, at a '/' boundary."""
    stem = prefix.rstrip("/")
    return path == stem or path.startswith(stem + "/") or (stem == "" and path.startswith("/"))
