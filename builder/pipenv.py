"""pip environments: lock for the target with uv, read the lock, select the target's wheels,
build the sdists the recipe allows, and write the host's install list.

Design: docs/adr/0007-package-environments.md. The *target* (``env.platform``, a wheel
platform tag such as ``manylinux_2_28_x86_64``, and ``env.python``, ``X.Y``) has nothing to do
with the builder's own platform and Python; everything here is computed for the target:

- :func:`lock_pip` runs ``uv pip compile --generate-hashes --python-platform ...
  --python-version ...`` against the recipe's indexes and writes a PEP 751 ``pylock.toml`` with
  the target recorded in ``[tool.airgap-appliance]``;
- :func:`load_pip_lock` reads that lock, or a hashed ``requirements.txt`` (whose files are then
  looked up on the recipe's indexes by hash), into :class:`LockedPackage` values;
- :func:`select_pip_artifacts` picks, per package, the best wheel for the target's tags
  (:func:`target_tags`), or its sdist when the recipe lists it in ``build_from_source``;
- :func:`build_wheels` compiles those sdists on the builder, which must then *be* the target
  (same Python ``X.Y``, OS, libc and machine);
- :func:`pip_install_list` writes the ``name==version --hash=sha256:...`` list the host installs.

Every error is one line: :class:`~signing.errors.LockError` (exit 2) for a lock that cannot be
made or used, :class:`~signing.errors.FetchError` for an index that cannot be reached,
:class:`~signing.errors.ArtifactError` for a file whose hash is not the locked one.
"""

from __future__ import annotations

import hashlib
import os
import platform as host_platform
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import unquote, urljoin, urlsplit
from urllib.request import url2pathname

import httpx
from packaging.markers import Marker, UndefinedEnvironmentName
from packaging.requirements import InvalidRequirement, Requirement
from packaging.tags import Tag, compatible_tags, cpython_tags, mac_platforms
from packaging.utils import (
    InvalidWheelFilename,
    NormalizedName,
    canonicalize_name,
    parse_wheel_filename,
)
from packaging.version import InvalidVersion, Version

from builder.artifacts import Artifact
from builder.recipe import PipEnvironment
from signing.errors import ArtifactError, FetchError, LockError

TOOL_KEY = "airgap-appliance"
"""The ``[tool.<key>]`` table of a pylock.toml where :func:`lock_pip` records the target."""

HTTP_TIMEOUT = 30.0
REPRODUCIBLE_EPOCH = "315532800"  # 1980-01-01, the earliest zip time: for builds, if unset

# uv's --python-platform knows these glibc versions for x86_64 and aarch64 (uv 0.13).
_UV_GLIBC_MINORS = (17, 28, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40)
_UV_ARCHES = ("x86_64", "aarch64")
_LEGACY_MANYLINUX = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
_LEGACY_GLIBC = {"manylinux2014": 17, "manylinux2010": 12, "manylinux1": 5}
_WINDOWS = {
    "win_amd64": ("x86_64", "AMD64", "x86_64-pc-windows-msvc"),
    "win_arm64": ("aarch64", "ARM64", "aarch64-pc-windows-msvc"),
    "win32": ("i686", "x86", "i686-pc-windows-msvc"),
}
_SHA256 = re.compile(r"^[0-9a-f]{64}$")

# Environment variables that would make uv resolve against something else than the recipe says.
_UV_OVERRIDES = (
    "UV_INDEX",
    "UV_DEFAULT_INDEX",
    "UV_INDEX_URL",
    "UV_EXTRA_INDEX_URL",
    "UV_FIND_LINKS",
    "UV_NO_INDEX",
    "UV_INDEX_STRATEGY",
    "UV_CONSTRAINT",
    "UV_OVERRIDE",
    "UV_BUILD_CONSTRAINT",
    "UV_EXCLUDE_NEWER",
    "UV_PRERELEASE",
    "UV_RESOLUTION",
    "UV_NO_BINARY",
    "UV_ONLY_BINARY",
    "UV_TORCH_BACKEND",
    "UV_CONFIG_FILE",
    "UV_OFFLINE",
)


# -- the target ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TargetPlatform:
    """What a wheel platform tag says about the machine it runs on."""

    tag: str  # manylinux_2_28_x86_64
    os: str  # sys.platform of the target: linux, darwin, win32
    libc: str | None  # glibc or musl on linux, else None
    arch: str  # the machine, normalized: x86_64, aarch64, i686, ...
    machine: str  # platform.machine() on the target (the PEP 508 platform_machine)
    platforms: tuple[str, ...]  # wheel platform tags the target accepts, best first
    uv_platform: str | None  # uv's --python-platform, None when uv has none for it
    uv_env: tuple[tuple[str, str], ...] = ()  # environment uv needs for it


