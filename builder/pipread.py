"""Reading a pip lock for the target: a PEP 751 ``pylock.toml`` through ``packaging.pylock``, or
a hashed ``requirements.txt`` (builder.hashedreqs), into :class:`~builder.wheels.LockedPackage`
values (docs/adr/0007-package-environments.md, docs/adr/0011-pip-lock-input.md).

A pylock is parsed and checked against PEP 751 by :meth:`packaging.pylock.Pylock.from_dict`; what
this module adds is what a bundle needs beyond the spec:

- the target recorded in ``[tool.airgap-appliance]`` (by builder.piplock) must be the recipe's;
- the packages whose ``marker`` is false on the target (evaluated in the target's marker
  environment, :func:`builder.target.target_marker_environment`) are left out; every wheel and
  the sdist of the others are kept, whatever their tags. Selection for the target is
  builder.wheels': ``Pylock.select`` keeps one file per package and refuses a package without
  a matching wheel in words of its own, where a bundle's refusal names the target and the tags
  the lock does have;
- every package has a version, and every file a sha256 (PEP 751 accepts any hash algorithm);
  packages from a VCS or a directory are refused: only files with a hash go into a bundle;
- file ``path`` values and scheme-less ``url`` values are relative to the lock's directory and
  become ``file://`` URLs.

``created-by`` is informational: a hand-written lock without it is read (as before
``packaging.pylock``). Every refusal is a :class:`~signing.errors.LockError` (exit 2) naming the
lock.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit
from urllib.request import url2pathname

from packaging.pylock import (
    Package,
    PackageArchive,
    PackageSdist,
    PackageWheel,
    Pylock,
    PylockValidationError,
)

from builder.hashedreqs import HTTP_TIMEOUT, SHA256_HEX, load_requirements, marker_holds
from builder.recipe import PipEnvironment
from builder.target import target_marker_environment
from builder.wheels import LockedFile, LockedPackage
from signing.errors import LockError

TOOL_KEY = "airgap-appliance"
"""The ``[tool.<key>]`` table of a pylock.toml where builder.piplock records the target."""

_NO_HASHES = re.compile(r"packages\[(\d+)\]\.(wheels\[(\d+)\]|sdist|archive)\.hashes")


def load_pip_lock(
    path: Path, env: PipEnvironment, *, timeout: float = HTTP_TIMEOUT
) -> list[LockedPackage]:
    """Read a pip lock: a PEP 751 ``*.toml`` or a hashed requirements file (any other name).

    The packages whose markers are false on the target are left out. A requirements file's
    files are found by hash on the environment's indexes and ``find_links``
    (:func:`builder.hashedreqs.load_requirements`).
    """
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise LockError(f"cannot read lock {path}: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise LockError(f"lock {path} is not UTF-8 text") from None
    if path.suffix == ".toml":
        return _load_pylock(path, text, env)
    return load_requirements(path, text, env, timeout=timeout)


def _load_pylock(path: Path, text: str, env: PipEnvironment) -> list[LockedPackage]:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise LockError(f"lock {path} is not valid TOML: {exc}") from None
    version = data.get("lock-version")
    if not isinstance(version, str) or not version.startswith("1."):
        raise LockError(f"lock {path} is not a PEP 751 lock (lock-version {version!r})")
    lock = _parse(path, {"created-by": "unknown"} | data)
    recorded = (lock.tool or {}).get(TOOL_KEY)
    if isinstance(recorded, dict):
        made_for = (recorded.get("platform"), recorded.get("python"))
        if made_for != (env.platform, env.python):
            raise LockError(
                f"lock {path} was made for {made_for[0]} / Python {made_for[1]}, but the recipe "
                f"targets {env.platform} / Python {env.python}; lock again"
            )
    markers = target_marker_environment(env.platform, env.python)
    packages = []
    for package, entry in zip(lock.packages, data["packages"], strict=True):
        if package.marker is not None and not marker_holds(
            path, package.name, package.marker, markers
        ):
            continue
        packages.append(_locked_package(path, package, entry))
    return packages


def _parse(path: Path, data: dict[str, Any]) -> Pylock:
    """PEP 751 validation by packaging; a file without hashes is named as one without sha256."""
    try:
        return Pylock.from_dict(data)
    except PylockValidationError as exc:
        where = _NO_HASHES.fullmatch(exc.context or "")
        if where is None:
            raise LockError(f"lock {path} is not a valid PEP 751 lock: {exc}") from None
        entry = data["packages"][int(where[1])]
        table = entry["wheels"][int(where[3])] if where[3] else entry[where[2]]
        try:
            named = PackageWheel(
                name=table.get("name"), url=table.get("url"), path=table.get("path"), hashes={}
            ).filename
        except PylockValidationError:
            named = "a file"
        raise LockError(
            f"lock {path}: {named} of package {entry['name']} has no sha256 hash"
        ) from None


def _locked_package(path: Path, package: Package, entry: dict[str, Any]) -> LockedPackage:
    name = package.name
    if package.version is None:
        raise LockError(f"lock {path}: a package has no 'name' or no 'version' ({entry!r:.80})")
    version = str(entry["version"])  # as the lock spells it, not normalized
    for kind, source in (("vcs", package.vcs), ("directory", package.directory)):
        if source is not None:
            raise LockError(
                f"lock {path}: package {name} {version} comes from a {kind}; only wheels and "
                "sdists (files with a sha256) can go into a bundle"
            )
    wheels = [_locked_file(path, name, wheel) for wheel in package.wheels or ()]
    sdist = _locked_file(path, name, package.sdist) if package.sdist is not None else None
    if package.archive is not None:
        archive = _locked_file(path, name, package.archive)
        if archive.filename.endswith(".whl"):
            wheels.append(archive)
        else:
            sdist = archive
    return LockedPackage(name, version, wheels, sdist)


def _locked_file(
    path: Path, package: str, file: PackageWheel | PackageSdist | PackageArchive
) -> LockedFile:
    url = file.url
    if url:
        scheme = urlsplit(url).scheme
        if scheme == "":
            url = (path.parent / url2pathname(unquote(url))).resolve().as_uri()
        elif scheme not in ("http", "https", "file"):
            raise LockError(f"lock {path}: package {package}: unsupported URL {url}")
    else:
        url = (path.parent / str(file.path)).resolve().as_uri()
    named = None if isinstance(file, PackageArchive) else file.name
    filename = named or unquote(urlsplit(url).path.rsplit("/", 1)[-1])
    if not filename or "/" in filename:
        raise LockError(f"lock {path}: package {package}: no usable file name in {url}")
    sha256 = file.hashes.get("sha256")
    if not isinstance(sha256, str) or not SHA256_HEX.match(sha256.lower()):
        raise LockError(f"lock {path}: {filename} of package {package} has no sha256 hash")
    return LockedFile(filename, url, sha256.lower(), file.size)