def parse_target_platform(tag: str) -> TargetPlatform:
    """Interpret a recipe's ``platform``; LockError naming it when it is not one we know.

    ``manylinux_2_X_<arch>`` (and the legacy ``manylinux2014/2010/1_<arch>``) also accepts every
    older glibc, the legacy aliases and ``linux_<arch>``, like pip on such a host;
    ``musllinux_1_X_<arch>`` every older musl; ``macosx_X_Y_<arch>`` what :func:`packaging.tags
    .mac_platforms` lists; ``win_amd64``, ``win_arm64`` and ``win32`` only themselves.
    """
    if m := re.fullmatch(r"manylinux(1|2010|2014)_([a-z0-9_]+)", tag):
        return _manylinux(tag, _LEGACY_GLIBC[f"manylinux{m[1]}"], m[2])
    if m := re.fullmatch(r"manylinux_2_(\d+)_([a-z0-9_]+)", tag):
        return _manylinux(tag, int(m[1]), m[2])
    if m := re.fullmatch(r"musllinux_1_(\d+)_([a-z0-9_]+)", tag):
        minor, arch = int(m[1]), m[2]
        plats = (*(f"musllinux_1_{n}_{arch}" for n in range(minor, -1, -1)), f"linux_{arch}")
        uv = f"{arch}-unknown-linux-musl" if arch in _UV_ARCHES else None
        return TargetPlatform(tag, "linux", "musl", arch, arch, plats, uv)
    if m := re.fullmatch(r"macosx_(\d+)_(\d+)_(arm64|x86_64)", tag):
        major, minor, arch = int(m[1]), int(m[2]), m[3]
        plats = tuple(mac_platforms((major, minor), arch))
        uv = "aarch64-apple-darwin" if arch == "arm64" else "x86_64-apple-darwin"
        env = (("MACOSX_DEPLOYMENT_TARGET", f"{major}.{minor}"),)
        norm = "aarch64" if arch == "arm64" else arch
        return TargetPlatform(tag, "darwin", None, norm, arch, plats, uv, env)
    if tag in _WINDOWS:
        arch, machine, uv = _WINDOWS[tag]
        return TargetPlatform(tag, "win32", None, arch, machine, (tag,), uv)
    raise LockError(
        f"target platform {tag!r} is not a wheel platform this builder knows; give "
        "manylinux_2_X_<arch>, musllinux_1_X_<arch>, macosx_X_Y_<arch>, win_amd64, win_arm64 "
        "or win32"
    )


def _manylinux(tag: str, minor: int, arch: str) -> TargetPlatform:
    floor = 4 if arch in ("x86_64", "i686") else 16  # as packaging.tags: nothing older exists
    plats: list[str] = []
    for n in range(minor, floor, -1):
        plats.append(f"manylinux_2_{n}_{arch}")
        if n in _LEGACY_MANYLINUX:
            plats.append(f"{_LEGACY_MANYLINUX[n]}_{arch}")
    plats.append(f"linux_{arch}")
    uv = None
    usable = [n for n in _UV_GLIBC_MINORS if n <= minor]
    if arch in _UV_ARCHES and usable:
        # The newest glibc uv knows that is not newer than the target's: never too new.
        uv = f"{arch}-manylinux_2_{usable[-1]}"
    return TargetPlatform(tag, "linux", "glibc", arch, arch, tuple(plats), uv)


def uv_python_platform(platform: str) -> str:
    """uv's ``--python-platform`` for a wheel platform tag (``manylinux_2_28_x86_64`` ->
    ``x86_64-manylinux_2_28``); LockError naming the platform when uv has none for it."""
    target = parse_target_platform(platform)
    if target.uv_platform is None:
        raise LockError(
            f"uv cannot resolve for target platform {platform!r} (no --python-platform)"
        )
    return target.uv_platform


def _python_version(python: str) -> tuple[int, int]:
    major, minor = python.split(".")
    return int(major), int(minor)


def target_tags(platform: str, python: str) -> list[Tag]:
    """The wheel tags a CPython ``python`` on ``platform`` accepts, best first (as pip ranks
    them): ``cp311-cp311-<plat>``, ``cp311-abi3-<plat>``, older ``abi3``, ``py3-none-<plat>``,
    ..., ``py3-none-any``."""
    version = _python_version(python)
    interpreter = f"cp{version[0]}{version[1]}"
    plats = list(parse_target_platform(platform).platforms)
    tags = [
        *cpython_tags(version, abis=[interpreter], platforms=plats),
        *compatible_tags(version, interpreter, plats),
    ]
    return list(dict.fromkeys(tags))


def target_marker_environment(platform: str, python: str) -> dict[str, str]:
    """The PEP 508 marker environment of the target, to evaluate a lock's markers with.

    ``python_full_version`` is taken as ``X.Y.0``: the recipe pins no patch level.
    """
    target = parse_target_platform(platform)
    system = {"linux": "Linux", "darwin": "Darwin", "win32": "Windows"}[target.os]
    return {
        "implementation_name": "cpython",
        "implementation_version": f"{python}.0",
        "os_name": "nt" if target.os == "win32" else "posix",
        "platform_machine": target.machine,
        "platform_python_implementation": "CPython",
        "platform_release": "",
        "platform_system": system,
        "platform_version": "",
        "python_full_version": f"{python}.0",
        "python_version": python,
        "sys_platform": target.os,
    }


def _target_label(env: PipEnvironment) -> str:
    major, minor = _python_version(env.python)
    return f"cp{major}{minor}-{env.platform}"


# -- lock ---------------------------------------------------------------------------------------


def lock_pip(
    recipe_path: Path,
    env: PipEnvironment,
    *,
    out: Path | None = None,
    cache_dir: Path | None = None,
    timeout: float = HTTP_TIMEOUT,
) -> Path:
    """Resolve the environment for its target with uv and write a PEP 751 ``pylock.toml``.

    The requirements are ``env.requirements`` or ``env.requirements_file`` (relative to the
    recipe); relative ``find_links`` directories are relative to the recipe too. The lock goes
    to ``out`` or ``env.lock_path(recipe_path)``, through a temporary file and a rename, so a
    failure leaves any previous lock as it was. ``cache_dir`` is uv's cache (default: uv's own,
    or ``$UV_CACHE_DIR``). Every index is checked for reachability first (FetchError naming its
    URL); a resolution failure is a LockError carrying uv's reason.
    """
    target = parse_target_platform(env.platform)
    uv_platform = uv_python_platform(env.platform)
    base = recipe_path.parent
    dest = out if out is not None else env.lock_path(recipe_path)
    find_links = [_local_or_url(link, base) for link in env.find_links]
    for url in (env.index_url, *env.extra_index_urls):
        _check_reachable(url, "index", timeout=timeout)
    for url in find_links:
        _check_reachable(url, "find-links", timeout=timeout)
    uv = _uv_executable()
    with tempfile.TemporaryDirectory(prefix="airgap-lock-") as tmp:
        if env.requirements_file is not None:
            requirements = base / env.requirements_file
            if not requirements.is_file():
                raise LockError(f"requirements file {requirements} does not exist")
        elif env.requirements:
            requirements = Path(tmp) / "requirements.in"
            requirements.write_text("".join(f"{r}\n" for r in env.requirements))
        else:
            raise LockError(
                f"the environment of {recipe_path} has no 'requirements' or "
                "'requirements_file' to lock; it can only use its existing 'lock'"
            )
        command = [
            uv,
            "pip",
            "compile",
            str(requirements),
            "--generate-hashes",
            "--no-header",
            "--no-config",
            "--quiet",
            "--format",
            "pylock.toml",
            "--python-platform",
            uv_platform,
            "--python-version",
            env.python,
            "--python",  # only to read sdists' metadata; the resolution is for the target
            sys.executable,
            "--index-url",
            env.index_url,
        ]
        for url in env.extra_index_urls:
            command += ["--extra-index-url", url]
        for link in find_links:
            command += ["--find-links", link]
        run_env = {k: v for k, v in os.environ.items() if k not in _UV_OVERRIDES}
        run_env |= dict(target.uv_env) | {"UV_HTTP_RETRIES": "1", "NO_COLOR": "1"}
        if cache_dir is not None:
            run_env["UV_CACHE_DIR"] = str(cache_dir)
        result = subprocess.run(
            command, capture_output=True, text=True, env=run_env, cwd=base, check=False
        )
        if result.returncode != 0:
            _raise_uv_failure(result.stderr, env)
        text = _pylock_text(result.stdout, env)
    _write_atomically(dest, text.encode("utf-8"))
    return dest


def _uv_executable() -> str:
    try:
        from uv import find_uv_bin  # noqa: PLC0415  (the builder extra; not on the host)

        return find_uv_bin()
    except (ImportError, FileNotFoundError):
        found = shutil.which("uv")
        if found is None:
            raise LockError(
                "uv is not installed; install the builder extra: pip install "
                "'airgap-appliance[builder]'"
            ) from None
        return found


def _local_or_url(link: str, base: Path) -> str:
    """A find-links entry as uv gets it: URLs unchanged, local paths relative to the recipe."""
    if urlsplit(link).scheme in ("http", "https", "file"):
        return link
    return str((base / link).resolve())


def _check_reachable(url: str, what: str, *, timeout: float) -> None:
    """Any HTTP answer (even 404 or 405) proves the server is there; no answer is a FetchError.

    uv itself retries an unreachable index for many seconds and names only the page it wanted.
    """
    scheme = urlsplit(url).scheme
    if scheme not in ("http", "https"):
        local = Path(url2pathname(urlsplit(url).path)) if scheme == "file" else Path(url)
        if not local.exists():
            raise FetchError(f"{what} {url} is unreachable: no such file or directory")
        return
    try:
        with httpx.Client(timeout=timeout, follow_redirects=True) as client:
            client.head(url)
    except httpx.HTTPError as exc:
        raise FetchError(f"{what} {url} is unreachable: {exc or type(exc).__name__}") from None


_URL_IN_UV_ERROR = re.compile(r"(?:Failed to fetch: |error sending request for url \()(\S+?)\)?$")


def _raise_uv_failure(stderr: str, env: PipEnvironment) -> None:
    """Turn uv's failure into one line: a FetchError when it could not reach a URL, else a
    LockError with uv's error and its first cause (continuation lines joined)."""
    lines = [line.rstrip() for line in stderr.splitlines()]
    for line in lines:
        if match := _URL_IN_UV_ERROR.search(line.strip().removeprefix("cause:").strip()):
            raise FetchError(f"uv could not fetch {match[1]} (index {env.index_url})")
    error, cause = "", list[str]()
    for line in lines:
        text = line.strip()
        if not error:
            if text.lower().startswith("error:"):
                error = text[len("error:") :].strip()
        elif not cause:
            if text.startswith(("cause:", "╰─▶")):
                cause.append(text.removeprefix("cause:").removeprefix("╰─▶").strip())
        elif text and line[:1].isspace() and not text.startswith(("cause:", "╰─▶")):
            cause.append(text)
        else:
            break
    reason = ": ".join(part for part in (error, " ".join(cause)) if part)
    if not reason:
        tail = [line.strip() for line in lines if line.strip()]
        reason = tail[-1] if tail else "uv failed without a message"
    raise LockError(
        f"cannot lock for {env.platform} / Python {env.python}: {' '.join(reason.split())}"
    )


def _pylock_text(uv_output: str, env: PipEnvironment) -> str:
    """uv's pylock.toml with our header and the target recorded; checked to parse back."""
    body = uv_output.strip()
    text = (
        f"# Locked by appliance-builder with uv for {env.platform} / Python {env.python}.\n"
        "# Review changes to this file: every pinned hash decides what goes into a bundle.\n"
        f"{body}\n\n[tool.{TOOL_KEY}]\n"
        f'platform = "{env.platform}"\npython = "{env.python}"\n'
    )
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise LockError(f"uv wrote a pylock.toml that does not parse: {exc}") from None
    if not str(data.get("lock-version", "")).startswith("1."):
        raise LockError("uv wrote no PEP 751 lock (no lock-version 1.x)")
    return text


def _write_atomically(dest: Path, data: bytes) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        tmp.chmod(0o644)  # a lock is committed and read by everyone: not mkstemp's 0600
        tmp.replace(dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# -- read a lock --------------------------------------------------------------------------------


class LockedFile(NamedTuple):
    """One file a lock pins: its name, where it is, its sha256 and (if known) its size."""

    filename: str
    url: str
    sha256: str
    size: int | None = None


@dataclass(frozen=True)
class LockedPackage:
    """One package of a lock, with every wheel and the sdist the lock pins for it."""

    name: str
    version: str
    wheels: list[LockedFile] = field(default_factory=list)
    sdist: LockedFile | None = None


def load_pip_lock(
    path: Path,
    env: PipEnvironment,
    *,
    recipe_dir: Path | None = None,
    timeout: float = HTTP_TIMEOUT,
) -> list[LockedPackage]:
    """Read a pip lock: a PEP 751 ``*.toml`` or a hashed requirements file (any other name).

    A pylock's ``[tool.airgap-appliance]`` target must be the recipe's (else LockError naming
    both); its file ``path`` values and scheme-less ``url`` values are relative to the lock's
    directory and become ``file://`` URLs. A requirements file pins ``name==version`` with
    ``--hash=sha256:`` options; its files are found on ``env.index_url``, the extra indexes and
    the ``find_links`` (local ones relative to ``recipe_dir``, default the lock's directory) by
    hash. Packages whose markers are false on the target are left out.
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
    base = recipe_dir if recipe_dir is not None else path.parent
    return _load_requirements(path, text, env, base, timeout=timeout)


def _load_pylock(path: Path, text: str, env: PipEnvironment) -> list[LockedPackage]:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise LockError(f"lock {path} is not valid TOML: {exc}") from None
    version = data.get("lock-version")
    if not isinstance(version, str) or not version.startswith("1."):
        raise LockError(f"lock {path} is not a PEP 751 lock (lock-version {version!r})")
    tool = data.get("tool", {})
    recorded = tool.get(TOOL_KEY) if isinstance(tool, dict) else None
    if isinstance(recorded, dict):
        made_for = (recorded.get("platform"), recorded.get("python"))
        if made_for != (env.platform, env.python):
            raise LockError(
                f"lock {path} was made for {made_for[0]} / Python {made_for[1]}, but the recipe "
                f"targets {env.platform} / Python {env.python}; lock again"
            )
    entries = data.get("packages", [])
    if not isinstance(entries, list):
        raise LockError(f"lock {path}: 'packages' is not an array of tables")
    markers = target_marker_environment(env.platform, env.python)
    packages = []
    for entry in entries:
        if not isinstance(entry, dict):
            raise LockError(f"lock {path}: a 'packages' entry is not a table")
        package = _pylock_package(path, entry, markers)
        if package is not None:
            packages.append(package)
    return packages


def _pylock_package(
    path: Path, entry: dict[str, Any], markers: dict[str, str]
) -> LockedPackage | None:
    name, version = entry.get("name"), entry.get("version")
    if not isinstance(name, str) or not isinstance(version, str):
        raise LockError(f"lock {path}: a package has no 'name' or no 'version' ({entry!r:.80})")
    marker = entry.get("marker")
    if isinstance(marker, str) and not _marker_holds(path, name, marker, markers):
        return None
    for kind in ("vcs", "directory"):
        if kind in entry:
            raise LockError(
                f"lock {path}: package {name} {version} comes from a {kind}; only wheels and "
                "sdists (files with a sha256) can go into a bundle"
            )
    wheels = [_pylock_file(path, name, table) for table in _tables(path, name, entry, "wheels")]
    sdist = _pylock_file(path, name, entry["sdist"]) if "sdist" in entry else None
    if "archive" in entry:
        archive = _pylock_file(path, name, entry["archive"])
        if archive.filename.endswith(".whl"):
            wheels.append(archive)
        else:
            sdist = archive
    if not wheels and sdist is None:
        raise LockError(f"lock {path}: package {name} {version} has neither wheels nor an sdist")
    return LockedPackage(name, version, wheels, sdist)


def _tables(path: Path, name: str, entry: dict[str, Any], key: str) -> list[dict[str, Any]]:
    value = entry.get(key, [])
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise LockError(f"lock {path}: '{key}' of package {name} is not an array of tables")
    return value


def _pylock_file(path: Path, package: str, table: object) -> LockedFile:
    if not isinstance(table, dict):
        raise LockError(f"lock {path}: a file of package {package} is not a table")
    url, rel = table.get("url"), table.get("path")
    if isinstance(url, str) and url:
        scheme = urlsplit(url).scheme
        if scheme == "":
            url = (path.parent / url2pathname(unquote(url))).resolve().as_uri()
        elif scheme not in ("http", "https", "file"):
            raise LockError(f"lock {path}: package {package}: unsupported URL {url}")
    elif isinstance(rel, str) and rel:
        url = (path.parent / rel).resolve().as_uri()
    else:
        raise LockError(f"lock {path}: a file of package {package} has neither 'url' nor 'path'")
    name = table.get("name")
    filename = name if isinstance(name, str) else unquote(urlsplit(url).path.rsplit("/", 1)[-1])
    if not filename or "/" in filename:
        raise LockError(f"lock {path}: package {package}: no usable file name in {url}")
    hashes = table.get("hashes")
    sha256 = hashes.get("sha256") if isinstance(hashes, dict) else None
    if not isinstance(sha256, str) or not _SHA256.match(sha256.lower()):
        raise LockError(f"lock {path}: {filename} of package {package} has no sha256 hash")
    size = table.get("size")
    return LockedFile(filename, url, sha256.lower(), size if isinstance(size, int) else None)


def _marker_holds(path: Path, name: str, marker: str, environment: dict[str, str]) -> bool:
    try:
        return Marker(marker).evaluate(environment)
    except (ValueError, UndefinedEnvironmentName) as exc:  # InvalidMarker, UndefinedComparison
        raise LockError(f"lock {path}: package {name}: bad marker {marker!r}: {exc}") from None


class _Pin(NamedTuple):
    name: str
    version: str
    hashes: frozenset[str]


def _logical_lines(text: str) -> Iterator[str]:
    pending = ""
    for raw in text.splitlines():
        line = re.sub(r"(^|\s)#.*$", "", raw).rstrip()
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = (pending + line).strip(), ""
        if line:
            yield line
    if pending.strip():
        yield pending.strip()


def _parse_requirements(path: Path, text: str, env: PipEnvironment) -> list[_Pin]:
    markers = target_marker_environment(env.platform, env.python)
    pins = []
    for line in _logical_lines(text):
        if line.startswith("-"):
            option = line.split()[0].split("=")[0]
            if option in ("-r", "--requirement", "-c", "--constraint", "-e", "--editable"):
                raise LockError(f"lock {path}: '{option}' is not allowed in a lock file")
            continue  # --index-url and the like: the recipe's indexes are used
        spec, *options = re.split(r"\s+(?=--)", line)
        try:
            req = Requirement(spec)
        except InvalidRequirement as exc:
            raise LockError(f"lock {path}: {spec!r} is not a requirement: {exc}") from None
        pinned = [s for s in req.specifier if s.operator in ("==", "===") and "*" not in s.version]
        if req.url or len(pinned) != 1 or len(req.specifier) != 1:
            raise LockError(f"lock {path}: {spec!r} is not pinned as name==version")
        if req.marker is not None and not _marker_holds(path, req.name, str(req.marker), markers):
            continue
        hashes = set()
        for option in options:
            kind, _, value = option.removeprefix("--hash").lstrip("= ").partition(":")
            if option.startswith("--hash") and kind == "sha256":
                hashes.add(value.strip().lower())
        if not hashes:
            raise LockError(f"lock {path}: {req.name} has no --hash=sha256: option")
        pins.append(_Pin(req.name, pinned[0].version, frozenset(hashes)))
    return pins


def _load_requirements(
    path: Path, text: str, env: PipEnvironment, base: Path, *, timeout: float
) -> list[LockedPackage]:
    pins = _parse_requirements(path, text, env)
    sources = [env.index_url, *env.extra_index_urls]
    packages = []
    with httpx.Client(timeout=timeout, follow_redirects=True) as client:
        for pin in pins:
            found: dict[str, LockedFile] = {}
            for index in sources:
                for file in _index_files(client, index, pin.name):
                    if file.sha256 in pin.hashes:
                        found.setdefault(file.sha256, file)
                if len(found) == len(pin.hashes):
                    break
            if len(found) < len(pin.hashes):
                for link in env.find_links:
                    for file in _find_links_files(client, _local_or_url(link, base), pin.name):
                        if file.sha256 in pin.hashes:
                            found.setdefault(file.sha256, file)
            if not found:
                where = ", ".join([*sources, *env.find_links])
                raise LockError(
                    f"lock {path}: no file of {pin.name} {pin.version} on {where} has one of "
                    "its locked hashes"
                )
            files = sorted(found.values(), key=lambda f: f.filename)
            wheels = [f for f in files if f.filename.endswith(".whl")]
            sdists = sorted(
                (f for f in files if not f.filename.endswith(".whl")),
                key=lambda f: (not f.filename.endswith(".tar.gz"), f.filename),
            )
            packages.append(LockedPackage(pin.name, pin.version, wheels, next(iter(sdists), None)))
    return packages


class _Anchors(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[tuple[str, str]] = []
        self._href: str | None = None
        self._text = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self._href = dict(attrs).get("href")
            self._text = ""

    def handle_data(self, data: str) -> None:
        if self._href is not None:
            self._text += data

    def handle_endtag(self, tag: str) -> None:
        if tag == "a" and self._href is not None:
            self.links.append((self._href, self._text.strip()))
            self._href = None


def _files_from_html(page_url: str, body: str) -> list[LockedFile]:
    parser = _Anchors()
    parser.feed(body)
    files = []
    for href, text in parser.links:
        url = urljoin(page_url, href)
        parts = urlsplit(url)
        algo, _, digest = parts.fragment.partition("=")
        if algo != "sha256" or not _SHA256.match(digest.lower()):
            continue
        bare = parts._replace(fragment="").geturl()
        filename = text or unquote(parts.path.rsplit("/", 1)[-1])
        files.append(LockedFile(filename, bare, digest.lower()))
    return files


def _files_from_json(page_url: str, data: object) -> list[LockedFile]:
    entries = data.get("files", []) if isinstance(data, dict) else []
    files = []
    for entry in entries if isinstance(entries, list) else []:
        if not isinstance(entry, dict):
            continue
        hashes = entry.get("hashes")
        digest = hashes.get("sha256") if isinstance(hashes, dict) else None
        url, filename, size = entry.get("url"), entry.get("filename"), entry.get("size")
        if not (isinstance(digest, str) and isinstance(url, str) and isinstance(filename, str)):
            continue
        if not _SHA256.match(digest.lower()):
            continue
        bare = urlsplit(urljoin(page_url, url))._replace(fragment="").geturl()
        files.append(
            LockedFile(filename, bare, digest.lower(), size if isinstance(size, int) else None)
        )
    return files


_SIMPLE_ACCEPT = (
    "application/vnd.pypi.simple.v1+json, application/vnd.pypi.simple.v1+html;q=0.2, "
    "text/html;q=0.01"
)


def _index_files(client: httpx.Client, index_url: str, name: str) -> list[LockedFile]:
    """The files of project ``name`` on a simple index (PEP 691 JSON or PEP 503 HTML)."""
    page = f"{index_url.rstrip('/')}/{canonicalize_name(name)}/"
    if urlsplit(page).scheme == "file":
        local = Path(url2pathname(urlsplit(page).path)) / "index.html"
        return _files_from_html(local.as_uri(), local.read_text()) if local.is_file() else []
    try:
        response = client.get(page, headers={"Accept": _SIMPLE_ACCEPT})
    except httpx.HTTPError as exc:
        raise FetchError(f"index {index_url} is unreachable: {exc or type(exc).__name__}") from None
    if response.status_code == 404:
        return []
    if response.status_code != 200:
        raise FetchError(f"index page {page} answered HTTP {response.status_code}")
    ctype = response.headers.get("content-type", "").split(";")[0].strip()
    if ctype == "application/vnd.pypi.simple.v1+json":
        try:
            return _files_from_json(str(response.url), response.json())
        except ValueError:
            raise FetchError(f"index page {page} is not valid JSON") from None
    return _files_from_html(str(response.url), response.text)


def _find_links_files(client: httpx.Client, link: str, name: str) -> list[LockedFile]:
    """Files of ``name`` in a find-links directory (hashed here) or HTML page (``#sha256=``)."""
    project = canonicalize_name(name)
    parts = urlsplit(link)
    if parts.scheme in ("http", "https"):
        try:
            response = client.get(link)
        except httpx.HTTPError as exc:
            raise FetchError(
                f"find-links {link} is unreachable: {exc or type(exc).__name__}"
            ) from None
        if response.status_code != 200:
            raise FetchError(f"find-links {link} answered HTTP {response.status_code}")
        files = _files_from_html(str(response.url), response.text)
    else:
        directory = Path(url2pathname(parts.path)) if parts.scheme == "file" else Path(link)
        files = (
            [
                LockedFile(p.name, p.resolve().as_uri(), _sha256_file(p), p.stat().st_size)
                for p in sorted(directory.iterdir())
                if p.is_file() and _project_of(p.name) == project
            ]
            if directory.is_dir()
            else []
        )
    return [f for f in files if _project_of(f.filename) == project]


def _project_of(filename: str) -> NormalizedName | None:
    if filename.endswith(".whl"):
        head = filename.split("-", 1)[0]
    elif filename.endswith((".tar.gz", ".zip")):
        head = filename.removesuffix(".tar.gz").removesuffix(".zip").rsplit("-", 1)[0]
    else:
        return None
    return canonicalize_name(head)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# -- select -------------------------------------------------------------------------------------


def select_pip_artifacts(
    packages: list[LockedPackage], env: PipEnvironment
) -> tuple[list[Artifact], list[Artifact]]:
    """The wheels to fetch and the sdists to build for the target, sorted by package name.

    Per package: a package the recipe lists in ``build_from_source`` (names compared
    normalized) is built from its sdist when the lock pins one, even if a wheel would fit:
    that is what ``build_env`` (for example ``CMAKE_ARGS=-DGGML_CUDA=on``) is for. Otherwise
    the wheel whose best tag ranks highest in :func:`target_tags` is taken. A package with
    neither is a LockError that names it, the target and what the lock has instead.
    """
    rank = {tag: i for i, tag in enumerate(target_tags(env.platform, env.python))}
    from_source = {canonicalize_name(name) for name in env.build_from_source}
    label = _target_label(env)
    wheels: list[Artifact] = []
    sdists: list[Artifact] = []
    for package in sorted(packages, key=lambda p: (canonicalize_name(p.name), p.version)):
        if canonicalize_name(package.name) in from_source and package.sdist is not None:
            sdists.append(_artifact(package, package.sdist))
            continue
        best: tuple[int, str, LockedFile] | None = None
        for wheel in package.wheels:
            try:
                wheel_tags = parse_wheel_filename(wheel.filename)[3]
            except InvalidWheelFilename:
                raise LockError(
                    f"package {package.name} {package.version}: {wheel.filename!r} is not a "
                    "wheel file name"
                ) from None
            score = min((rank[t] for t in wheel_tags if t in rank), default=None)
            if score is not None and (best is None or (score, wheel.filename) < best[:2]):
                best = (score, wheel.filename, wheel)
        if best is not None:
            wheels.append(_artifact(package, best[2]))
            continue
        if canonicalize_name(package.name) in from_source:
            reason = "it is in build_from_source, but the lock has no sdist for it"
            raise LockError(
                f"package {package.name} {package.version} has no wheel for {label}; {reason}"
            )
        if package.wheels:
            found = sorted({_wheel_tag_text(w.filename) for w in package.wheels})
            what = f"the lock's wheels are for {', '.join(found)}"
            what += ", and it has an sdist" if package.sdist is not None else ""
        else:
            what = "only an sdist"
        raise LockError(
            f"package {package.name} {package.version} has no wheel for {label} and is not in "
            f"build_from_source ({what})"
        )
    return wheels, sdists


def _wheel_tag_text(filename: str) -> str:
    return "-".join(filename.removesuffix(".whl").split("-")[-3:])


def _artifact(package: LockedPackage, file: LockedFile) -> Artifact:
    try:
        return Artifact(
            name=package.name,
            version=package.version,
            filename=file.filename,
            url=file.url,
            sha256=file.sha256,
            size=file.size,
        )
    except ValueError as exc:
        raise LockError(f"package {package.name} {package.version}: {exc}") from None


# -- build --------------------------------------------------------------------------------------


def check_builder_is_target(env: PipEnvironment) -> None:
    """Refuse (LockError) to compile for a target this machine is not: Python ``X.Y``, OS,
    libc (glibc or musl) and machine must all be the target's."""
    target = parse_target_platform(env.platform)
    mine = f"{sys.version_info.major}.{sys.version_info.minor}"
    if mine != env.python:
        raise LockError(
            f"cannot build sdists for Python {env.python} with this builder's Python {mine}; "
            "run the build with a Python of the target's version"
        )
    machine = host_platform.machine().lower()
    machine = {"amd64": "x86_64", "arm64": "aarch64", "x86": "i686"}.get(machine, machine)
    libc = None
    if sys.platform == "linux":
        libc = "glibc" if host_platform.libc_ver()[0] == "glibc" else "musl"
    if (sys.platform, libc, machine) != (target.os, target.libc, target.arch):
        ours = "/".join(p for p in (sys.platform, libc, machine) if p)
        theirs = "/".join(p for p in (target.os, target.libc, target.arch) if p)
        raise LockError(
            f"cannot build sdists for {env.platform} ({theirs}) on this {ours} builder; "
            "build on a machine like the target"
        )


def build_wheels(
    sdists: Sequence[tuple[Artifact, Path]],
    env: PipEnvironment,
    workdir: Path,
    *,
    isolation: bool = False,
) -> list[tuple[Artifact, Path]]:
    """Build each (already fetched) sdist into a wheel on this machine, in order.

    Each sdist is copied under ``workdir`` by its file name (pip recognizes an sdist by its
    name; a content-addressed cache file has none) and hashed there again (ArtifactError when
    it is not the locked file). Runs ``python -m pip wheel --no-deps --no-cache-dir`` with this
    interpreter and ``env.build_env`` added to the environment. By default without build
    isolation and with ``--no-index``: the build backend (setuptools, scikit-build-core,
    cmake, ...) must be installed next to the builder, which keeps the build offline and its
    tools the ones the operator chose. ``isolation=True`` lets pip install the sdist's build
    requirements in an isolated environment from the recipe's indexes instead (unpinned: the
    builder is online).

    The builder must be the target (:func:`check_builder_is_target`), and the wheel must be
    the sdist's name and version and fit the target's tags. Returns ``Artifact(origin=
    "built", url=<the sdist's url>, source_sha256=<the sdist's sha256>, sha256=<the wheel's>)``
    with the wheel's path under ``workdir``.
    """
    if not sdists:
        return []
    check_builder_is_target(env)
    tags = set(target_tags(env.platform, env.python))
    label = _target_label(env)
    built = []
    for sdist, path in sdists:
        # pip knows an sdist by its file name; a content-addressed cache file has none.
        staged = workdir / "built" / sdist.sha256
        if staged.exists():
            shutil.rmtree(staged)
        out = staged / "wheel"
        out.mkdir(parents=True)
        source = staged / sdist.filename
        shutil.copyfile(path, source)
        actual = _sha256_file(source)
        if actual != sdist.sha256:
            raise ArtifactError(
                f"sdist {sdist.filename} of {sdist.name} {sdist.version}: sha256 {actual} is not "
                f"the locked {sdist.sha256}"
            )
        command = [sys.executable, "-m", "pip", "wheel", "--no-deps"]
        command += ["--disable-pip-version-check", "--no-input", "--wheel-dir", str(out)]
        if isolation and not env.build_env and sdist.url.startswith(("https://", "http://")):
            # pip keys the wheels it built by the sdist's URL and sha256: an sdist that pip
            # already compiled on this machine (llama-cpp-python: minutes) is not compiled
            # again. Never with build_env: a CUDA build must not come from a CPU build's cache.
            command += ["--index-url", env.index_url]
            for url in env.extra_index_urls:
                command += ["--extra-index-url", url]
            command.append(f"{sdist.name} @ {sdist.url}#sha256={sdist.sha256}")
        elif isolation:
            command.append("--no-cache-dir")
            command += ["--index-url", env.index_url]
            for url in env.extra_index_urls:
                command += ["--extra-index-url", url]
        else:
            command += ["--no-cache-dir", "--no-index", "--no-build-isolation"]
        if command[-1] != f"{sdist.name} @ {sdist.url}#sha256={sdist.sha256}":
            command.append(str(source))
        run_env = os.environ | {"PIP_CONFIG_FILE": os.devnull} | dict(env.build_env)
        run_env.setdefault("SOURCE_DATE_EPOCH", REPRODUCIBLE_EPOCH)  # wheel zip timestamps
        result = subprocess.run(command, capture_output=True, text=True, env=run_env, check=False)
        made = sorted(out.glob("*.whl"))
        if result.returncode != 0 or len(made) != 1:
            lines = [
                ln.strip() for ln in (result.stderr + result.stdout).splitlines() if ln.strip()
            ]
            why = next((ln for ln in reversed(lines) if ln.lower().startswith("error")), None)
            why = why or (lines[-1] if lines else f"pip made {len(made)} wheels")
            raise LockError(f"building {sdist.name} {sdist.version} from its sdist failed: {why}")
        wheel = made[0]
        name, version, _, wheel_tags = parse_wheel_filename(wheel.name)
        if name != canonicalize_name(sdist.name) or not _same_version(version, sdist.version):
            raise LockError(
                f"the sdist of {sdist.name} {sdist.version} built {wheel.name}, another package"
            )
        if not wheel_tags & tags:
            raise LockError(
                f"the wheel built from {sdist.name} {sdist.version} ({wheel.name}) does not fit "
                f"{label}"
            )
        artifact = Artifact(
            name=sdist.name,
            version=sdist.version,
            filename=wheel.name,
            url=sdist.url,
            sha256=_sha256_file(wheel),
            size=wheel.stat().st_size,
            origin="built",
            source_sha256=sdist.sha256,
        )
        built.append((artifact, wheel))
    return built


def _same_version(version: Version, text: str) -> bool:
    try:
        return version == Version(text)
    except InvalidVersion:
        return False


# -- install list -------------------------------------------------------------------------------


def pip_install_list(artifacts: Sequence[Artifact], *, target: str | None = None) -> bytes:
    """The requirements the host installs from (``pip install --no-index --require-hashes``):
    one ``name==version --hash=sha256:<hex>`` line per package, sorted by normalized name,
    with every hash of that package's wheels. Only wheels may be listed (LockError for
    anything else, or for one package at two versions). ``target`` goes into the header."""
    by_name: dict[str, tuple[str, set[str]]] = {}
    for artifact in artifacts:
        if not artifact.filename.endswith(".whl"):
            raise LockError(f"{artifact.filename} is not a wheel; the host installs only wheels")
        name = canonicalize_name(artifact.name)
        version, hashes = by_name.setdefault(name, (artifact.version, set()))
        if version != artifact.version:
            raise LockError(
                f"package {name} is listed at two versions: {version} and {artifact.version}"
            )
        hashes.add(artifact.sha256)
    header = "# Install list made by appliance-builder"
    header += f" for {target}.\n" if target else ".\n"
    lines = [
        f"{name}=={version} " + " ".join(f"--hash=sha256:{h}" for h in sorted(hashes)) + "\n"
        for name, (version, hashes) in sorted(by_name.items())
    ]
    return (header + "".join(lines)).encode("utf-8")
